"""Progress posted by Ray workers reaches the driver (their logs do not: the local cluster keeps
them), as for the tokenizer's Ray Train loop."""

import logging

import pytest

from ecar.progress import worker_progress

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_steps_posted_by_a_remote_task_are_shown_by_the_driver(ray_cluster, monkeypatch, caplog):
    import ray

    monkeypatch.setattr(logging.getLogger("ecar"), "propagate", True)
    monkeypatch.setenv("ECAR_PROGRESS", "log")

    @ray.remote(num_cpus=0)
    def worker(board, steps: int) -> int:
        for step in range(1, steps):
            board.post.remote(step, {"loss": 1.0 / step})  # fire and forget, as the training loops do
        ray.get(board.post.remote(steps, {"loss": 1.0 / steps}))  # the last one delivered before returning
        return steps

    with caplog.at_level(logging.INFO, logger="ecar.progress"):
        with worker_progress(40, "tokenizer", "steps", every_s=0.2) as board:
            assert ray.get(worker.remote(board, 40)) == 40
    lines = [r.getMessage() for r in caplog.records if r.name == "ecar.progress"]
    assert lines and lines[-1] == "tokenizer: 40/40 steps (100%), loss 0.025"


def test_a_slow_start_shows_the_workers_phase_until_the_first_step(ray_cluster, monkeypatch, caplog, tmp_path):
    """Before a Ray Train loop's first step the driver says what it is doing: the workers are
    starting, then the phase rank 0 sets (the tokenizer was silent for a minute here). The
    worker moves on only once the driver has shown each phase (file markers: no timing race)."""
    import time

    import ray

    monkeypatch.setattr(logging.getLogger("ecar"), "propagate", True)
    monkeypatch.setenv("ECAR_PROGRESS", "log")

    @ray.remote(num_cpus=0)
    def worker(board, folder: str) -> None:
        from pathlib import Path

        def wait_for(name: str) -> None:
            while not (Path(folder) / name).exists():
                time.sleep(0.05)

        wait_for("started-shown")
        ray.get(board.set_phase.remote("building the tokenizer on 2 worker(s)"))
        wait_for("phase-shown")
        ray.get(board.post.remote(10, {"loss": 0.5}))

    def shown(prefix: str) -> bool:
        return any(r.getMessage().startswith(prefix) for r in caplog.records if r.name == "ecar.progress")

    def await_line(prefix: str, marker: str) -> None:
        deadline = time.monotonic() + 120
        while not shown(prefix):
            assert time.monotonic() < deadline, f"never shown: {prefix!r}"
            time.sleep(0.05)
        (tmp_path / marker).touch()

    with caplog.at_level(logging.INFO, logger="ecar.progress"):
        with worker_progress(10, "tokenizer", "steps", every_s=0.2) as board:
            running = worker.remote(board, str(tmp_path))
            await_line("tokenizer: starting the workers (Ray Train) (", "started-shown")
            await_line("tokenizer: building the tokenizer on 2 worker(s) (", "phase-shown")
            ray.get(running)
    lines = [r.getMessage() for r in caplog.records if r.name == "ecar.progress"]
    assert lines[0].startswith("tokenizer: starting the workers (Ray Train) (")
    assert lines[-1] == "tokenizer: 10/10 steps (100%), loss 0.5"


def test_off_hands_no_board(monkeypatch):
    monkeypatch.setenv("ECAR_PROGRESS", "off")
    with worker_progress(10, "quiet") as board:
        assert board is None
