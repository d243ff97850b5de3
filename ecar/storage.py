"""One way to reach storage: `s3://bucket/prefix` or a local path, through the same code.

Endpoint, region and credentials come from `StorageConfig` (endpoint_url, region) when set,
else from the standard AWS environment (AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE ...); never from code.

Two views of the same place, because the libraries want different ones:
- `arrow_fs(uri)` -> (pyarrow FileSystem, path) for Parquet reads and writes and Ray Data;
- `fsspec_fs(uri)` -> (fsspec FileSystem, path) for listing, small files and moves.
pyarrow's own S3FileSystem ignores AWS_ENDPOINT_URL, so the endpoint is passed explicitly.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from ecar.config import Config, StorageConfig
from ecar.log import get_logger

log = get_logger(__name__)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute (other processes may run in another directory); s3:// as is."""
    if not uri or is_remote(uri):
        return uri
    return str(Path(uri).resolve())


def with_absolute_root(config: Config) -> Config:
    """The config with a local storage root made absolute: workers and trials run in Ray's own
    folders, where a relative root would put checkpoints and exports somewhere else."""
    root = absolute(config.storage.root)
    return config if root == config.storage.root else config.override({"storage.root": root})


def join(uri: str, *parts: str) -> str:
    """`join("s3://b/p", "a", "x.json")` -> "s3://b/p/a/x.json"; local paths likewise.

    Parts stay below `uri`: an absolute part or a `..` segment (a run name like "/etc/x", a shard
    name in a tampered manifest) raises ValueError instead of steering reads and writes elsewhere.
    """
    for part in parts:
        segments = part.replace("\\", "/").split("/")
        if part.startswith(("/", "\\")) or "://" in part or ".." in segments:
            raise ValueError(
                f"{part!r} would leave {uri}: names joined to a storage path must be relative, without '..'"
            )
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri.removeprefix("file://"), *parts))


def endpoint_url(storage: StorageConfig | None = None) -> str:
    return storage.endpoint_url if storage and storage.endpoint_url else os.environ.get("AWS_ENDPOINT_URL", "")


def region(storage: StorageConfig | None = None) -> str:
    if storage and storage.region:
        return storage.region
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""


def _split_s3(uri: str) -> str:
    parsed = urlparse(uri)
    if parsed.scheme not in ("s3", "s3a"):
        raise ValueError(f"unsupported storage scheme in {uri!r} (use s3:// or a local path)")
    if not parsed.netloc:
        raise ValueError(f"{uri!r} names no bucket")
    return f"{parsed.netloc}{parsed.path}".rstrip("/")


def arrow_fs(uri: str, storage: StorageConfig | None = None, native: bool = True) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it (bucket/key for S3, absolute for local).

    `native=False` wraps s3fs instead of pyarrow's own S3 client, for writers of arbitrary
    files: pyarrow's client completes even an empty file as a multipart upload, which
    S3-compatible servers such as moto reject."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).resolve())
    if not native:
        fs, path = fsspec_fs(uri, storage)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    path = _split_s3(uri)
    options: dict = {}
    endpoint = endpoint_url(storage)
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "https"
    if region(storage):
        options["region"] = region(storage)
    return pafs.S3FileSystem(**options), path


