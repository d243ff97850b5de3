"""The exported checkpoint: weights and config are both hash-checked, missing keys are named."""

import json

import pytest
import torch

from ecar.export import load_exported, read_config, read_metadata, save_exported
from ecar.models import build_model
from ecar.presets import get_config

pytestmark = pytest.mark.unit


@pytest.fixture()
def export(tmp_path):
    config = get_config("ecar-debug")
    torch.manual_seed(0)
    uri = str(tmp_path / "export")
    save_exported(build_model(config).state_dict(), config, uri, latent_scale=1.5, step=7)
    return uri, config


def test_an_export_round_trips_with_its_config_and_weights(export):
    uri, config = export
    loaded = load_exported(uri)
    assert loaded.config == config and loaded.step == 7 and loaded.latent_scale == 1.5
    torch.manual_seed(0)
    for name, tensor in build_model(config).state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_an_edited_config_that_still_fits_the_weights_is_refused(export):
    uri, config = export
    path = f"{uri}/config.json"
    edited = json.loads(open(path).read())
    edited["model"]["heads"] = 4  # width 64 splits into 4 heads as well: the weights would load
    open(path, "w").write(json.dumps(edited, indent=2))
    with pytest.raises(ValueError, match="config.json does not match the hash"):
        read_config(uri)
    with pytest.raises(ValueError, match="config.json does not match the hash"):
        load_exported(uri)


def test_changed_weights_are_refused(export):
    uri, _ = export
    path = f"{uri}/model.safetensors"
    blob = bytearray(open(path, "rb").read())
    blob[-1] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    with pytest.raises(ValueError, match="model.safetensors does not match"):
        load_exported(uri)


@pytest.mark.parametrize("key", ["weights_sha256", "config_sha256", "latent_scale"])
def test_export_json_missing_a_key_names_it(export, key):
    uri, _ = export
    path = f"{uri}/export.json"
    metadata = json.loads(open(path).read())
    del metadata[key]
    open(path, "w").write(json.dumps(metadata))
    with pytest.raises(ValueError, match=f"missing {key}"):
        read_metadata(uri)


def test_a_schema_1_export_loads_on_its_weights_hash(export):
    uri, _ = export
    path = f"{uri}/export.json"
    metadata = json.loads(open(path).read())
    for key in ("config_sha256", "content_sha256"):
        del metadata[key]
    metadata["schema_version"] = 1
    open(path, "w").write(json.dumps(metadata))
    assert read_metadata(uri)["content_sha256"] == metadata["weights_sha256"]
    assert load_exported(uri).step == 7


@pytest.mark.parametrize("remove", ["latent_scale", "splits", "splits.train.rows", "splits.train.shards.0.name"])
def test_a_latent_manifest_missing_a_key_names_it(tmp_path, remove):
    from ecar.data.manifest import read_manifest
    from ecar.train.synthetic import write_synthetic_latents

    prefix = write_synthetic_latents(str(tmp_path / "latents"), rows=16, shards=2)
    path = tmp_path / "latents" / "manifest.json"
    manifest = json.loads(path.read_text())
    node, parts = manifest, remove.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    del node[parts[-1]]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=repr(parts[-1])):
        read_manifest(prefix)


def test_a_latent_manifest_that_is_not_json_is_named(tmp_path):
    from ecar.data.manifest import read_manifest

    (tmp_path / "manifest.json").write_text('{"schema_version": 1, "kind": "lat')
    with pytest.raises(ValueError, match="manifest.json: not JSON"):
        read_manifest(str(tmp_path))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--labels", "a,b"], "--labels: 'a,b' is not"),
        (["--labels", "3,10"], "--labels: 10 is not a class"),
        (["--num-images", "0"], "--num-images: 0"),
        (["--shard-size", "0"], "--shard-size"),
        (["--actors", "0"], "--actors"),
        (["--cpus-per-actor", "0"], "--cpus-per-actor"),
        (["sampling.cfg_scale=inf"], "sampling.cfg_scale"),
        (["model.width=8"], "model.width: only sampling"),
    ],
)
def test_sample_refuses_bad_arguments_before_ray_starts_and_writes_nothing(
    export, tmp_path, monkeypatch, capsys, arguments, message
):
    import jobs.sample

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(jobs.sample, "init_ray", no_ray)
    uri, _ = export
    output = tmp_path / "samples"
    options = ["--num-images", "4"] if "--num-images" not in arguments else []
    code = jobs.sample.main(["--checkpoint", uri, "--output", str(output), *options, *arguments])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_sample_checks_the_weights_hash_before_ray_starts(export, tmp_path, monkeypatch, capsys):
    import jobs.sample

    monkeypatch.setattr(jobs.sample, "init_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray")))
    uri, _ = export
    path = f"{uri}/model.safetensors"
    blob = bytearray(open(path, "rb").read())
    blob[-1] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    assert jobs.sample.main(["--checkpoint", uri, "--output", str(tmp_path / "s"), "--num-images", "4"]) == 2
    assert "model.safetensors does not match" in capsys.readouterr().err
