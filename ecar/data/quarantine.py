"""Bad input is set aside, not dropped silently and not fatal one row at a time.

Each shard-wise job writes, per input shard, a quarantine Parquet file (id, source, reason)
next to its output, before the output itself; the manifest counts them. When the quarantined
share of a split exceeds `data.quarantine_limit`, the job stops with a summary of the reasons
and no manifest is written.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ecar import storage
from ecar.config import StorageConfig
from ecar.data.shards import read_footer, read_table, write_table

SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("reason", pa.string())])

# reason prefixes, also the keys of the manifest's per-reason counts
UNDECODABLE = "undecodable image"
UNREADABLE = "unreadable file"
WRONG_SIZE = "wrong image size"
MISSING_LABEL = "missing label"
BAD_LABEL = "label out of range"
DUPLICATE_ID = "duplicate id"


class QuarantineLimitExceeded(ValueError):
    """Too much of the input was bad; the message summarises reasons and examples."""


@dataclass
class Quarantine:
    """The quarantined rows of one shard."""

    rows: list[dict[str, str]] = field(default_factory=list)

    def add(self, id: str, source: str, reason: str) -> None:
        self.rows.append({"id": str(id), "source": str(source), "reason": reason})

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=SCHEMA)

    def write(self, uri: str, storage_config: StorageConfig | None = None) -> None:
        write_table(uri, self.table(), storage_config)


def reason_kind(reason: str) -> str:
    """The reason's category: the text before the first ':'."""
    return reason.split(":", 1)[0]


def read_quarantine(uris: list[str], storage_config: StorageConfig | None = None) -> pa.Table:
    tables = [read_table(uri, storage_config) for uri in uris]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def check_limit(what: str, table: pa.Table, total_rows: int, limit: float) -> None:
    """Raise QuarantineLimitExceeded when len(table) / total_rows > limit."""
    bad = table.num_rows
    if total_rows == 0 or bad / total_rows <= limit:
        return
    reasons = Counter(reason_kind(r) for r in table.column("reason").to_pylist())
    first = table.slice(0, 3).to_pylist()
    examples = "; ".join(f"{row['id']} ({row['source']}): {row['reason']}" for row in first)
    raise QuarantineLimitExceeded(
        f"{what}: {bad} of {total_rows} rows quarantined ({bad / total_rows:.1%} > data.quarantine_limit="
        f"{limit:.1%}); reasons: {dict(reasons)}; first: {examples}"
    )


def counts_by_reason(table: pa.Table) -> dict[str, int]:
    return dict(sorted(Counter(reason_kind(r) for r in table.column("reason").to_pylist()).items()))


def verify_split(
    what: str, shards: list[tuple[str, str, str, int]], limit: float, storage_config: StorageConfig | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """No row lost, none duplicated, before any manifest is written.

    `shards`: (name, output shard URI, its quarantine URI, input rows) for every shard of a
    split. Checks that each output exists, that its rows plus its quarantined rows equal its
    input rows and that ids are unique across the split; then applies the quarantine limit.
    Returns the split's summary {rows, quarantined, input_rows, quarantine_reasons, shards} and
    each output's footer metadata, in order.
    """
    summaries, footers, quarantine_uris, fingerprints = [], [], [], []
    for name, uri, quarantine_uri, input_rows in shards:
        if not storage.exists(uri, storage_config):
            raise RuntimeError(f"{uri} is missing; re-run the job to finish it")
        rows, metadata, _ = read_footer(uri, storage_config)
        quarantined = read_footer(quarantine_uri, storage_config)[0]
        if rows + quarantined != input_rows:
            raise RuntimeError(f"{uri}: {rows} rows + {quarantined} quarantined != {input_rows} input rows")
        fingerprints.append(_fingerprints(_ids(uri, storage_config)))
        summaries.append({"name": name, "rows": rows, "quarantined": quarantined})
        footers.append(metadata)
        quarantine_uris.append(quarantine_uri)
    _check_unique([shard[1] for shard in shards], fingerprints, storage_config)
    table = read_quarantine(quarantine_uris, storage_config)
    input_total = sum(shard[3] for shard in shards)
    check_limit(what, table, input_total, limit)
    summary = {
        "rows": sum(s["rows"] for s in summaries),
        "quarantined": table.num_rows,
        "input_rows": input_total,
        "quarantine_reasons": counts_by_reason(table),
        "shards": summaries,
    }
    return summary, footers


def _ids(uri: str, storage_config: StorageConfig | None) -> list[str]:
    return read_table(uri, storage_config, columns=["id"]).column("id").to_pylist()


def _fingerprints(ids: list[str]) -> np.ndarray:
    """A 64-bit hash per id: checking a split of millions of rows holds 8 bytes a row on the
    driver, not the ids themselves."""
    digests = (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids)
    return np.fromiter(digests, dtype=np.uint64, count=len(ids))


def _check_unique(uris: list[str], fingerprints: list[np.ndarray], storage_config: StorageConfig | None) -> None:
    """ValueError naming an id that two rows share and their files; equal fingerprints are
    confirmed on the ids themselves (re-read only then), so a hash collision is no error."""
    values = np.sort(np.concatenate(fingerprints)) if fingerprints else np.zeros(0, np.uint64)
    suspects = set(values[1:][values[1:] == values[:-1]].tolist())
    if not suspects:
        return
    seen: dict[str, str] = {}
    for uri, shard in zip(uris, fingerprints):
        for id, fingerprint in zip(_ids(uri, storage_config), shard.tolist()):
            if fingerprint in suspects:
                if id in seen:
                    raise ValueError(f"duplicate id {id!r} in {uri} and {seen[id]}")
                seen[id] = uri
