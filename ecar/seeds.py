"""Seeds derived from where a draw happens, not from the order of earlier draws."""

from __future__ import annotations

import hashlib


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a function of `parts` alone (SHA-256 of "p0:p1:..."): the same image
    from a sample row at any batch or pool size, the same training noise after a resume."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
