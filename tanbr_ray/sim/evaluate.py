"""Exact scoring of served requests: every prediction comes from running the MoE.

What does not change between slots is computed once: `TaskMoE.prepare` caches each pool example's
hidden states up to the first MoE layer's FFN (tokenisation, embeddings, the layers below and that
layer's attention), and predictions are memoised per (model spec, example), so a merge that is played
again (Tanbr's leaves, static merges, the full MoE) never recomputes an example it already served.
Only the requested rows of a cached bucket are run, so a slot costs what it serves.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np
import torch

from tanbr_ray.moe.infer import _to_pred
from tanbr_ray.moe.metrics import glue_score

STATE_CACHE = 8
# A model spec: ("merged", x bytes) | ("static", name) | ("oracle",) | ("top1",) | ("top2",)
Spec = tuple


def merged_spec(x: np.ndarray) -> Spec:
    return ("merged", np.asarray(x, dtype=np.float64).tobytes())


class PoolEvaluator:
    """Predictions for (spec, task, example index) over a fixed pool of dev examples."""

    def __init__(self, moe, pool: Mapping[str, object], batch_size: int = 32, progress: bool = False,
                 bf16: bool = False):
        self.moe = moe
        self.pool = dict(pool)
        self.bf16 = bf16  # bfloat16 autocast: ~2x faster on CPUs with bf16 units, logits move ~1e-3
        self.cache = moe.prepare(pool, batch_size=batch_size, progress=progress)
        self.labels = self.cache.labels
        self.where: dict[str, dict[int, tuple[int, int]]] = {t: {} for t in self.labels}
        for b_no, b in enumerate(self.cache.batches):
            for row, idx in enumerate(b.index):
                self.where[b.task][int(idx)] = (b_no, row)
        self._memo: dict[Spec, dict[str, dict[int, float]]] = {}
        self._states: OrderedDict[Spec, dict] = OrderedDict()
        self.forwards = 0  # examples actually run through the model

    def _state(self, spec: Spec):
        """Merged FFN weights for a spec; a small LRU, since each one is as big as the dense FFNs
        (28 MB for MiniLM) and predictions, not weights, are what gets reused."""
        if spec[0] not in ("merged", "static"):
            return None
        if spec in self._states:
            self._states.move_to_end(spec)
        else:
            if spec[0] == "merged":
                self._states[spec] = self.moe.merged_state(np.frombuffer(spec[1], dtype=np.float64).copy())
            else:
                self._states[spec] = self.moe.static_state(spec[1])
            while len(self._states) > STATE_CACHE:
                self._states.popitem(last=False)
        return self._states[spec]

    @torch.no_grad()
    def predict(self, spec: Spec, task: str, indices: np.ndarray) -> np.ndarray:
        """Predictions of `spec` for these pool examples of one task (memoised)."""
        memo = self._memo.setdefault(spec, {}).setdefault(task, {})
        missing = sorted({int(i) for i in indices} - memo.keys())
        if missing:
            for i, p in zip(missing, _to_pred(task, self.logits(spec, task, missing))):
                memo[i] = float(p)
        return np.asarray([memo[int(i)] for i in indices])

    @torch.no_grad()
    def logits(self, spec: Spec, task: str, indices) -> torch.Tensor:
        """Logits for these pool examples, running only their rows of each cached bucket."""
        mode = "merged" if spec[0] in ("merged", "static") else spec[0]
        state = self._state(spec) if mode == "merged" else None
        by_batch: dict[int, list[tuple[int, int]]] = {}
        for k, i in enumerate(indices):
            b_no, row = self.where[task][int(i)]
            by_batch.setdefault(b_no, []).append((row, k))
        out = None
        for b_no, rows in by_batch.items():
            b = self.cache.batches[b_no]
            r = torch.as_tensor([row for row, _ in rows])
            mask = b.attention_mask[r]
            width = int(mask.sum(1).max())  # trim padding the subset does not need
            with torch.autocast(b.h.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.moe.forward_from_first_moe(b.h[r][:, :width], mask[:, :width], task, mode,
                                                         state=state).float()
            if out is None:
                out = logits.new_zeros((len(indices), logits.shape[1]))
            out[[k for _, k in rows]] = logits
        self.forwards += len(indices)
        return out

    def text(self, task: str, i: int) -> tuple[str, str | None]:
        """The request text of pool example i: (text_a, text_b or None)."""
        sp = self.pool[task]
        return sp.text_a[i], None if sp.text_b is None else sp.text_b[i]

    def credit(self, task: str, indices: np.ndarray, preds: np.ndarray) -> np.ndarray:
        """Per-request credit in [0, 1]: correct (classification) or 1 - |error|/5 (STS-B)."""
        y = self.labels[task][indices]
        if task == "STS-B":
            return np.clip(1.0 - np.abs(preds - y) / 5.0, 0.0, 1.0)
        return (preds == y).astype(np.float64)

    def glue(self, task: str, indices: np.ndarray, preds: np.ndarray) -> float:
        return float(glue_score(task, preds, self.labels[task][indices]))
