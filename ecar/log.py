"""A rank-aware logger: rank 0 logs at INFO, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
import sys


def rank() -> int:
    """The global rank from the launcher's environment (Ray Train / torchrun set RANK); 0 alone."""
    return int(os.environ.get("RANK", "0"))


def get_logger(name: str = "ecar") -> logging.Logger:
    logger = logging.getLogger(name)
    root = logging.getLogger("ecar")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(logging.INFO if rank() == 0 else logging.WARNING)
    return logger
