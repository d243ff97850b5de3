import subprocess
import sys

import pytest

from ecar.cli import JOB_COMMANDS, build_parser, main

pytestmark = pytest.mark.unit


def test_help_has_an_example_for_every_builtin_command():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public API
    for name in ("flops", "presets", "config", "report"):
        assert "example:" in commands[name].format_help()


def test_user_errors_exit_2_with_one_line_and_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "ecar.cli", "flops", "ecar-debug", "train.nope=1"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unknown config key train.nope" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_preset_is_a_user_error(capsys):
    assert main(["config", "no-such-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_config_prints_overrides(capsys):
    assert main(["config", "ecar-debug", "train.lr=0.5", "--json"]) == 0
    assert '"lr": 0.5' in capsys.readouterr().out


def test_report_on_a_missing_experiment_is_a_user_error(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["report", "--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(JOB_COMMANDS))
def test_every_job_subcommand_has_help_with_an_example(name, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([name, "--help"])
    assert stopped.value.code == 0
    assert f"python -m {JOB_COMMANDS[name][0]}" in capsys.readouterr().out


def test_unknown_sweep_is_a_user_error(capsys):
    assert main(["tune", "no-such-sweep"]) == 2
    err = capsys.readouterr().err
    assert "unknown sweep 'no-such-sweep'" in err and "stages" in err


def test_job_subcommands_show_their_own_help():
    result = subprocess.run([sys.executable, "-m", "ecar.cli", "sample", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--checkpoint" in result.stdout and "python -m jobs.sample" in result.stdout


@pytest.mark.parametrize("part", ["/etc/x", "../x", "a/../../x", "s3://other/x"])
def test_storage_join_refuses_parts_that_leave_the_root(part):
    from ecar import storage

    with pytest.raises(ValueError, match="would leave"):
        storage.join("outputs/runs", part)
    with pytest.raises(ValueError, match="would leave"):
        storage.join("s3://bucket/prefix", part)
    assert storage.join("s3://bucket/prefix", "a/b.json") == "s3://bucket/prefix/a/b.json"


@pytest.mark.parametrize("name", ["/etc/x", "../escape", "a/b", ".."])
def test_train_refuses_a_run_name_that_is_not_one_folder_before_anything_starts(name, tmp_path, capsys):
    from jobs.train import main

    code = main(
        ["--preset", "ecar-debug", "--manifest", str(tmp_path / "none"), "--output", str(tmp_path), "--name", name]
    )
    assert code == 2
    assert "run name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    "workers, message",
    [("x", "--workers 'x': expected a count"), ("4-", "--workers '4-'"), ("3-8", "train.min_workers: 3 does not")],
)
def test_train_refuses_bad_worker_bounds_before_anything_starts(workers, message, tmp_path, capsys):
    from jobs.train import main

    code = main(["--preset", "ecar-b", "--output", str(tmp_path), "--name", "a", "--workers", workers])
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_train_workers_bounds_set_the_elastic_config():
    from jobs.train import resolve_config

    assert resolve_config("ecar-b", [], None, None, "4-8").train.min_workers == 4
    fixed = resolve_config("ecar-b", [], None, None, "8").train
    assert (fixed.min_workers, fixed.num_workers) == (0, 8)
