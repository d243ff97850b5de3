"""Parquet shards on storage: deterministic names, whole-file atomic writes, footer metadata.

A shard is written in one piece (serialised in memory, then one atomic write), so a killed job
leaves either the whole shard or nothing; re-runs skip the shards that are there and readable
(`is_complete`) and rewrite any other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ecar import storage
from ecar.config import StorageConfig
from ecar.log import get_logger

log = get_logger(__name__)

IMAGE_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int64()), ("source", pa.string())])
METADATA_KEY = b"ecar"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def write_table(
    uri: str, table: pa.Table, storage_config: StorageConfig | None = None, metadata: dict[str, Any] | None = None
) -> None:
    """Write `table` as one Parquet file, atomically; `metadata` goes into the footer as JSON."""
    if metadata is not None:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), METADATA_KEY: json.dumps(metadata).encode()}
        )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes(), storage_config)


class ShardError(ValueError):
    """A shard that exists but is not readable Parquet (truncated, corrupt); names the file."""


@contextmanager
def _naming(uri: str) -> Iterator[None]:
    """Arrow's errors about a broken file do not say which file; a missing one stays missing."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as error:
        raise ShardError(f"{uri}: not a readable Parquet shard (truncated or corrupt?): {error}") from None


def is_complete(uri: str, storage_config: StorageConfig | None = None) -> bool:
    """A re-run skips a shard only if it is there and readable: an atomic write leaves the whole
    file or none, but a copy, a sync or a disk can still leave a truncated one, to be rewritten."""
    try:
        read_footer(uri, storage_config)
    except FileNotFoundError:
        return False
    except ShardError as error:
        log.warning("rewriting %s", error)
        return False
    return True


def read_table(uri: str, storage_config: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.arrow_fs(uri, storage_config)
    with _naming(uri):
        return pq.read_table(path, filesystem=fs, columns=columns)


def read_footer(uri: str, storage_config: StorageConfig | None = None) -> tuple[int, dict[str, Any], pa.Schema]:
    """(row count, ecar footer metadata, schema) from the footer alone: no data pages are read."""
    fs, path = storage.arrow_fs(uri, storage_config)
    with _naming(uri):
        parquet = pq.ParquetFile(path, filesystem=fs)
    schema = parquet.schema_arrow
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return parquet.metadata.num_rows, (json.loads(raw) if raw else {}), schema
