import logging

import pytest

from ecar.progress import Progress, mode, track

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def captured(monkeypatch):
    # ecar's loggers write to their own handler; let caplog see them too
    monkeypatch.setattr(logging.getLogger("ecar"), "propagate", True)


def test_non_interactive_logs_get_one_line_per_tenth(monkeypatch, caplog):
    monkeypatch.setenv("ECAR_PROGRESS", "log")
    with caplog.at_level(logging.INFO, logger="ecar.progress"):
        assert list(track(range(1000), 1000, "work", "items")) == list(range(1000))
    lines = [r.getMessage() for r in caplog.records if r.name == "ecar.progress"]
    assert len(lines) == 10
    assert lines[-1] == "work: 1000/1000 items (100%)"


def test_jumps_and_postfix_are_logged_once(monkeypatch, caplog):
    monkeypatch.setenv("ECAR_PROGRESS", "log")
    with caplog.at_level(logging.INFO, logger="ecar.progress"), Progress(300, "train", "steps") as progress:
        progress.set(150, loss=0.5)
        progress.set(150, loss=0.5)
        progress.set(300, loss=0.25)
    lines = [r.getMessage() for r in caplog.records if r.name == "ecar.progress"]
    assert lines == ["train: 150/300 steps (50%), loss 0.5", "train: 300/300 steps (100%), loss 0.25"]


def test_off_is_silent_and_a_terminal_gets_a_bar(monkeypatch, caplog):
    monkeypatch.setenv("ECAR_PROGRESS", "off")
    with caplog.at_level(logging.INFO, logger="ecar.progress"):
        list(track(range(10), 10, "quiet"))
    assert not caplog.records
    monkeypatch.setenv("ECAR_PROGRESS", "bar")
    assert mode() == "bar"
    with Progress(3, "bar") as progress:
        progress.update(3)
        assert progress.bar is not None and progress.bar.n == 3


def test_the_board_keeps_the_latest_step_when_posts_arrive_out_of_order():
    from ecar.progress import _Board

    board = _Board()
    board.post(5, {"loss": 0.5})
    board.post(3, {"loss": 0.9})
    assert board.read() == (5, {"loss": 0.5})


def test_a_slow_start_says_what_is_happening_until_the_first_count(monkeypatch, caplog):
    """Until work elsewhere reports its first step, the status (e.g. the workers' phase) is
    logged when it changes; once counting starts, only the counts are."""
    import time

    from ecar.progress import _polled

    monkeypatch.setenv("ECAR_PROGRESS", "log")
    phases = iter(["starting the workers", "starting the workers", "building the DeepSpeed engine"])
    steps = iter([None, None, None, (10, {"loss": 0.5}), (20, {"loss": 0.4})])
    with caplog.at_level(logging.INFO, logger="ecar.progress"):
        with _polled(
            20,
            "train",
            "steps",
            lambda: next(steps, (20, {})),
            every_s=0.05,
            status=lambda: next(phases, "unused"),
            status_every_s=60,
        ):
            time.sleep(0.6)
    lines = [r.getMessage() for r in caplog.records]
    notes = [line for line in lines if "starting the workers" in line or "DeepSpeed" in line]
    assert len(notes) == 2, lines  # one line per phase, not per poll
    assert notes[0].startswith("train: starting the workers (") and "building the DeepSpeed engine" in notes[1]
    assert any("train: 20/20 steps (100%)" in line for line in lines)
    assert not any("unused" in line for line in lines)


def test_a_resumed_runs_progress_counts_only_this_attempts_steps(monkeypatch, caplog, tmp_path):
    """A run restarted before its first checkpoint starts again at step 1 in the same MLflow
    run: the steps its earlier attempt logged must not show as this attempt's progress."""
    import time

    import mlflow
    from mlflow.entities import Metric

    from ecar.progress import training_progress

    monkeypatch.setenv("ECAR_PROGRESS", "log")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("progress")).info.run_id
    earlier = int(time.time() * 1000) - 60_000
    client.log_batch(run_id, metrics=[Metric("loss", 0.9, earlier, 200)])  # the earlier attempt
    with caplog.at_level(logging.INFO, logger="ecar.progress"):
        with training_progress(uri, run_id, 1000, "train", every_s=0.05):
            time.sleep(0.3)
            client.log_batch(run_id, metrics=[Metric("loss", 0.5, int(time.time() * 1000), 100)])
            time.sleep(0.3)
    counts = [r.getMessage() for r in caplog.records if "/1000 steps" in r.getMessage()]
    assert counts == ["train: 100/1000 steps (10%), loss 0.5"]
