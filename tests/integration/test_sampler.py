"""Batch sampling on a local Ray cluster: determinism across pool sizes, exact-count re-runs."""

import numpy as np
import pytest
import torch

from ecar.config import ConfigError
from ecar.export import save_exported
from ecar.models import build_model
from ecar.presets import get_config
from ecar.sampler import existing_shards, read_samples, sample_to_storage
from ecar.seeds import derived_seed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = get_config("ecar-debug", ["flow.steps_per_stage=[2,2,2]"])
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():  # move off the zero-initialised outputs so samples depend on the rows
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    uri = str(tmp_path_factory.mktemp("export") / "ema")
    save_exported(model.state_dict(), config, uri, latent_scale=0.5)
    return uri


def test_row_seeds_are_distinct_and_stable():
    seeds = {derived_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert derived_seed(3, 7) == derived_seed(3, 7) != derived_seed(4, 7)


def test_samples_are_the_same_at_any_pool_or_batch_size(ray_cluster, checkpoint, tmp_path):
    one = sample_to_storage(
        checkpoint, str(tmp_path / "one"), 10, shard_size=4, batch_size=4, actors=1, cpus_per_actor=0.5
    )
    two = sample_to_storage(
        checkpoint, str(tmp_path / "two"), 10, shard_size=3, batch_size=2, actors=2, cpus_per_actor=0.5
    )
    assert one["num_images"] == two["num_images"] == 10
    a, b = read_samples(str(tmp_path / "one"), "latents"), read_samples(str(tmp_path / "two"), "latents")
    assert np.array_equal(a["index"], np.arange(10)) and np.array_equal(b["index"], np.arange(10))
    assert np.array_equal(a["label"], np.arange(10) % 10)
    np.testing.assert_allclose(a["latents"].astype(np.float32), b["latents"].astype(np.float32), atol=2e-3)
    assert not np.allclose(a["latents"][0], a["latents"][1])


def test_a_rerun_after_failure_fills_only_the_missing_shards(ray_cluster, checkpoint, tmp_path):
    out = tmp_path / "run"
    sample_to_storage(checkpoint, str(out), 12, shard_size=4, batch_size=4, cpus_per_actor=0.5)
    shards = sorted((out / "shards").iterdir())
    assert len(shards) == 3
    # a job killed half-way: one shard never written, no manifest, a stale partial file
    shards[1].unlink()
    (out / "manifest.json").unlink()
    (out / "shards" / f".{shards[1].name}.1234.partial").write_bytes(b"half")
    kept = {path.name: path.stat().st_mtime_ns for path in (shards[0], shards[2])}
    manifest = sample_to_storage(checkpoint, str(out), 12, shard_size=4, batch_size=4, cpus_per_actor=0.5)
    assert {path: (out / "shards" / path).stat().st_mtime_ns for path in kept} == kept
    samples = read_samples(str(out), "latents")
    assert len(samples["index"]) == manifest["num_images"] == 12
    assert len(set(samples["index"].tolist())) == 12
    assert existing_shards(str(out)) == {s["name"] for s in manifest["shards"]}


def test_a_different_run_into_the_same_output_is_refused(ray_cluster, checkpoint, tmp_path):
    out = str(tmp_path / "run")
    sample_to_storage(checkpoint, out, 4, ["flow.steps_per_stage=[1,1,1]"], shard_size=4, cpus_per_actor=0.5)
    with pytest.raises(ValueError, match="differs in overrides"):
        sample_to_storage(checkpoint, out, 4, ["flow.steps_per_stage=[2,2,2]"], shard_size=4)


def test_only_sampling_keys_may_change_at_sampling_time(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="model.width"):
        sample_to_storage(checkpoint, str(tmp_path / "x"), 4, ["model.width=32"])
    with pytest.raises(ConfigError, match="sampling.cfg_scale"):
        sample_to_storage(checkpoint, str(tmp_path / "x"), 4, ["sampling.cfg_scale=-1"])
