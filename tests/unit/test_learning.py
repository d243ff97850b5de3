"""Learning checks on real data: Fashion-MNIST images through a small tokenizer trained here,
then E-CAR and the flow-DiT trained through the real loop must lower their held-out loss; and
the training-time switches (label dropout, per-stage loss weights, logit-normal times) do what
they say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ecar.data.sources import FashionMNISTSource
from ecar.models import build_model
from ecar.presets import get_config
from ecar.tokenizer.vae import KLVAE, vae_shape
from ecar.train.ema import EMA
from ecar.train.loop import TorchBackend, TrainState, train

pytestmark = pytest.mark.unit

TRAIN_ROWS, HELD_OUT_ROWS, BATCH = 1024, 256, 32


def fashion_mnist(split: str, rows: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `rows` images of a split at size x size in [-1, 1], and their labels."""
    source = FashionMNISTSource()
    records = list(source.load(split, source.keys(split)[:rows]))
    images = torch.stack([torch.tensor(r.image, dtype=torch.float32) for r in records])
    images = images.reshape(rows, 1, 28, 28) / 127.5 - 1.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images, torch.tensor([r.label for r in records])


@pytest.fixture(scope="module")
def real_latents():
    """(train latents, train labels, held-out latents, held-out labels): Fashion-MNIST encoded by a
    KL-VAE trained here for 80 steps, scaled to unit standard deviation as the encode job does."""
    config = get_config("ecar-debug")
    torch.manual_seed(0)
    vae = KLVAE(vae_shape(config))
    images, labels = fashion_mnist("train", TRAIN_ROWS, config.data.image_size)
    held_images, held_labels = fashion_mnist("test", HELD_OUT_ROWS, config.data.image_size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    first = None
    for _ in range(80):
        batch = images[torch.randint(0, TRAIN_ROWS, (64,), generator=generator)]
        reconstruction, kl = vae(batch)
        loss = (reconstruction - batch).abs().mean() + 1e-6 * kl / 256
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < 0.5 * first, "the tokenizer itself did not learn"
    with torch.no_grad():
        latents, held = vae.encode(images), vae.encode(held_images)
    scale = 1.0 / latents.std()
    return latents * scale, labels, held * scale, held_labels


def held_out_loss(model, latents, labels) -> float:
    """Mean flow loss over the held-out set with fixed noise and times (no label dropout)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for index, start in enumerate(range(0, latents.shape[0], 64)):
            generator = torch.Generator().manual_seed(1000 + index)
            total += float(model.loss(latents[start : start + 64], labels[start : start + 64], generator)["loss"])
    model.train()
    return total / (latents.shape[0] // 64)


def fit(model, config, latents, labels):
    backend = TorchBackend(model, config.train)
    ema = EMA(backend.ema_sources(), config.train.ema_decay)

    def open_epoch(epoch):
        order = torch.randperm(latents.shape[0], generator=torch.Generator().manual_seed(epoch))
        for start in range(0, latents.shape[0] - BATCH + 1, BATCH):
            yield latents[order[start : start + BATCH]], labels[order[start : start + BATCH]]

    train(backend, config, open_epoch, TrainState(), ema)


@pytest.mark.parametrize("kind", ["ecar", "dit"])
def test_training_on_real_latents_lowers_the_held_out_loss(real_latents, kind):
    latents, labels, held, held_labels = real_latents
    overrides = [
        "train.num_workers=1",
        f"train.global_batch_size={BATCH}",
        f"train.micro_batch_size={BATCH}",
        "train.steps=60",
        "train.warmup_steps=5",
        "train.lr=2e-3",
        "train.log_every=60",
    ]
    if kind == "dit":
        overrides += ["model.kind=dit", "stages.grids=[8]", "flow.steps_per_stage=[4]", "model.flow_depth=3"]
    config = get_config("ecar-debug", overrides)
    torch.manual_seed(0)
    model = build_model(config)
    before = held_out_loss(model, held, held_labels)
    fit(model, config, latents, labels)
    after = held_out_loss(model, held, held_labels)
    # at initialisation the zero-initialised output predicts v = 0 (loss ~ E|target|^2)
    assert after < 0.75 * before, f"{kind}: held-out loss {before:.4f} -> {after:.4f}"


# ----- the training switches ------------------------------------------------------------------
class Recorded(Exception):
    """Stops a loss computation once the AR has been given its labels."""


def recording_ar(model):
    """Make the AR record the labels it is given, then stop the loss (the flow is not needed)."""
    seen = []

    def record(labels_B, maps, num_stages=None):
        seen.append(labels_B.clone())
        raise Recorded

    model.ar.forward = record
    return seen


def labels_given_to_the_ar(model, latents, labels):
    seen = recording_ar(model)
    with pytest.raises(Recorded):
        model.loss(latents, labels, torch.Generator().manual_seed(0))
    return seen[-1]


@pytest.mark.parametrize("probability", [0.0, 0.1, 0.5])
def test_label_dropout_replaces_that_share_of_labels_by_the_null_class_in_training_only(probability):
    model = build_model(get_config("ecar-debug", [f"model.class_dropout={probability}"]))
    latents, labels = torch.randn(4000, 4, 8, 8), torch.randint(0, 10, (4000,))
    model.train()
    given = labels_given_to_the_ar(model, latents, labels)
    dropped = given == model.null_class
    assert dropped.float().mean().item() == pytest.approx(probability, abs=0.025)
    assert torch.equal(given[~dropped], labels[~dropped])  # the others keep their class
    model.eval()
    assert torch.equal(labels_given_to_the_ar(model, latents, labels), labels)


@pytest.mark.parametrize("weights,trained", [([1, 0, 0], 0), ([0, 1, 0], 1), ([0, 0, 1], 2)])
def test_stage_loss_weights_select_what_trains(weights, trained):
    """One-hot weights: the total is that stage's loss, and only that stage's embedding (and,
    for stage 0, none of the AR's map-input projection) receives a gradient; equal weights: the mean."""
    latents, labels = torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,))
    torch.manual_seed(0)
    model = build_model(get_config("ecar-debug", [f"stages.loss_weights={weights}"]))
    with torch.no_grad():  # give the zero-initialised layers weight, so every parameter has a gradient path
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    losses = model.loss(latents, labels, torch.Generator().manual_seed(0))
    assert float(losses["loss"].detach()) == pytest.approx(float(losses[f"loss_stage{trained}"]))
    losses["loss"].backward()
    embedding = model.flow_stage_embed.weight.grad
    for stage in range(3):
        assert (torch.count_nonzero(embedding[stage]) > 0) == (stage == trained), f"stage {stage}"
    # the AR's projection of the previous map feeds stages 1 and 2 only
    assert (torch.count_nonzero(model.ar.input_proj.weight.grad) > 0) == (trained > 0)
    equal = build_model(get_config("ecar-debug")).loss(latents, labels, torch.Generator().manual_seed(0))
    assert float(equal["loss"]) == pytest.approx(sum(float(equal[f"loss_stage{s}"]) for s in range(3)) / 3)


