"""The plain-torch training loop, LR schedule, EMA and DeepSpeed config: no Ray, no DeepSpeed."""

import math

import pytest
import torch

from ecar.config import ConfigError
from ecar.models import build_model
from ecar.presets import get_config
from ecar.train.deepspeed_config import deepspeed_config
from ecar.train.ema import EMA
from ecar.train.loop import NonFiniteLossError, TorchBackend, TrainState, train
from ecar.train.schedule import lr_at

pytestmark = pytest.mark.unit


def _config(*overrides):
    return get_config(
        "ecar-debug",
        [
            "train.num_workers=1",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            "train.steps=6",
            "train.log_every=2",
            *overrides,
        ],
    )


def _data(rows=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(rows, 4, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (rows,), generator=generator)

    def open_epoch(epoch, batch=4):
        # a different but reproducible order per epoch, like the Ray reader's seeded shuffle
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(100 + epoch))
        for start in range(0, rows - batch + 1, batch):
            index = order[start : start + batch]
            yield latents[index], labels[index]

    return open_epoch


def _run(config, state=None, open_epoch=None, steps=None, model_seed=0, backend_state=None):
    torch.manual_seed(model_seed)
    model = build_model(config)
    backend = TorchBackend(model, config.train)
    if backend_state is not None:
        backend.module.load_state_dict(backend_state["module"])
        backend.optimizer.load_state_dict(backend_state["optimizer"])
    ema = EMA(backend.ema_sources(), config.train.ema_decay)
    if backend_state is not None:
        ema.load_state_dict(backend_state["ema"])
    logged = []
    state = train(
        backend,
        config,
        open_epoch or _data(),
        state or TrainState(),
        ema,
        on_step=lambda s, due, m: logged.append((s.step, m)),
    )
    return backend, ema, state, logged


def test_warmup_then_cosine_reaches_min_lr_and_constant_stays():
    train = _config("train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1").train
    assert lr_at(0, train) == pytest.approx(0.1)
    assert lr_at(9, train) == pytest.approx(1.0)
    assert lr_at(10, train) == pytest.approx(1.0)
    assert lr_at(55, train) == pytest.approx(0.55)
    assert lr_at(100, train) == pytest.approx(0.1)
    values = [lr_at(s, train) for s in range(10, 101)]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    constant = _config("train.lr_schedule=constant", "train.warmup_steps=0", "train.lr=0.5").train
    assert {lr_at(s, constant) for s in (0, 5, 1000)} == {0.5}


def test_ema_follows_the_closed_form():
    weight = torch.zeros(3)
    ema = EMA([("w", weight)], decay=0.9)
    for _ in range(5):
        weight += 1.0
        ema.update([("w", weight)])
    expected = sum(0.1 * 0.9 ** (5 - k) * k for k in range(1, 6))
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), expected))
    with pytest.raises(KeyError):
        ema.load_state_dict({"other": torch.zeros(3)})


