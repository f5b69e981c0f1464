"""Filesystem access for local paths and ``s3://`` URIs (fsspec/s3fs), and atomic writes.

Atomicity: a file is written to a temporary sibling and renamed into place; on object stores,
where rename is a copy, readers rely on the ``_SUCCESS`` marker written last instead.
"""
from __future__ import annotations

import io
import json
import math
import os
import posixpath
import uuid
from typing import Any, Dict, List, Optional, Tuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diet_ray.errors import DataError

_ENDPOINT: Optional[str] = None
_REGION: Optional[str] = None


def configure(endpoint_url: Optional[str] = None, region: Optional[str] = None) -> None:
    """Set the S3-compatible endpoint for this process (from ``io.*``)."""
    global _ENDPOINT, _REGION
    _ENDPOINT, _REGION = endpoint_url, region


def storage_options(uri: str) -> Dict[str, Any]:
    if not is_remote(uri):
        return {}
    endpoint = _ENDPOINT or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("DIET_RAY_S3_ENDPOINT")
    client_kwargs: Dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if _REGION:
        client_kwargs["region_name"] = _REGION
    # Credentials: never passed here; botocore reads the standard env/profile chain.
    return {"client_kwargs": client_kwargs} if client_kwargs else {}


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def get_fs(uri: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def expand(source: str) -> List[str]:
    """Expand a path, directory or glob into a sorted list of file URIs; error if none."""
    fs, path = get_fs(source)
    proto = source.split("://", 1)[0] + "://" if is_remote(source) else ""
    try:
        if any(c in path for c in "*?["):
            files = sorted(fs.glob(path))
        elif fs.isdir(path):
            files = sorted(
                p for p in fs.find(path) if not posixpath.basename(p).startswith((".", "_"))
            )
        elif fs.exists(path):
            files = [path]
        else:
            raise DataError(f"{source}: no such file or directory. Check data.source.")
    except DataError:
        raise
    except PermissionError as e:
        raise DataError(f"{source}: access denied ({e}). Check your AWS credentials and bucket policy.")
    except FileNotFoundError:
        raise DataError(f"{source}: no such file, directory or bucket. Check data.source.")
    except OSError as e:
        raise DataError(f"{source}: cannot list: {str(e).splitlines()[0]}")
    files = [f for f in files if not fs.isdir(f)]
    if not files:
        raise DataError(f"{source}: matched no files. Check data.source (a path, a glob or an s3:// URI).")
    return [proto + f if proto and not f.startswith(proto) else f for f in files]


_BUCKETS_FOUND: set = set()


def _require_bucket(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
    """s3fs ``makedirs`` creates a missing bucket; a typo in run.dir must not create one in the
    user's account. A missing or invisible bucket is a one-line error instead."""
    if not uri.startswith(("s3://", "s3a://")):
        return
    bucket = path.split("/", 1)[0]
    if bucket in _BUCKETS_FOUND:
        return
    try:
        found = fs.exists(bucket)
    except PermissionError as e:
        raise DataError(f"{uri}: access denied to bucket '{bucket}' ({e}). Check your AWS credentials and bucket policy.")
    if not found:
        raise DataError(f"{uri}: bucket '{bucket}' does not exist or these credentials cannot see it. Create it first, or check the path.")
    _BUCKETS_FOUND.add(bucket)


def makedirs(uri: str) -> None:
    fs, path = get_fs(uri)
    _require_bucket(uri, fs, path)
    fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode())


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = get_fs(uri)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if parent:
        _require_bucket(uri, fs, path)
        fs.makedirs(parent, exist_ok=True)
    if is_remote(uri):
        # A single PUT is atomic on S3: readers see the old object or the new one.
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _strict(obj: Any) -> Any:
    """NaN and inf -> None, recursively: JSON has no NaN, and strict readers (jq, JavaScript,
    Spark, Go) reject the bare ``NaN`` that Python's json writes by default."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def to_json(obj: Any, **kw: Any) -> str:
    """Strict JSON (undefined numbers as null; see ``num`` for reading them back)."""
    return json.dumps(_strict(obj), allow_nan=False, default=str, **kw)


def num(x: Any) -> float:
    """A JSON number read back: null (an undefined metric, e.g. AUC on a one-class test set) -> NaN."""
    return float("nan") if x is None else float(x)


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (to_json(obj, indent=2, sort_keys=True) + "\n").encode())


def append_jsonl(uri: str, records: List[Dict[str, Any]]) -> None:
    """Append JSON lines. Local: O_APPEND; remote: read-modify-write (single writer: the driver)."""
    if not records:
        return
    blob = "".join(to_json(r, sort_keys=True) + "\n" for r in records).encode()
    if is_remote(uri):
        old = read_bytes(uri) if exists(uri) else b""
        write_bytes_atomic(uri, old + blob)
        return
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    with open(uri, "ab") as f:
        f.write(blob)


def read_jsonl(uri: str) -> List[Dict[str, Any]]:
    if not exists(uri):
        return []
    return [json.loads(line) for line in read_bytes(uri).decode().splitlines() if line.strip()]


def write_parquet_atomic(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(uri, buf.getvalue())


def read_parquet(uri: str, columns: Optional[List[str]] = None) -> pa.Table:
    fs, path = get_fs(uri)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(
            f"{uri}: not a readable Parquet file ({str(e).splitlines()[0]}). "
            "It may be truncated or corrupted; regenerate it (e.g. rerun prepare into a new run.dir)."
        )


def remove(uri: str, recursive: bool = True) -> None:
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def rename_dir(src: str, dst: str) -> None:
    """Move a staged directory into place (local: one atomic rename)."""
    if is_remote(src):
        fs, s = get_fs(src)
        _, d = get_fs(dst)
        fs.copy(s, d, recursive=True)
        fs.rm(s, recursive=True)
        return
    os.replace(src, dst)


def pyarrow_fs(uri: str):
    """A pyarrow filesystem for ``uri`` (for Ray Data and Ray Train storage)."""
    if not is_remote(uri):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = get_fs(uri)
    return PyFileSystem(FSSpecHandler(fs))


def strip_protocol(uri: str) -> str:
    return get_fs(uri)[1]
