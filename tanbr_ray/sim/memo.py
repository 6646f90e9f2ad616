"""Predictions memoised on disk, so reruns and further seeds reuse what was already computed.

A prediction is keyed by what was predicted, never by where the example sits in a sample: the
model (its weights' checksum names the folder), the merge operator and precision (they name the file
and salt every key), the serving spec (x, static merge or routed mode) and the example's content
(task, text(s); `example_id`), hashed to 64 bits. So a run on another pool, another `data_dir` or an
updated dataset reuses exactly the predictions of the examples it shares, and computes the rest.

One safetensors file holds the keys and predictions; a JSON sidecar records the format, its sha256
and entry count, and both are written atomically. A file whose format, checksum or shape does not
match is refused — its entries are never trusted, they are recomputed — and the next save replaces
it. The evaluator also recomputes a seeded sample of hits (`sim/evaluate.py`); a mismatch there
refuses the file the same way (`DiskMemo.refuse`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tanbr_ray.fileio import atomic_write, atomic_write_json, sha256_file

log = logging.getLogger(__name__)
FORMAT = "tanbr-prediction-memo/2"  # /1 keyed entries by pool position: never read


def example_id(task: str, text_a: str, text_b: str | None) -> bytes:
    """16-byte content hash of one request as the model sees it: its head (task) and text(s)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (task, text_a, "\x00" if text_b is None else text_b):
        h.update(part.encode())
        h.update(b"\x1f")
    return h.digest()


def entry_key(salt: bytes, spec: tuple, example: bytes) -> int:
    """64-bit key of one prediction: memo salt (operator, precision), spec (parts may be bytes, e.g.
    x) and the example's content hash."""
    h = hashlib.blake2b(salt + b"\x1e", digest_size=8)
    for part in spec:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\x1f")
    h.update(example)
    return int.from_bytes(h.digest(), "little", signed=True)


class DiskMemo:
    """A {key: prediction} table backed by `<folder>/<operator>-<precision>.safetensors` (+ `.json`)."""

    def __init__(self, folder: str | Path, operator: str, precision: str):
        name = f"{operator}-{precision}"
        self.salt = name.encode()
        self.path = Path(folder) / f"{name}.safetensors"
        self.meta_path = Path(folder) / f"{name}.json"
        self.table: dict[int, float] = {}
        self.new: dict[int, float] = {}
        self.refused: str | None = None
        self._load()

    def key(self, spec, example: bytes) -> int:
        """The entry of a `Spec`'s prediction for an example (by its parts, so keys do not depend on
        how a spec is represented in memory)."""
        return entry_key(self.salt, spec.parts(), example)

    def _load(self) -> None:
        if not self.path.exists() and not self.meta_path.exists():
            return
        try:
            meta = json.loads(self.meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r} is not {FORMAT!r}")
            if sha256_file(self.path) != meta["sha256"]:
                raise ValueError("sha256 mismatch")
            t = load_file(str(self.path))
            keys, preds = t["keys"].numpy(), t["preds"].numpy()
            if keys.shape != preds.shape or len(keys) != int(meta["entries"]):
                raise ValueError("entry count mismatch")
        except Exception as e:  # any defect: refuse the whole file, recompute its entries
            self.refuse(str(e))
            return
        self.table = dict(zip(keys.tolist(), preds.tolist()))

    def refuse(self, reason: str) -> None:
        """Trust nothing the file held (entries of this run included); the next save replaces it."""
        self.refused = f"{self.path}: refused ({reason}); its predictions are recomputed"
        log.warning(self.refused)
        self.table, self.new = {}, {}

    def get(self, key: int) -> float | None:
        return self.table.get(key)

    def put(self, key: int, value: float) -> None:
        self.table[key] = value
        self.new[key] = value

    def save(self) -> None:
        """Write everything known (old and new entries) if anything is new or the file was refused."""
        if not self.new and self.refused is None:
            return
        keys = torch.as_tensor(np.fromiter(self.table.keys(), dtype=np.int64, count=len(self.table)))
        preds = torch.as_tensor(np.fromiter(self.table.values(), dtype=np.float64, count=len(self.table)))
        atomic_write(self.path, lambda p: save_file({"keys": keys, "preds": preds}, p))
        atomic_write_json(self.meta_path, {"format": FORMAT, "sha256": sha256_file(self.path), "entries": len(self.table)})
        self.new = {}


def stored_entries(folder: str | Path, operator: str, precision: str) -> int:
    """How many predictions a memo file says it holds (0 if there is none or it cannot be read): what a
    run can hope to reuse, said before it starts (`DiskMemo` still verifies the file when it loads it)."""
    try:
        return int(json.loads((Path(folder) / f"{operator}-{precision}.json").read_text()).get("entries", 0))
    except (OSError, ValueError, AttributeError):
        return 0
