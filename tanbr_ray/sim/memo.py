"""Predictions memoised on disk, so reruns and further seeds reuse what was already computed.

Keyed by the model (its weights' checksum names the folder), the merge operator and precision (they
name the file), and per entry by (model spec, task, pool example) hashed to 64 bits. One safetensors
file holds the keys and predictions; a JSON sidecar records its sha256 and entry count, and both are
written atomically. A file whose checksum or shape does not match is refused — its entries are never
trusted, they are recomputed — and the next save replaces it.
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
FORMAT = "tanbr-prediction-memo/1"


def entry_key(spec: tuple, task: str, index: int) -> int:
    """64-bit key of one prediction (spec parts may be bytes, e.g. x)."""
    h = hashlib.blake2b(digest_size=8)
    for part in spec:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\x1f")
    h.update(f"{task}\x1f{int(index)}".encode())
    return int.from_bytes(h.digest(), "little", signed=True)


class DiskMemo:
    """A {key: prediction} table backed by `<folder>/<name>.safetensors` (+ `.json`)."""

    def __init__(self, folder: str | Path, name: str):
        self.path = Path(folder) / f"{name}.safetensors"
        self.meta_path = Path(folder) / f"{name}.json"
        self.table: dict[int, float] = {}
        self.new: dict[int, float] = {}
        self.refused: str | None = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists() and not self.meta_path.exists():
            return
        try:
            meta = json.loads(self.meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError("not a prediction memo")
            if sha256_file(self.path) != meta["sha256"]:
                raise ValueError("sha256 mismatch")
            t = load_file(str(self.path))
            keys, preds = t["keys"].numpy(), t["preds"].numpy()
            if keys.shape != preds.shape or len(keys) != int(meta["entries"]):
                raise ValueError("entry count mismatch")
        except Exception as e:  # any defect: refuse the whole file, recompute its entries
            self.refused = f"{self.path}: refused ({e}); its predictions will be recomputed"
            log.warning(self.refused)
            return
        self.table = dict(zip(keys.tolist(), preds.tolist()))

    def get(self, key: int) -> float | None:
        return self.table.get(key)

    def put(self, key: int, value: float) -> None:
        self.table[key] = value
        self.new[key] = value

    def save(self) -> None:
        """Write everything known (old and new entries) if anything is new."""
        if not self.new and self.refused is None:
            return
        keys = torch.as_tensor(np.fromiter(self.table.keys(), dtype=np.int64, count=len(self.table)))
        preds = torch.as_tensor(np.fromiter(self.table.values(), dtype=np.float64, count=len(self.table)))
        atomic_write(self.path, lambda p: save_file({"keys": keys, "preds": preds}, p))
        atomic_write_json(self.meta_path, {"format": FORMAT, "sha256": sha256_file(self.path), "entries": len(self.table)})
        self.new, self.refused = {}, None