def fsspec_fs(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem (s3fs or local) and the path inside it."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), str(Path(uri.removeprefix("file://")).resolve())
    path = _split_s3(uri)
    client_kwargs = {}
    if endpoint_url(storage):
        client_kwargs["endpoint_url"] = endpoint_url(storage)
    if region(storage):
        client_kwargs["region_name"] = region(storage)
    # skip_instance_cache: a fresh client per call, so a changed endpoint is never served stale
    return fsspec.filesystem("s3", client_kwargs=client_kwargs, skip_instance_cache=True), path


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = fsspec_fs(uri, storage)
    return fs.exists(path)


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = fsspec_fs(uri, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri} does not exist")
    return fs.cat_file(path)


def read_text(uri: str, storage: StorageConfig | None = None) -> str:
    return read_bytes(uri, storage).decode()


def write_bytes_atomic(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Readers see the old object or the whole new one, never a part.

    Local: write a unique temporary file next to the target, fsync, rename over it. S3: a
    single PUT is already atomic (an object becomes visible only when complete).
    """
    if is_remote(uri):
        fs, path = fsspec_fs(uri, storage)
        fs.pipe_file(path, data)
        return
    target = Path(uri.removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, target)


def write_text_atomic(uri: str, text: str, storage: StorageConfig | None = None) -> None:
    write_bytes_atomic(uri, text.encode(), storage)


def list_files(uri: str, suffix: str = "", storage: StorageConfig | None = None) -> list[str]:
    """URIs of the files directly under `uri` ending in `suffix`, sorted; [] if it is missing.
    Hidden names (our local temporaries start with '.') are skipped."""
    fs, path = fsspec_fs(uri, storage)
    if not fs.exists(path):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False, refresh=True)]
    return [join(uri, n) for n in sorted(names) if n.endswith(suffix) and not n.startswith(".")]


def delete(uri: str, storage: StorageConfig | None = None) -> None:
    fs, path = fsspec_fs(uri, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def claim_output(
    prefix: str, identity: dict[str, Any], what: str, name: str = "run.json", storage: StorageConfig | None = None
) -> None:
    """Record what an output folder holds (`prefix/name`), or check that a re-run asks for the
    same thing: a job that fills missing shards must never mix in shards of another run.
    `what` names the contents in the error ("samples", "latents"). A re-run's claim also removes
    the temporary files of writes that a killed run left unfinished (see `remove_partials`)."""
    uri = join(prefix, name)
    if exists(uri, storage):
        recorded = json.loads(read_text(uri, storage))
        if recorded != identity:
            changed = sorted(k for k in {*identity, *recorded} if recorded.get(k) != identity.get(k))
            raise ValueError(
                f"{prefix} already holds {what} of a different run (differs in "
                f"{', '.join(changed)}); use a new output or delete it"
            )
        remove_partials(prefix)
        return
    write_text_atomic(uri, json.dumps(identity, indent=2), storage)


def remove_partials(prefix: str) -> list[str]:
    """Delete the temporary files (`.NAME.*.partial`) that `write_bytes_atomic` leaves under a
    local `prefix` when its process is killed between writing and renaming; returns their paths.
    Call it only while no writer of this output runs (a re-run, before its workers start). S3
    writes leave none: an object appears whole or not at all."""
    if is_remote(prefix):
        return []
    stale = [path for path in Path(prefix.removeprefix("file://")).rglob(".*.partial") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished temporary file(s) of a killed run under %s", len(stale), prefix)
    return [str(path) for path in stale]


PROBE_TIMEOUT_S = 5  # an unreachable endpoint must fail in seconds, not after boto's retries


class StorageAccessError(ValueError):
    """A location a job needs cannot be reached, read or written; names the key and URI."""


def check_access(uri: str, key: str, write: bool = False, storage: StorageConfig | None = None) -> None:
    """Before a job takes any cluster resource: an s3:// bucket answers (one attempt, a short
    timeout, instead of boto's retries and a long traceback), and with `write` it accepts and
    deletes a small probe object; a local path's nearest existing folder is writable (nothing is
    created). `key` names the setting or flag in the error."""
    if not is_remote(uri):
        if write:
            _check_local_writable(Path(uri.removeprefix("file://")).absolute(), key, uri)
        return
    _probe_bucket(uri, key, storage)
    if write:
        from botocore.exceptions import BotoCoreError

        probe = join(uri, f".ecar-write-probe-{uuid.uuid4().hex}")
        try:
            write_bytes_atomic(probe, b"probe", storage)
            delete(probe, storage)
        except (OSError, ValueError, BotoCoreError) as error:
            raise StorageAccessError(f"{key}: cannot write under {uri}: {error}") from None


def _check_local_writable(path: Path, key: str, uri: str) -> None:
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise StorageAccessError(f"{key}: cannot write under {uri}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageAccessError(f"{key}: cannot write under {uri}: {existing} is not writable")


def _probe_bucket(uri: str, key: str, storage: StorageConfig | None) -> None:
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = urlparse(uri).netloc
    endpoint = endpoint_url(storage) or None
    # a fresh session: boto3's default one keeps the credentials it found first in this process
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=region(storage) or None,
        config=BotoConfig(
            connect_timeout=PROBE_TIMEOUT_S,
            read_timeout=PROBE_TIMEOUT_S,
            retries={"max_attempts": 1, "mode": "standard"},
        ),
    )
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "?")
        raise StorageAccessError(f"{key}: bucket {bucket!r} of {uri} is not accessible (S3 error {code})") from None
    except BotoCoreError as error:
        where = endpoint or "the default AWS endpoint"
        raise StorageAccessError(f"{key}: cannot reach storage for {uri} at {where}: {error}") from None


def ray_storage(uri: str, storage: StorageConfig | None = None) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for a Ray Train or Tune RunConfig at `uri`:
    - a local folder: created, absolute;
    - s3:// on AWS (no endpoint override): the URI itself, for Ray's native S3 filesystem
      (pyarrow's C++ client, with its multipart uploads and retries);
    - s3:// on an S3-compatible store (an endpoint is set): s3fs behind pyarrow (native=False).
      Ray first writes an empty marker file, which pyarrow's client sends as a multipart upload
      that moto and some S3-compatible servers reject."""
    if not is_remote(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        return str(Path(uri).resolve()), None
    if not endpoint_url(storage):
        return uri, None
    filesystem, path = arrow_fs(uri, storage, native=False)
    return path, filesystem
