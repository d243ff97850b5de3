"""Where MLflow runs go: the config's URI, else MLFLOW_TRACKING_URI, else an embedded store."""

from __future__ import annotations

import os
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
