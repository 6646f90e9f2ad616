"""Atomic, checksummed file writes shared by every layer that persists state.

A crash mid-write must never leave a half-written file where a good one stood: write to a temp file
in the same directory, fsync, then rename over the target (atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import yaml


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """`write(tmp_path)` fills a temp file beside `path`; it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; these are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_storage(uri: str):
    """(pyarrow filesystem, base path) of a storage location: a local or NFS path (`~` expanded, made
    absolute) or a URI pyarrow opens (`s3://`, `gs://`, ...), as Ray Train and Tune take `storage_path`.
    What every machine of a cluster reads: decision checkpoints, published models."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"storage {uri!r}: not a path or a filesystem URI pyarrow can open ({exc})") from exc


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged onto `base` key by key (nested mappings merge; anything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_mapping(path: str | os.PathLike, what: str = "config") -> dict:
    """Parse a YAML (or JSON) file that must hold a mapping (empty = {}), or raise a ValueError naming it."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
        raw = {} if raw is None else raw
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{what} {path}: cannot read ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {path}: expected a mapping of settings")
    return raw


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Parse a JSON file or raise a ValueError naming it."""
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError as exc:
        raise ValueError(f"{what} {path}: not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path}: corrupt JSON ({exc})") from exc
