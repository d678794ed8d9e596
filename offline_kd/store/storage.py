"""Where a store lives: local paths and fsspec URLs, checked before any expensive work.

A store URL is a local path, ``file://PATH`` or any fsspec URL (``s3://bucket/kd/store.zarr``,
``gs://…``, ``memory://…``). Its filesystem comes from an optional package (``s3fs`` for
``s3://``: ``pip install 'offline-kd[s3]'``), is configured by ``--storage-option KEY=VALUE``
(`parse_options`) and takes credentials from its usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, …). `check_store_url` refuses a URL whose filesystem is missing or whose
bucket cannot be reached, in one line naming the URL, so that a bad URL costs seconds, not a
teacher load and a corpus pass.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from offline_kd.runtime.errors import UsageError

# Filesystems whose first path component is a bucket (container) that must exist beforehand.
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
# The install hint for each protocol's package, when it has an extra of ours.
EXTRAS = {"s3": "offline-kd[s3]", "s3a": "offline-kd[s3]"}
# Storage-option keys whose values are credentials: never written to run files.
SECRET_WORDS = ("secret", "password", "token", "key", "credential", "sas", "signature")


class StorageError(UsageError):
    """A store URL cannot be used: unknown or missing filesystem, bad options, bucket unreachable."""


def split_url(url: str) -> tuple[str, str]:
    """``(protocol, path)``: ``("s3", "bucket/kd/x.zarr")``; a plain path is ``("file", path)``."""
    from fsspec.core import split_protocol

    protocol, path = split_protocol(str(url))
    return (protocol or "file"), path


def is_local(url: str) -> bool:
    return split_url(url)[0] in ("file", "local")


def local_path(url: str) -> Path:
    """The local path of a local store URL (``file://`` removed)."""
    return Path(split_url(url)[1])


def _coerce(value: Any) -> Any:
    """A command-line string as the filesystem wants it: true/false, null, numbers, JSON objects."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value.lstrip().startswith(("{", "[")):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def parse_options(options: dict | None) -> dict:
    """fsspec keyword arguments from ``--storage-option`` pairs.

    Values are typed (``anon=true`` → True, ``max_concurrency=8`` → 8, ``{...}`` → a dict) and a
    dotted key nests (``client_kwargs.region_name=eu-west-1`` →
    ``{"client_kwargs": {"region_name": "eu-west-1"}}``). Values already typed are kept.
    """
    out: dict = {}
    for key, value in (options or {}).items():
        *parents, leaf = str(key).split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise StorageError(f"--storage-option {key}: {part!r} is already set to a value")
        node[leaf] = _coerce(value)
    return out


def redact(options: dict | None) -> dict | None:
    """The options with credential values replaced by ``"***"`` (for run files and logs)."""
    if options is None:
        return None
    out = {}
    for key, value in options.items():
        if any(word in str(key).lower() for word in SECRET_WORDS):
            out[key] = "***"
        else:
            out[key] = redact(value) if isinstance(value, dict) else value
    return out


def filesystem(url: str, options: dict | None = None):
    """The fsspec filesystem of ``url`` with ``options``; StorageError when it cannot be made."""
    import fsspec

    protocol, _ = split_url(url)
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        hint = EXTRAS.get(protocol)
        install = f"pip install '{hint}'" if hint else str(e)
        raise StorageError(f"store {url!r}: the {protocol}:// filesystem is not installed ({install})") from e
    except ValueError as e:
        raise StorageError(f"store {url!r}: unknown URL scheme {protocol!r} (no fsspec filesystem)") from e
    kwargs = parse_options(options)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise StorageError(f"store {url!r}: bad --storage-option for {protocol}://: {e}") from e


def _endpoint(options: dict | None) -> str:
    opts = parse_options(options)
    url = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    url = url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" at {url}" if url else ""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def check_store_url(url: str, options: dict | None = None, *, writing: bool = False) -> None:
    """Refuse a store URL that cannot work, cheaply and before anything expensive.

    Checks that the URL's filesystem is installed and accepts ``options``; for an object store,
    that its bucket exists and answers; for a local store to be written, that the nearest
    existing parent is a writable directory. Raises :class:`StorageError` naming the URL.
    Whether the store itself exists is left to the caller (a missing store is fine to write).
    """
    protocol, path = split_url(url)
    if protocol in ("file", "local"):
        if writing:
            _check_local_writable(url, Path(path))
        return
    fs = filesystem(url, options)
    if protocol not in BUCKET_PROTOCOLS:
        return
    bucket = path.strip("/").split("/", 1)[0]
    if not bucket:
        raise StorageError(f"store {url!r} names no bucket ({protocol}://BUCKET/PATH)")
    try:
        fs.info(bucket)
    except FileNotFoundError as e:
        raise StorageError(f"store {url!r}: bucket {bucket!r} does not exist{_endpoint(options)}") from e
    except TypeError as e:  # options are passed on to the client only when it first connects
        raise StorageError(f"store {url!r}: bad --storage-option for {protocol}://: {_one_line(e)}") from e
    except PermissionError as e:
        raise StorageError(
            f"store {url!r}: access to bucket {bucket!r} denied{_endpoint(options)} ({_one_line(e)}); "
            "check the credentials in the environment"
        ) from e
    except Exception as e:  # noqa: BLE001 - connection, credential and endpoint errors of any backend
        raise StorageError(
            f"store {url!r}: cannot reach bucket {bucket!r}{_endpoint(options)}: {_one_line(e)}"
        ) from e


def _check_local_writable(url: str, path: Path) -> None:
    p = path.absolute()
    if p.exists() and not p.is_dir():
        raise StorageError(f"store {url!r} is an existing file, not a directory")
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise StorageError(f"store {url!r}: {str(p)!r} is a file, not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise StorageError(f"store {url!r}: directory {str(p)!r} is not writable")


def free_space(url: str) -> tuple[int, Path] | None:
    """Free bytes where a local store would be written (and where they were measured); None for a
    remote store, whose free space cannot be known."""
    if not is_local(url):
        return None
    p = local_path(url).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free, p