def test_ecar_fmnist_trains_its_last_stage_hardest_for_any_stage_count():
    """The preset's loss weights 1, 2, 4 (the headline's ablation): the total is that weighted mean
    of the stage losses; the rule carries over to other stage counts (sweeps, ablations), and
    explicit weights win over it."""
    config = get_config("ecar-fmnist")
    assert config.stages.stage_loss_weights() == (1.0, 2.0, 4.0)
    two = config.override({"stages.grids": [8, 16], "flow.steps_per_stage": [10, 10]})
    assert two.stages.stage_loss_weights() == (1.0, 2.0)
    assert config.override({"stages.loss_weights": [1, 1, 1]}).stages.stage_loss_weights() == (1.0, 1.0, 1.0)
    assert get_config("ecar-debug").stages.stage_loss_weights() == (1.0, 1.0, 1.0)  # the rule's default: equal

    torch.manual_seed(0)
    model = build_model(get_config("ecar-debug", ["stages.loss_weight_growth=2"]))
    latents, labels = torch.randn(8, 4, 8, 8), torch.randint(0, 10, (8,))
    losses = model.loss(latents, labels, torch.Generator().manual_seed(0))
    stages = [float(losses[f"loss_stage{s}"]) for s in range(3)]
    assert float(losses["loss"]) == pytest.approx((stages[0] + 2 * stages[1] + 4 * stages[2]) / 7)


@pytest.mark.parametrize("mean", [-1.0, 0.0, 1.0])
def test_logit_normal_time_sampling_shifts_the_training_times(mean):
    """The model's training times follow the configured distribution: logit-normal times have
    median sigmoid(mean) and put more mass mid-path than uniform ones."""
    model = build_model(get_config("ecar-debug", ["flow.time_sampling=logit_normal", f"flow.logit_normal_mean={mean}"]))
    tau = model.sample_tau(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert tau.median().item() == pytest.approx(torch.sigmoid(torch.tensor(mean)).item(), abs=0.01)
    uniform = build_model(get_config("ecar-debug")).sample_tau(
        20000, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    assert uniform.median().item() == pytest.approx(0.5, abs=0.01)
    if mean == 0.0:
        middle = ((tau > 0.25) & (tau < 0.75)).float().mean().item()
        assert middle == pytest.approx(0.726, abs=0.01)  # P(|N(0,1)| < logit(0.75) = 1.0986)
