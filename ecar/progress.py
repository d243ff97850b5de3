"""Progress on long work: a tqdm bar on a terminal; in non-interactive logs (`ray job submit`,
CI, a file) no bar, but one log line every tenth of the way, so logs stay short and readable.

ECAR_PROGRESS=bar|log|off overrides the choice.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from ecar.log import get_logger

log = get_logger("ecar.progress")
T = TypeVar("T")


def mode() -> str:
    chosen = os.environ.get("ECAR_PROGRESS", "").lower()
    if chosen in ("bar", "log", "off"):
        return chosen
    return "bar" if sys.stderr.isatty() else "log"


class Progress:
    """Counts towards `total`; `update(n, **postfix)` adds, `set(n, **postfix)` jumps."""

    def __init__(self, total: int, desc: str, unit: str = "it") -> None:
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.done = 0
        self.mode = mode()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True, leave=True)
        self.next_tenth = 1

    def set(self, done: int, **postfix: Any) -> None:
        done = min(int(done), self.total) if self.total else int(done)
        if self.bar is not None:
            self.bar.update(done - self.done)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.mode == "log" and self.total:
            tenth = done * 10 // self.total
            if tenth >= self.next_tenth or (done == self.total and self.done < self.total):
                extra = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in postfix.items())
                log.info(
                    "%s: %d/%d %s (%d%%)%s", self.desc, done, self.total, self.unit, 100 * done // self.total, extra
                )
                self.next_tenth = tenth + 1
        self.done = done

    def update(self, count: int = 1, **postfix: Any) -> None:
        self.set(self.done + count, **postfix)

    def note(self, message: str) -> None:
        """A status line for work that has not counted anything yet (a log line, or the bar's text)."""
        if self.bar is not None:
            self.bar.set_description_str(f"{self.desc} ({message})", refresh=True)
        elif self.mode == "log":
            log.info("%s: %s", self.desc, message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], total: int, desc: str, unit: str = "it") -> Iterator[T]:
    with Progress(total, desc, unit) as progress:
        for item in items:
            yield item
            progress.update()


@contextlib.contextmanager
def _polled(
    total: int,
    desc: str,
    unit: str,
    read: Callable[[], tuple[int, dict[str, float]] | None],
    every_s: float,
    status: Callable[[], str] | None = None,
    status_every_s: float = 60.0,
) -> Iterator[None]:
    """Shows `Progress` for work running elsewhere while the block runs: a thread calls `read`
    (latest step and metrics, or None) every `every_s`, and once more when the block ends.
    Until the first count, `status()` (what the work is doing) is shown when it changes, and at
    least every `status_every_s` with the time waited, so a slow start never looks like a hang."""
    stop = threading.Event()
    progress = Progress(total, desc, unit)
    started = time.monotonic()
    shown = {"text": "", "at": started}

    def show() -> None:
        try:
            latest = read()
        except Exception:  # noqa: BLE001 - progress display must never break a run
            return
        if latest is not None and latest[0] > progress.done:
            progress.set(latest[0], **latest[1])
        elif status is not None and progress.done == 0:
            try:
                text = status()
            except Exception:  # noqa: BLE001
                return
            now = time.monotonic()
            if text != shown["text"] or now - shown["at"] >= status_every_s:
                progress.note(f"{text} ({now - started:.0f} s)")
                shown.update(text=text, at=now)

    def poll() -> None:
        while not stop.wait(every_s):
            show()

    thread = threading.Thread(target=poll, name=f"ecar-progress-{desc}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_s + 15)  # a read may wait up to 10 s
        show()  # the final count
        progress.close()


@contextlib.contextmanager
def training_progress(
    tracking_uri: str, run_id: str, total_steps: int, desc: str = "train", every_s: float = 5.0
) -> Iterator[None]:
    """Shows a Ray Train run's progress on the driver while the block runs: the rank-0 worker
    logs `loss` to MLflow every train.log_every steps, and a thread reads back the latest step
    logged since the block began (not a step an earlier attempt of a resumed run reached)."""
    if mode() == "off" or not run_id:
        yield
        return
    from ecar.tracking import PHASE_TAG, client

    mlflow_client = client(tracking_uri)
    since_ms = int(time.time() * 1000)  # a resumed run's earlier attempts logged steps too

    def read() -> tuple[int, dict[str, float]] | None:
        history = [m for m in mlflow_client.get_metric_history(run_id, "loss") if m.timestamp >= since_ms]
        if not history:
            return None
        latest = max(history, key=lambda m: m.step)
        return latest.step, {"loss": latest.value}

    def status() -> str:
        # rank 0 sets the phase tag (ecar.tracking.RankZeroTracker.set_phase)
        return mlflow_client.get_run(run_id).data.tags.get(PHASE_TAG) or "starting the training workers (Ray Train)"

    with _polled(total_steps, desc, "steps", read, every_s, status):
        yield


class _Board:
    """Run as a Ray actor: the workers of a run post their step to it (fire and forget) and the
    driver reads it, on any node; worker logs do not reach the driver (a local cluster starts
    with log_to_driver=False, and on a cluster they stay in the workers' log files)."""

    def __init__(self) -> None:
        self.step, self.metrics = 0, {}
        self.phase = ""

    def post(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self.step:
            self.step, self.metrics = step, metrics

    def read(self) -> tuple[int, dict[str, float]]:
        return self.step, self.metrics

    def set_phase(self, phase: str) -> None:
        """What the workers are doing before their first step (shown until counting starts)."""
        self.phase = phase

    def status(self) -> str:
        return self.phase


@contextlib.contextmanager
def worker_progress(total_steps: int, desc: str, unit: str = "steps", every_s: float = 5.0) -> Iterator[Any]:
    """Yields an actor handle (None when progress is off) to pass to a Ray Train loop, whose
    rank 0 calls `handle.post.remote(step, {"loss": ...})`; the driver shows it as `Progress`.
    Until the first step, rank 0's `handle.set_phase.remote(text)` is shown (before that: the
    workers are starting). Needs Ray initialised; the actor takes no CPU."""
    if mode() == "off":
        yield None
        return
    import ray

    board = ray.remote(num_cpus=0)(_Board).remote()
    try:

        def status() -> str:
            return ray.get(board.status.remote(), timeout=10) or "starting the workers (Ray Train)"

        with _polled(total_steps, desc, unit, lambda: ray.get(board.read.remote(), timeout=10), every_s, status):
            yield board
    finally:
        with contextlib.suppress(Exception):
            ray.kill(board)
