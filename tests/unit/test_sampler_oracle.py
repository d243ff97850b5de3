"""The real sampler driven by oracle networks whose velocities are known in closed form.

For data that is a single latent F, every stage's straight-path velocity is a function of x and
t alone: solve the stage's interpolant x = tau * end + (1 - tau) * start for the noise n, then
v = end - start. Euler steps along a straight path are exact, so the real `iter_stages` /
`generate` must return F up to float error, hand the AR exactly M_s = Down(F, g_s) as its clean
estimate, and, with two oracles under CFG (F_c for the class, F_u for the null class), return
F_u + w (F_c - F_u): the guided velocity of two straight-path fields is the straight-path field
of that point. Swapped CFG halves, a shifted time grid, a wrong clean-estimate recovery or a
wrong re-noise scale all break these equalities.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ecar import flow
from ecar.layout import StageLayout
from ecar.models import build_model
from ecar.models.flow_net import FlowCondition
from ecar.presets import get_config

pytestmark = pytest.mark.unit

NULL_FLAG = 1.0  # what the stub AR writes into its condition for the null (unconditional) class


def stage_velocity(target_BCHW, grids, stage, start, end, x_BCHW, t_B):
    """The exact velocity at (x, t) of stage `stage` for data that is the single latent `target`."""
    tau = ((t_B - start) / (end - start)).view(-1, 1, 1, 1).to(x_BCHW.dtype)
    current = flow.downsample(target_BCHW, grids[stage])
    if stage > 0 and start > 0.0:
        previous_up = flow.upsample(flow.downsample(target_BCHW, grids[stage - 1]), grids[stage])
    else:
        previous_up = torch.zeros_like(current)
    # x = tau (b M + (1 - b) n) + (1 - tau) (a P + (1 - a) n), solved for n
    spread = tau * (1.0 - end) + (1.0 - tau) * (1.0 - start)
    noise = (x_BCHW - tau * end * current - (1.0 - tau) * start * previous_up) / spread
    return end * current - start * previous_up + (start - end) * noise


class StubAR(torch.nn.Module):
    """Stands in for the AR transformer: its condition says only whether a row is the null
    class, and it records every previous-stage map it is given."""

    def __init__(self, layout: StageLayout, null_class: int, width: int) -> None:
        super().__init__()
        self.layout, self.null_class, self.width = layout, null_class, width
        self.inputs: list[torch.Tensor] = []

    def _condition(self, stage: int, labels_B: torch.Tensor) -> torch.Tensor:
        flag = (labels_B == self.null_class).to(torch.float64) * NULL_FLAG
        return flag.view(-1, 1, 1).expand(-1, self.layout.token_counts[stage], self.width)

    def new_cache(self):
        return []

    def step(self, stage, labels_B, previous_BCHW, cache):
        if previous_BCHW is not None:
            self.inputs.append(previous_BCHW.clone())
        return self._condition(stage, labels_B)

    def forward(self, labels_B, maps, num_stages=None):
        count = num_stages or self.layout.num_stages
        if count > 1:
            self.inputs.append(maps[count - 2].clone())
        return torch.cat([self._condition(s, labels_B) for s in range(count)], dim=1)


class Oracle:
    """Installs closed-form velocities into a real E-CAR or flow-DiT; `targets[k]` is the single
    data latent (1, C, H, W) of condition k (0: the class, 1: the null class)."""

    def __init__(self, model, conditional, unconditional=None) -> None:
        self.model, self.layout = model, model.layout
        self.targets = (conditional, conditional if unconditional is None else unconditional)
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (stage, x, t) of every call
        if model.config.model.kind == "ecar":
            model.ar = StubAR(self.layout, model.null_class, model.config.model.width)
            model.flow.prepare_condition = lambda z: FlowCondition(additive=z)
            model.stage_velocity = self.ecar_velocity
        else:
            model.velocity = self.dit_velocity

    def velocity(self, stage, x_BCHW, t_B, is_null_B):
        start, end = self.layout.windows[stage]
        self.calls.append((stage, x_BCHW.clone(), t_B.clone()))
        target = torch.where(is_null_B.view(-1, 1, 1, 1), self.targets[1], self.targets[0])
        return stage_velocity(target, self.layout.grids, stage, start, end, x_BCHW, t_B)

    def ecar_velocity(self, stage, x_BCHW, t_B, condition):
        return self.velocity(stage, x_BCHW, t_B, condition.additive[:, 0, 0] == NULL_FLAG)

    def dit_velocity(self, x_BCHW, t_B, labels_B):
        return self.velocity(0, x_BCHW, t_B, labels_B == self.model.null_class)


def build(overrides, preset="ecar-debug"):
    torch.manual_seed(0)
    return build_model(get_config(preset, overrides)).double().eval()


def grids_for(stages: int, latent: int = 16) -> list[int]:
    return [latent // 2 ** (stages - 1 - i) for i in range(stages)]


def stage_overrides(stages: int, latent: int = 16, steps: int = 3) -> list[str]:
    return [
        f"model.latent_size={latent}",
        f"data.image_size={2 * latent}",
        f"stages.grids={grids_for(stages, latent)}",
        f"flow.steps_per_stage={[steps] * stages}",
    ]


def point(seed: int, channels: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_stages(model, batch=3, cfg=1.0, use_cache=True, seed=5):
    labels = torch.arange(batch) % model.config.model.num_classes
    sampling = dataclasses.replace(model.config.sampling, cfg_scale=cfg)
    return list(model.iter_stages(labels, sampling, torch.Generator().manual_seed(seed), use_cache=use_cache))


@pytest.mark.parametrize("stages", [2, 3, 4, 5])
@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("use_cache", [True, False])
def test_oracle_sampling_returns_the_data_point_and_exact_clean_maps(stages, correction, use_cache):
    model = build(
        stage_overrides(stages)
        + [f"stages.renoise_correction={str(correction).lower()}", "model.ar_next_input=clean_estimate"]
    )
    target = point(1)
    oracle = Oracle(model, target)
    results = run_stages(model, use_cache=use_cache)
    torch.testing.assert_close(results[-1].end_state, target.expand(3, -1, -1, -1), rtol=0, atol=1e-9)
    for result, grid in zip(results, model.layout.grids):
        torch.testing.assert_close(result.clean, flow.downsample(target, grid).expand(3, -1, -1, -1), rtol=0, atol=1e-9)
    # the AR was given exactly the clean maps of the earlier stages
    for given, result in zip(model.ar.inputs, results):
        torch.testing.assert_close(given, result.clean, rtol=0, atol=0)
    assert len(model.ar.inputs) == stages - 1
    # Euler's time grid: t_k = a + (k / K) (b - a), k = 0 .. K - 1, in every stage
    for s, (start, end) in enumerate(model.layout.windows):
        times = [float(t[0]) for stage, _, t in oracle.calls if stage == s]
        assert times == pytest.approx([start + k / 3 * (end - start) for k in range(3)], abs=1e-12)


def test_oracle_sampling_full_window_variant_returns_the_data_point():
    model = build(stage_overrides(3) + ["stages.full_window=true"])
    target = point(2)
    Oracle(model, target)
    results = run_stages(model)
    for result, grid in zip(results, model.layout.grids):
        torch.testing.assert_close(
            result.end_state, flow.downsample(target, grid).expand(3, -1, -1, -1), rtol=0, atol=1e-9
        )


def test_oracle_sampling_noisy_end_input_feeds_the_ar_the_end_state():
    model = build(stage_overrides(3) + ["model.ar_next_input=noisy_end"])
    target = point(3)
    Oracle(model, target)
    results = run_stages(model)
    torch.testing.assert_close(results[-1].end_state, target.expand(3, -1, -1, -1), rtol=0, atol=1e-9)
    for given, result in zip(model.ar.inputs, results):
        torch.testing.assert_close(given, result.end_state, rtol=0, atol=0)


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_oracle_flow_dit_returns_the_data_point(steps):
    model = build([f"flow.steps_per_stage=[{steps}]"], preset="dit-fmnist")
    target = point(4)
    oracle = Oracle(model, target)
    labels = torch.arange(3)
    out = model.generate(
        labels, dataclasses.replace(model.config.sampling, cfg_scale=1.0), torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out, target.expand(3, -1, -1, -1), rtol=0, atol=1e-9)
    assert [float(t[0]) for _, _, t in oracle.calls] == pytest.approx([k / steps for k in range(steps)], abs=1e-12)


@pytest.mark.parametrize("scale", [1.5, 3.0])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_oracle_cfg_follows_the_guided_combination_of_two_points(stages, scale):
    model = build(stage_overrides(stages) + ["model.ar_next_input=clean_estimate"])
    conditional, unconditional = point(10), point(11)
    Oracle(model, conditional, unconditional)
    results = run_stages(model, batch=2, cfg=scale)
    guided = unconditional + scale * (conditional - unconditional)
    torch.testing.assert_close(results[-1].end_state, guided.expand(2, -1, -1, -1), rtol=0, atol=1e-8)
    for result, grid in zip(results, model.layout.grids):
        torch.testing.assert_close(result.clean, flow.downsample(guided, grid).expand(2, -1, -1, -1), rtol=0, atol=1e-8)
    # under CFG the AR gets the clean map for the conditional and the unconditional rows alike
    for given, result in zip(model.ar.inputs, results):
        torch.testing.assert_close(given, torch.cat([result.clean, result.clean]), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1.5, 4.0])
def test_oracle_cfg_flow_dit(scale):
    model = build(["flow.steps_per_stage=[7]"], preset="dit-fmnist")
    conditional, unconditional = point(12), point(13)
    Oracle(model, conditional, unconditional)
    out = model.generate(
        torch.tensor([0, 5]),
        dataclasses.replace(model.config.sampling, cfg_scale=scale),
        torch.Generator().manual_seed(0),
    )
    guided = unconditional + scale * (conditional - unconditional)
    torch.testing.assert_close(out, guided.expand(2, -1, -1, -1), rtol=0, atol=1e-8)


def test_oracle_guidance_interval_guides_only_inside_it():
    """Guidance on in stage 3's window only: stages 1-2 follow the class alone, so the final stage
    (which ends at the data, from any start) lands on the guided point, and the clean estimate of
    stage 1 is the conditional point's map."""
    model = build(stage_overrides(3) + ["model.ar_next_input=clean_estimate"])
    conditional, unconditional = point(14), point(15)
    Oracle(model, conditional, unconditional)
    labels = torch.tensor([1, 2])
    sampling = dataclasses.replace(model.config.sampling, cfg_scale=2.0, guidance_interval=(0.5, 1.0))
    results = list(model.iter_stages(labels, sampling, torch.Generator().manual_seed(0)))
    guided = unconditional + 2.0 * (conditional - unconditional)
    torch.testing.assert_close(
        results[0].clean, flow.downsample(conditional, 4).expand(2, -1, -1, -1), rtol=0, atol=1e-8
    )
    torch.testing.assert_close(results[-1].end_state, guided.expand(2, -1, -1, -1), rtol=0, atol=1e-8)


