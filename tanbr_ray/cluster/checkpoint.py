"""Numbered, checksummed, atomically published checkpoints of the router (Ray-free).

`save(write)` lets the caller fill a hidden temp directory, records every file's sha256 in
MANIFEST.json, fsyncs files and directory, then renames it to `ckpt-<seq>` — a reader sees a whole
checkpoint or none. `latest()` walks checkpoints newest first and returns the first whose manifest
and every file check out, with a clear error naming the file for each one refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from tanbr_ray.fileio import read_json, sha256_bytes, sha256_file

MANIFEST = "MANIFEST.json"
PREFIX = "ckpt-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 2:
            raise ValueError("checkpoint keep: at least 2 (a corrupt newest one needs a fallback)")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Published checkpoints, newest first."""
        return sorted((p for p in self.dir.glob(f"{PREFIX}*") if p.is_dir()), key=lambda p: p.name, reverse=True)

    def save(self, write: Callable[[Path], None]) -> Path:
        existing = self.checkpoints()
        seq = int(existing[0].name[len(PREFIX):]) + 1 if existing else 0
        tmp = self.dir / f".tmp-{seq:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write(tmp)
            files = {}
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                files[str(f.relative_to(tmp))] = sha256_file(f)
            body = {"seq": seq, "files": files}
            manifest = {**body, "sha256": sha256_bytes(json.dumps(body, sort_keys=True).encode())}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            with open(tmp / MANIFEST, "rb+") as fh:
                os.fsync(fh.fileno())
            for d in {tmp, *(p.parent for p in tmp.rglob("*") if p.is_file())}:
                _fsync_dir(d)
            final = self.dir / f"{PREFIX}{seq:08d}"
            os.rename(tmp, final)
            _fsync_dir(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.checkpoints()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def verify(path: Path) -> None:
        """Raise ValueError naming the file if the checkpoint is incomplete, truncated or altered."""
        m = read_json(path / MANIFEST, "checkpoint manifest")
        try:
            body = {"seq": m["seq"], "files": m["files"]}
            ok = m["sha256"] == sha256_bytes(json.dumps(body, sort_keys=True).encode())
        except (KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint manifest {path / MANIFEST}: malformed ({exc})") from exc
        if not ok:
            raise ValueError(f"checkpoint manifest {path / MANIFEST}: checksum mismatch (altered)")
        for rel, digest in m["files"].items():
            f = path / rel
            if not f.is_file():
                raise ValueError(f"checkpoint file {f}: missing")
            if sha256_file(f) != digest:
                raise ValueError(f"checkpoint file {f}: sha256 mismatch (truncated or altered)")

    def latest(self) -> tuple[Path | None, list[str]]:
        """(newest valid checkpoint or None, errors for the newer ones refused)."""
        errors = []
        for p in self.checkpoints():
            try:
                self.verify(p)
                return p, errors
            except ValueError as exc:
                errors.append(str(exc))
        return None, errors
