"""Where MLflow runs go: the config's URI, else MLFLOW_TRACKING_URI, else an embedded store."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ecar.config import Config


def resolve_tracking_uri(config: Config) -> str:
    """MLflow 3 refuses a plain file store, so the embedded default is an absolute SQLite path
    under the (local) storage root; with object storage as the root, set a tracking server."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = config.storage.root
    if "://" in root:
        return f"sqlite:///{Path('outputs/mlflow.db').resolve()}"
    return f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_tracking_server(backend_uri: str, artifacts_dir: str, timeout_s: float = 120.0) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over an existing SQLite store, for the length of the block;
    yields its http:// URI. Several processes writing at once (parallel sweep trials, rank-0
    workers) go through it: a bare SQLite file does not survive concurrent writers."""
    port = free_port()
    Path(artifacts_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(artifacts_dir).parent / f"mlflow-server-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                backend_uri,
                "--artifacts-destination",
                artifacts_dir,
                "--workers",
                "1",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the MLflow server for {backend_uri} did not start; its log "
                        f"{log_path}:\n{log_path.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        # uvicorn/gunicorn children live in the server's own session: end that group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