# ----- the start distribution of every stage, through the real sampler -----------------------
@pytest.mark.parametrize("grids,latent", [((4, 8, 16), 16), ((2, 8), 8), ((2, 4, 16), 16), ((4, 12), 12), ((3, 9), 9)])
def test_sampler_starts_every_stage_from_the_training_start_distribution(grids, latent):
    """Zero-signal oracle (F = 0): the state each stage s > 1 starts from must be i.i.d. noise of
    std 1 - a_s, as in training, also across up-sampling blocks of any factor."""
    overrides = [
        f"model.latent_size={latent}",
        f"data.image_size={2 * latent}",
        f"stages.grids={list(grids)}",
        f"flow.steps_per_stage={[2] * len(grids)}",
        "model.patch_size=1",
    ]
    model = build(overrides)
    oracle = Oracle(model, torch.zeros(1, 4, latent, latent, dtype=torch.float64))
    batch = 2048 if latent <= 9 else 512
    run_stages(model, batch=batch, seed=21)
    for s in range(1, len(grids)):
        start = model.layout.starts[s]
        first_x = next(x for stage, x, _ in oracle.calls if stage == s)
        factor = grids[s] // grids[s - 1]
        assert first_x.std().item() == pytest.approx(1.0 - start, rel=0.02), f"stage {s} std"
        # correlation between the values of one up-sampling block (first row, first two columns;
        # and first and last cell), and between neighbouring blocks
        tiles = first_x.unfold(2, factor, factor).unfold(3, factor, factor)  # B C h w f f
        cells = tiles.reshape(*tiles.shape[:4], -1)
        pairs = [(0, 1), (0, factor * factor - 1)]
        for i, j in pairs:
            rho = torch.corrcoef(torch.stack([cells[..., i].flatten(), cells[..., j].flatten()]))[0, 1]
            assert abs(rho.item()) < 0.03, f"stage {s}: cells {i},{j} of a {factor}x{factor} block correlate {rho:.3f}"


