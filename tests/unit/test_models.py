import pytest
import torch

from ecar import flow
from ecar.models import ECAR, FlowDiT, build_model
from ecar.presets import get_config

pytestmark = pytest.mark.unit


def tiny(overrides=(), preset="ecar-debug"):
    torch.manual_seed(0)
    return build_model(get_config(preset, list(overrides))).eval()


def labels(n=3):
    return torch.arange(n) % 10


@pytest.mark.parametrize("injection", ["spatial_adaln", "additive", "cross_attention"])
def test_kv_cache_sampling_equals_uncached_sampling(injection):
    model = tiny([f"model.condition_injection={injection}", "model.ar_depth=2"])
    # perturb the zero-initialised layers so that every path carries signal
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cached = [r.end_state for r in model.iter_stages(labels(), generator=torch.Generator().manual_seed(3))]
    uncached = [
        r.end_state for r in model.iter_stages(labels(), generator=torch.Generator().manual_seed(3), use_cache=False)
    ]
    assert len(cached) == len(uncached) == model.layout.num_stages
    for a, b in zip(cached, uncached):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("stages", [2, 3, 4, 5])
def test_generate_is_deterministic_and_shaped_for_two_to_five_stages(stages):
    grids = [2 ** (6 - stages + i) for i in range(stages)]  # ending at 32
    overrides = [
        "model.latent_size=32",
        "data.image_size=64",
        f"stages.grids={grids}",
        f"flow.steps_per_stage={[2] * stages}",
    ]
    model = tiny(overrides)
    first = model.generate(labels(), generator=torch.Generator().manual_seed(7))
    second = model.generate(labels(), generator=torch.Generator().manual_seed(7))
    assert first.shape == (3, 4, 32, 32)
    assert torch.equal(first, second)
    assert not torch.equal(first, model.generate(labels(), generator=torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("preset", ["ecar-debug", "ecar-fmnist", "dit-fmnist"])
def test_generate_shape_for_presets(preset):
    model = tiny(["flow.steps_per_stage=[1,1,1]" if "ecar" in preset else "flow.steps_per_stage=[2]"], preset)
    size, channels = model.config.model.latent_size, model.config.model.latent_channels
    assert model.generate(labels(2), generator=torch.Generator().manual_seed(0)).shape == (2, channels, size, size)


@pytest.mark.parametrize("preset", ["ecar-b", "ecar-l", "ecar-xl", "dit-s-2", "dit-b-2", "dit-l-2", "dit-xl-2"])
def test_large_presets_build_and_generate_on_the_meta_device(preset):
    config = get_config(preset)
    with torch.device("meta"):
        model = build_model(config).eval()
        out = model.generate(torch.zeros(1, dtype=torch.long), steps_per_stage=(1,) * len(config.stages.grids))
    size = config.model.latent_size
    assert out.shape == (1, config.model.latent_channels, size, size)


def test_ecar_parameter_counts_sit_near_their_dit_counterparts():
    def params(name):
        with torch.device("meta"):
            return sum(p.numel() for p in build_model(get_config(name)).parameters())

    for ecar, dit in [("ecar-b", "dit-b-2"), ("ecar-l", "dit-l-2"), ("ecar-xl", "dit-xl-2")]:
        assert abs(params(ecar) / params(dit) - 1) < 0.05


def test_per_sample_generators_give_the_same_image_in_any_batch():
    model = tiny()
    seeds = [11, 12, 13]
    batch = model.generate(torch.tensor([1, 2, 3]), generator=[torch.Generator().manual_seed(s) for s in seeds])
    alone = model.generate(torch.tensor([2]), generator=[torch.Generator().manual_seed(12)])
    assert torch.allclose(batch[1:2], alone, atol=1e-5)


def test_loss_reports_total_and_every_stage():
    model = tiny().train()
    latents = torch.randn(4, 4, 8, 8)
    out = model.loss(latents, labels(4))
    assert set(out) == {"loss", "loss_stage0", "loss_stage1", "loss_stage2"}
    assert torch.isclose(out["loss"], (out["loss_stage0"] + out["loss_stage1"] + out["loss_stage2"]) / 3)


@pytest.mark.parametrize("next_input", ["noisy_end", "clean_estimate"])
def test_the_ar_gets_the_true_loss_gradient_once_the_zero_initialised_layers_moved(next_input):
    """At initialisation the AR's gradients are exactly zero: the flow reads its condition
    through zero-initialised layers. After three optimiser steps every AR parameter has a
    gradient, and it is the loss's: a step along it changes the loss by its norm (central
    difference, float64). A detached AR output leaves no gradient at all."""
    model = tiny([f"model.ar_next_input={next_input}"]).train().double()
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss():
        return model.loss(latents, labels(4), torch.Generator().manual_seed(2))["loss"]  # fixed draws

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    optimizer.zero_grad()
    loss().backward()
    named = list(model.ar.named_parameters())
    silent = [name for name, p in named if p.grad is None or not p.grad.abs().max() > 0]
    assert named and not silent, f"AR parameters without a gradient: {silent}"
    parameters = [p for _, p in named]
    gradients = [p.grad.clone() for p in parameters]
    norm = torch.sqrt(sum(g.pow(2).sum() for g in gradients))
    h = 1e-4
    with torch.no_grad():
        for p, g in zip(parameters, gradients):
            p.add_(h * g / norm)
        up = loss()
        for p, g in zip(parameters, gradients):
            p.sub_(2 * h * g / norm)
        down = loss()
    assert ((up - down) / (2 * h)).item() == pytest.approx(norm.item(), rel=1e-4)


def test_full_window_variant_trains_and_samples():
    model = tiny(["stages.full_window=true"]).train()
    assert model.layout.windows == ((0.0, 1.0),) * 3
    model.loss(torch.randn(2, 4, 8, 8), labels(2))["loss"].backward()
    assert model.eval().generate(labels(2)).shape == (2, 4, 8, 8)


def test_noisy_end_next_input_option_samples():
    assert tiny(["model.ar_next_input=noisy_end"]).generate(labels(2)).shape == (2, 4, 8, 8)


def test_unguided_sampling_skips_the_unconditional_pass():
    model = tiny(["sampling.cfg_scale=1.0"])
    seen = []
    handle = model.flow.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    model.generate(labels(3))
    handle.remove()
    assert set(seen) == {3}
    guided = tiny(["sampling.cfg_scale=2.0", "sampling.guidance_interval=[0.5,1.0]"])
    seen.clear()
    handle = guided.flow.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    guided.generate(labels(3))
    handle.remove()
    assert set(seen) == {3, 6}  # unguided below t = 0.5, guided pairs above


@pytest.mark.parametrize("preset", ["ecar-debug", "dit-debug"])
def test_a_tiny_model_overfits_a_handful_of_latents(preset):
    """With the noise and times fixed, the objective is deterministic and a working model
    (gradients through AR and flow) drives it down by more than 10x."""
    overrides = ["model.class_dropout=0.0"]
    if preset == "dit-debug":
        preset, overrides = "ecar-debug", overrides + ["model.kind=dit", "stages.grids=[8]", "flow.steps_per_stage=[4]"]
    model = tiny(overrides, preset).train()
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(100))
    classes = torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(250):
        loss = model.loss(latents, classes, generator=torch.Generator().manual_seed(0))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < losses[0] / 10
    assert isinstance(model, FlowDiT if "kind=dit" in " ".join(overrides) else ECAR)


@pytest.mark.parametrize("grids", [(2, 4, 8), (4, 8)])
def test_flow_positions_are_in_units_of_the_finest_token_grid(grids):
    """Token centres are counted in finest-grid tokens: the last stage's tokens sit at 0..G-1,
    and a coarse token sits at the mean of the fine tokens it covers (so they share a position)."""
    from ecar.models.blocks import sincos_embedding_2d

    overrides = {"stages.grids": list(grids), "model.latent_size": grids[-1], "flow.steps_per_stage": [2] * len(grids)}
    model = build_model(get_config("ecar-debug", overrides))
    width, finest = model.config.model.width, model.layout.token_grids[-1]
    for grid in model.layout.token_grids:
        assert torch.equal(model.flow.positions(grid, torch.device("cpu")), sincos_embedding_2d(width, grid, finest))
    # the finest stage at integer coordinates: position (0, 1) is embed(0) | embed(1)
    first_row = model.flow.positions(finest, torch.device("cpu"))[1]
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    expected = torch.cat([torch.zeros_like(frequencies).sin(), torch.zeros_like(frequencies).cos(),
                          frequencies.sin(), frequencies.cos()]).float()  # fmt: skip
    assert torch.allclose(first_row, expected, atol=1e-6)


def test_given_end_states_replace_the_first_stages_and_condition_the_rest():
    """The per-stage diagnostic (benchmarks/stages.py): stages given real end states, built as
    training builds them, are taken as they are; the stages after them read them through the AR."""
    model = tiny(["model.ar_next_input=noisy_end", "model.ar_depth=2"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    maps = flow.token_maps(latents, model.layout.grids)
    ends = []
    for s in range(model.layout.num_stages - 1):
        ends.append(model.stage_path(s, maps, ends, torch.Generator().manual_seed(2))[1])

    def run(given):
        return [
            r.end_state
            for r in model.iter_stages(labels(), generator=torch.Generator().manual_seed(3), given_ends=given)
        ]

    plain, none_given = run(()), run([])
    one, two = run(ends[:1]), run(ends[:2])
    assert all(torch.equal(a, b) for a, b in zip(plain, none_given))
    assert torch.equal(one[0], ends[0]) and torch.equal(two[0], ends[0]) and torch.equal(two[1], ends[1])
    # what follows a given stage is generated from it, not from the sampler's own stage
    assert not torch.allclose(one[1], plain[1]) and not torch.allclose(two[2], one[2])
    with pytest.raises(ValueError, match="noisy_end"):
        next(tiny(["model.ar_next_input=clean_estimate"]).iter_stages(labels(), given_ends=ends[:1]))
