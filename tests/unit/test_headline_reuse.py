"""What the headline's studies reuse on a re-run (benchmarks/headline.py): an export only for the
settings it was trained under, samples and metrics only for the export and schedule they were
made from; anything else is refused with the path to delete, never kept silently."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import headline  # noqa: E402

from ecar import storage  # noqa: E402
from ecar.export import read_metadata, save_exported  # noqa: E402
from ecar.models import build_model  # noqa: E402
from ecar.presets import get_config  # noqa: E402

pytestmark = pytest.mark.unit

STEPS = 7


def train(paths: headline.Paths, config, seed: int = 0) -> str:
    """An export of `config` where the studies look for model "ecar"; its content hash."""
    torch.manual_seed(seed)
    save_exported(build_model(config).state_dict(), config, paths.export("ecar"), latent_scale=1.0, step=STEPS)
    return read_metadata(paths.export("ecar"))["content_sha256"]


@pytest.fixture()
def setup(tmp_path):
    paths = headline.Paths.under(str(tmp_path))
    config = get_config("ecar-debug", {"storage.root": str(tmp_path), "train.steps": STEPS})
    return paths, config, train(paths, config)


def test_an_export_is_reused_for_its_own_settings_and_operational_changes(setup):
    paths, config, _ = setup
    headline.check_export(config, paths, "ecar")
    headline.check_export(config.override({"train.log_every": 3, "train.cpus_per_worker": 2.0}), paths, "ecar")


def test_the_same_loss_weights_spelled_by_the_rule_or_the_list_are_one_setting(tmp_path):
    paths = headline.Paths.under(str(tmp_path))
    listed = get_config("ecar-debug", {"storage.root": str(tmp_path), "train.steps": STEPS})
    listed = listed.override({"stages.loss_weights": [1.0, 2.0, 4.0]})
    train(paths, listed)
    headline.check_export(
        listed.override({"stages.loss_weights": None, "stages.loss_weight_growth": 2.0}), paths, "ecar"
    )
    with pytest.raises(ValueError, match=r"stages.loss_weights: \[1.0, 2.0, 4.0\] -> \[1.0, 1.0, 1.0\]"):
        headline.check_export(listed.override({"stages.loss_weights": None}), paths, "ecar")


@pytest.mark.parametrize(
    ("override", "named"),
    [({"model.ar_depth": 3}, "model.ar_depth: 1 -> 3"), ({"train.steps": STEPS * 2}, "train.steps: 7 -> 14")],
)
def test_an_export_trained_under_other_settings_is_refused_with_what_to_delete(setup, override, named):
    paths, config, _ = setup
    with pytest.raises(ValueError) as error:
        headline.check_export(config.override(override), paths, "ecar")
    assert named in str(error.value)
    assert storage.join(paths.root, "runs", "ecar") in str(error.value)


def write_samples_manifest(paths: headline.Paths, variant: headline.Variant, sha: str) -> str:
    out = paths.samples(variant.name)
    Path(out).mkdir(parents=True)
    manifest = {"checkpoint_sha256": sha, "overrides": list(variant.overrides), "shards": []}
    (Path(out) / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_samples_of_the_current_export_are_kept_without_sampling(setup, monkeypatch):
    paths, _, sha = setup
    variant = headline.Variant("ecar", "ecar")
    write_samples_manifest(paths, variant, sha)
    monkeypatch.setattr("ecar.sampler.sample_to_storage", lambda *a, **k: pytest.fail("sampled again"))
    headline.sample_variants([variant], paths, 4, 1)


def test_samples_of_a_retrained_model_are_refused(setup):
    paths, config, old = setup
    variant = headline.Variant("ecar", "ecar")
    out = write_samples_manifest(paths, variant, old)
    assert train(paths, config, seed=1) != old  # the same settings, other weights
    with pytest.raises(ValueError, match=f"{out} was made with another checkpoint_sha256"):
        headline.sample_variants([variant], paths, 4, 1)


def test_metrics_are_kept_only_for_their_export_and_schedule(setup):
    paths, config, sha = setup
    variant = headline.Variant("ecar@2-2-2", "ecar", ("flow.steps_per_stage=[2, 2, 2]",))
    target = paths.metrics(variant.name)
    storage.write_text_atomic(target, json.dumps({"checkpoint_sha256": sha, "overrides": list(variant.overrides)}))
    headline.evaluate_variants([variant], paths, 4)  # kept: nothing to compute

    other_schedule = headline.Variant(variant.name, "ecar", ("flow.steps_per_stage=[4, 4, 4]",))
    with pytest.raises(ValueError, match="another overrides"):
        headline.evaluate_variants([other_schedule], paths, 4)
    train(paths, config, seed=1)
    with pytest.raises(ValueError, match="another checkpoint_sha256"):
        headline.evaluate_variants([variant], paths, 4)
