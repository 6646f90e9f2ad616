"""Numbered, checksummed checkpoints of the router in cluster storage (Ray-free).

`storage` is what every machine of the cluster reads: a local or NFS path, or an object-store URI
(`s3://bucket/prefix`, `gs://...`) through pyarrow's filesystems, as Ray Train and Tune take
`storage_path`. A standby on another machine restores what the leader wrote there.

`save(write)` lets the caller fill a local temp directory; its files are uploaded under
`ckpt-<seq>/`, and MANIFEST.json (every file's sha256, and its own) is written last. The manifest is
the commit point, so no rename is needed (object stores have none): a reader trusts a checkpoint only
when its manifest and every file check out. `fence()`, asked just before the commit, lets a leader
whose term has passed raise instead of committing. `latest()` walks checkpoints newest first, copies
the first valid one into a local directory and returns it, with a clear error naming the file for
each one refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

from tanbr_ray.fileio import open_storage, sha256_bytes

MANIFEST = "MANIFEST.json"
PREFIX = "ckpt-"
_NAME = re.compile(rf"^{PREFIX}(\d{{8}})$")


class CheckpointStore:
    def __init__(self, storage: str, keep: int = 3):
        if keep < 2:
            raise ValueError("checkpoint keep: at least 2 (a corrupt newest one needs a fallback)")
        self.uri = storage
        self.fs, self.base = open_storage(storage)
        self.fs.create_dir(self.base, recursive=True)
        self.keep = keep
        self._local: Path | None = None  # where the last restored checkpoint was copied

    def _path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def _listed(self) -> list[str]:
        """Every `ckpt-*` directory, committed or not, newest first."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pafs.FileType.Directory and _NAME.match(i.base_name)]
        return sorted(names, reverse=True)

    def checkpoints(self) -> list[str]:
        """Names of committed checkpoints (a manifest present), newest first."""
        return [n for n in self._listed()
                if self.fs.get_file_info(self._path(n, MANIFEST)).type == pafs.FileType.File]

    def save(self, write: Callable[[Path], None], fence: Callable[[], None] | None = None) -> str:
        """Fill a local temp dir (`write`), upload it as the next checkpoint, commit it with its
        manifest (after `fence()`, which raises to refuse), prune old ones; returns its name."""
        listed = self._listed()
        seq = int(listed[0][len(PREFIX):]) + 1 if listed else 0  # never reuse a half-written one's number
        name = f"{PREFIX}{seq:08d}"
        with tempfile.TemporaryDirectory(prefix="tanbr-ckpt-") as tmp:
            write(Path(tmp))
            files = {}
            for f in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
                rel = f.relative_to(tmp).as_posix()
                data = f.read_bytes()
                self._put(self._path(name, rel), data)
                files[rel] = hashlib.sha256(data).hexdigest()
        body = {"seq": seq, "files": files}
        manifest = {**body, "sha256": sha256_bytes(json.dumps(body, sort_keys=True).encode())}
        try:
            if fence is not None:
                fence()
        except BaseException:
            self.fs.delete_dir(self._path(name))
            raise
        self._put(self._path(name, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
        committed = self.checkpoints()
        for old in committed[self.keep:]:
            self.fs.delete_dir(self._path(old))
        for stray in (n for n in self._listed() if n not in committed and n < name):
            self.fs.delete_dir(self._path(stray))  # uploads that never committed (a writer died)
        return name

    def _put(self, path: str, data: bytes) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def _get(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def fetch(self, name: str, into: Path) -> Path:
        """Copy checkpoint `name` into `into`, verifying it; ValueError naming the file if it is
        incomplete, truncated or altered."""
        where = self._path(name)
        try:
            m = json.loads(self._get(self._path(name, MANIFEST)))
            body = {"seq": m["seq"], "files": m["files"]}
            ok = m["sha256"] == sha256_bytes(json.dumps(body, sort_keys=True).encode())
        except FileNotFoundError:
            raise ValueError(f"checkpoint manifest {where}/{MANIFEST}: missing") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint manifest {where}/{MANIFEST}: malformed ({exc})") from exc
        if not ok:
            raise ValueError(f"checkpoint manifest {where}/{MANIFEST}: checksum mismatch (altered)")
        for rel, digest in m["files"].items():
            try:
                data = self._get(self._path(name, rel))
            except FileNotFoundError:
                raise ValueError(f"checkpoint file {where}/{rel}: missing") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise ValueError(f"checkpoint file {where}/{rel}: sha256 mismatch (truncated or altered)")
            (into / rel).parent.mkdir(parents=True, exist_ok=True)  # a refused one may leave files: callers discard it
            (into / rel).write_bytes(data)
        return into

    def verify(self, name: str) -> None:
        """Raise ValueError naming the file if checkpoint `name` is incomplete, truncated or altered."""
        with tempfile.TemporaryDirectory(prefix="tanbr-ckpt-") as tmp:
            self.fetch(name, Path(tmp))

    def latest(self) -> tuple[Path | None, list[str]]:
        """(a local copy of the newest valid checkpoint or None, errors for the newer ones refused).
        The copy stays until the next `latest()`."""
        errors = []
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
        self._local = Path(tempfile.mkdtemp(prefix="tanbr-restore-"))
        for name in self.checkpoints():
            try:
                return self.fetch(name, self._local / name), errors  # the copy is named as the checkpoint
            except ValueError as exc:
                errors.append(str(exc))
        return None, errors

    def damage(self, name: str, rel: str, keep_fraction: float = 1 / 3) -> str:
        """Truncate one stored file (fault injection: what a failed disk or upload would leave)."""
        data = self._get(self._path(name, rel))
        self._put(self._path(name, rel), data[: max(1, int(len(data) * keep_fraction))])
        return f"{self.uri.rstrip('/')}/{name}/{rel}"

    def files(self, name: str) -> list[str]:
        """The files a checkpoint's manifest lists."""
        return sorted(json.loads(self._get(self._path(name, MANIFEST)))["files"])