def test_deepspeed_config_checks_the_batch_identity_and_maps_every_option():
    config = _config(
        "train.num_workers=2",
        "train.global_batch_size=32",
        "train.micro_batch_size=4",
        "train.zero_stage=3",
        "train.precision=bf16",
        "train.grad_clip=0.5",
    )
    ds = deepspeed_config(config, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == ds["train_batch_size"] == 32
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert "bf16" not in deepspeed_config(_config(), world_size=1)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        deepspeed_config(config, world_size=3)


def test_loss_falls_and_metrics_are_logged_every_n_steps():
    config = _config("train.steps=30", "train.log_every=10", "train.lr=3e-3", "train.warmup_steps=0")
    backend, ema, state, logged = _run(config, open_epoch=_data(rows=8))
    metrics = [m for _, m in logged if m is not None]
    assert [s for s, m in logged if m is not None] == [10, 20, 30]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert {
        "loss",
        "loss_stage0",
        "loss_stage2",
        "grad_norm",
        "lr",
        "samples_per_s_per_worker",
        "tokens_per_s_per_worker",
        "data_wait_fraction",
    } <= set(metrics[0])
    assert 0.0 <= metrics[0]["data_wait_fraction"] < 1.0
    assert state.step == 30 and state.epoch == 29  # 8 rows = one step of 2 micro-batches per epoch
    # the EMA lags the weights
    weights = dict(backend.ema_sources())
    assert any(not torch.equal(ema.shadow[n], weights[n].detach()) for n in weights)


def test_resume_from_a_saved_state_continues_exactly():
    config = _config("train.steps=6")
    full_backend, full_ema, full_state, full_logged = _run(config)
    # stop after 2 steps (mid-epoch), "checkpoint" and continue from a differently seeded model
    short = _config("train.steps=2")
    backend, ema, state, _ = _run(short)
    saved = {
        "module": backend.module.state_dict(),
        "optimizer": backend.optimizer.state_dict(),
        "ema": ema.state_dict(),
    }
    resumed = TrainState.from_dict(state.to_dict())
    assert (resumed.step, resumed.epoch, resumed.batches_in_epoch) == (2, 0, 4)
    backend2, ema2, state2, logged2 = _run(config, state=resumed, model_seed=123, backend_state=saved)
    assert state2.to_dict() == full_state.to_dict()
    for name, tensor in full_backend.module.state_dict().items():
        torch.testing.assert_close(backend2.module.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    for name, tensor in full_ema.shadow.items():
        torch.testing.assert_close(ema2.shadow[name], tensor, rtol=1e-5, atol=1e-6)
    assert logged2[-1][1]["loss"] == pytest.approx(full_logged[-1][1]["loss"], rel=1e-5)


def _poisoned(open_epoch, bad_batch):
    def poisoned(epoch):
        for index, (latents, labels) in enumerate(open_epoch(epoch)):
            if epoch == 0 and index == bad_batch:
                latents = latents.clone()
                latents[0, 0, 0, 0] = float("nan")
            yield latents, labels

    return poisoned


def test_nonfinite_loss_raises_before_touching_the_weights():
    config = _config()
    torch.manual_seed(0)
    model = build_model(config)
    backend = TorchBackend(model, config.train)
    before = {k: v.clone() for k, v in backend.module.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="train.nonfinite_loss=skip"):
        train(backend, config, _poisoned(_data(), 0), TrainState(), EMA(backend.ema_sources(), 0.9))
    for name, tensor in backend.module.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_nonfinite_loss_skip_counts_and_keeps_weights_finite():
    config = _config("train.nonfinite_loss=skip")
    backend, ema, state, logged = _run(config, open_epoch=_poisoned(_data(), 1))
    assert state.nonfinite_skipped == 1 and state.step == 6
    assert all(torch.isfinite(p).all() for p in backend.module.parameters())
    assert all(math.isfinite(m["loss"]) for _, m in logged if m)
    assert logged[-1][1]["nonfinite_skipped"] == 1.0


def test_activation_checkpointing_keeps_loss_gradients_and_parameter_names():
    from ecar.train.engine import enable_activation_checkpointing

    config = _config()
    latents, labels = torch.randn(4, 4, 8, 8), torch.arange(4)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model(config)
        names = [name for name, _ in model.named_parameters()]
        if checkpointed:
            assert enable_activation_checkpointing(model) == config.model.ar_depth + config.model.flow_depth
        loss = model.loss(latents, labels, torch.Generator().manual_seed(1))["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, names))
    (loss_a, grads_a, names_a), (loss_b, grads_b, names_b) = results
    assert names_a == names_b
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)


def test_validation_loss_is_fixed_for_fixed_weights_and_falls_with_training(tmp_path):
    from ecar.train.monitors import Validator
    from ecar.train.preflight import prepare_source
    from ecar.train.synthetic import write_synthetic_latents

    config = _config("train.steps=30", "train.lr=3e-3", "train.val_rows=32")
    latents = write_synthetic_latents(str(tmp_path / "latents"), rows=64, shards=2, test_rows=40)
    source = prepare_source(config, latents)
    assert (source.val_split, source.val_rows) == ("test", 32)

    torch.manual_seed(0)
    backend = TorchBackend(build_model(config), config.train)
    validator = Validator(config, source, rank=0, world_size=1)
    before = validator(backend)
    assert validator(backend) == before  # the same rows and noise every time
    assert set(before) == {"val_loss", "val_loss_stage0", "val_loss_stage1", "val_loss_stage2"}
    train(backend, config, _data(), TrainState(), EMA(backend.ema_sources(), config.train.ema_decay))
    assert validator(backend)["val_loss"] < before["val_loss"]


def test_no_validation_split_turns_validation_off(tmp_path):
    from ecar.train.preflight import prepare_source
    from ecar.train.synthetic import write_synthetic_latents

    latents = write_synthetic_latents(str(tmp_path / "latents"), rows=64, shards=2, test_rows=0)
    assert prepare_source(_config(), latents).val_rows == 0
    assert (
        prepare_source(
            _config("train.val_rows=0"), write_synthetic_latents(str(tmp_path / "other"), rows=64, shards=2)
        ).val_rows
        == 0
    )


def test_a_relative_manifest_path_still_reads_from_the_workers_folders(tmp_path, monkeypatch):
    """Workers run in Ray's own folders: the manifest the driver read (and hands to them) must
    name its shards by absolute paths even when the user gave a relative one."""
    from ecar.train.monitors import Validator
    from ecar.train.preflight import prepare_source
    from ecar.train.synthetic import write_synthetic_latents

    config = _config("train.val_rows=16")
    monkeypatch.chdir(tmp_path)
    write_synthetic_latents("latents", rows=32, shards=2, test_rows=16)
    summary = prepare_source(config, "latents")
    assert summary.manifest["prefix"] == str(tmp_path / "latents")
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    torch.manual_seed(0)
    values = Validator(config, summary, rank=0, world_size=1)(TorchBackend(build_model(config), config.train))
    assert values["val_loss"] > 0