# ----- training sees what sampling sees ------------------------------------------------------
class RecordingAR(torch.nn.Module):
    """Records the maps the teacher-forced AR pass is given; returns a zero condition."""

    def __init__(self, layout: StageLayout, width: int) -> None:
        super().__init__()
        self.layout, self.width, self.maps = layout, width, []

    def forward(self, labels_B, maps, num_stages=None):
        self.maps = [m.clone() for m in maps]
        return torch.zeros(labels_B.shape[0], self.layout.total_tokens, self.width, dtype=maps[0].dtype)


def start_statistics(start_BCHW, ar_input_BCHW):
    """(std of the start state, regression slope of the start state on the up-sampled AR input)."""
    up = flow.upsample(ar_input_BCHW, start_BCHW.shape[-1])
    slope = (start_BCHW * up).mean() / (up * up).mean()
    return start_BCHW.std().item(), slope.item()


def test_noisy_end_training_pairs_ar_input_and_next_start_as_sampling_does():
    """Under `ar_next_input=noisy_end` the AR's input and the next stage's start share their noise
    in training exactly as they do at sampling (zero-signal data, so both are pure noise)."""
    model = build(["model.ar_next_input=noisy_end", "flow.steps_per_stage=[2,2,2]"])
    batch, channels, size = 2048, 4, model.config.model.latent_size
    # training: tau = 0 makes the flow's input the start state itself
    recorder = RecordingAR(model.layout, model.config.model.width)
    model.ar = recorder
    starts: dict[int, torch.Tensor] = {}

    def record_start(stage, x_BCHW, t_B, condition):
        starts[stage] = x_BCHW.clone()
        return torch.zeros_like(x_BCHW)

    model.stage_velocity = record_start
    model.sample_tau = lambda n, device, generator: torch.zeros(n, dtype=torch.float64)
    model.train()
    model.loss(
        torch.zeros(batch, channels, size, size, dtype=torch.float64),
        torch.zeros(batch, dtype=torch.long),
        torch.Generator().manual_seed(0),
    )
    training = [start_statistics(starts[s], recorder.maps[s - 1]) for s in (1, 2)]
    # sampling: the zero-signal oracle through the real stage iteration
    sampler = build(["model.ar_next_input=noisy_end", "flow.steps_per_stage=[2,2,2]"])
    oracle = Oracle(sampler, torch.zeros(1, channels, size, size, dtype=torch.float64))
    run_stages(sampler, batch=batch, seed=1)
    firsts = {s: next(x for stage, x, _ in oracle.calls if stage == s) for s in (1, 2)}
    sampling = [start_statistics(firsts[s], sampler.ar.inputs[s - 1]) for s in (1, 2)]
    for s, ((train_std, train_slope), (sample_std, sample_slope)) in enumerate(zip(training, sampling), start=1):
        assert train_std == pytest.approx(1.0 - model.layout.starts[s], rel=0.01)
        assert train_std == pytest.approx(sample_std, rel=0.01)
        assert train_slope == pytest.approx(sample_slope, abs=0.01)
        assert train_slope > 0.2  # the AR input and the start really share noise
    # and the AR was given the previous stage's noisy end state, not the clean map (here zero)
    assert all(m.std() > 0.1 for m in recorder.maps[:-1])
