"""Exact scoring of served requests: every prediction comes from running the MoE.

What does not change between slots is computed once: `TaskMoE.prepare` caches each pool example's
hidden states up to the first MoE layer's FFN (tokenisation, embeddings, the layers below and that
layer's attention), and predictions are memoised per (model spec, example), so a merge that is played
again (Tanbr's leaves, static merges, the full MoE) never recomputes an example it already served.
Only the requested rows run, and requests of different tasks that meet the same model run in one
batch (the trunk of a merged or routed model does not depend on the task; only the heads do), so a
slot costs what it serves, in as few forward passes as its distinct models allow.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tanbr_ray.moe.infer import _to_pred
from tanbr_ray.moe.metrics import glue_score, request_credit
from tanbr_ray.moe.precision import bf16
from tanbr_ray.sim.memo import DiskMemo, entry_key

# merged states kept (28 MB each in fp32, 14 under bf16): a slot's 9 nodes, the x they replay on the ψ
# grid, and Random's 64 points, which the regret comparator's random candidates then reuse (at 48,
# Random's plays re-merged half its points: 125 merges for 64 x)
STATE_CACHE = 128
MAX_ROWS = 32  # rows per forward pass: batches of ~32 are the fastest per example on CPU
# A forward pass costs about CALL_TOKENS padded tokens' worth before its first token (measured here:
# 1 row of 16 tokens 16 ms, 32 rows x 128 tokens 0.19 ms per token — the weights stream from memory
# once per pass), then time in proportion to rows x the widest row. `chunk_by_width` trades the two.
CALL_TOKENS = 64
# A model spec: ("merged", x bytes) | ("static", name) | ("oracle",) | ("top1",) | ("top2",)
Spec = tuple
Row = tuple  # (task, pool example index)


def merged_spec(x: np.ndarray) -> Spec:
    return ("merged", np.asarray(x, dtype=np.float64).tobytes())


def spec_mode(spec: Spec) -> str:
    """The TaskMoE forward mode a spec runs in."""
    return "merged" if spec[0] in ("merged", "static") else spec[0]


def chunk_by_width(widths: Sequence[int], call_tokens: int = CALL_TOKENS,
                   max_rows: int = MAX_ROWS) -> list[tuple[int, int]]:
    """Split rows sorted by width into [start, end) chunks that minimise the modelled cost
    sum(call_tokens + rows x widest row), at most `max_rows` a chunk (exact dynamic programme):
    one pass over rows of 18 and 128 tokens pads the short one sevenfold, two passes cost a call."""
    n = len(widths)
    if any(a > b for a, b in zip(widths, widths[1:])):
        raise ValueError("chunk_by_width: widths must be sorted ascending")
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for e in range(1, n + 1):
        for s in range(max(0, e - max_rows), e):
            cost = best[s] + call_tokens + (e - s) * widths[e - 1]
            if cost < best[e]:
                best[e], cut[e] = cost, s
    out, e = [], n
    while e > 0:
        out.append((cut[e], e))
        e = cut[e]
    return out[::-1]


class PoolEvaluator:
    """Predictions for (spec, task, example index) over a fixed pool of dev examples."""

    def __init__(self, moe, pool: Mapping[str, object], batch_size: int = 32, progress: bool = False,
                 bf16: bool = False, merge_operator: str | None = None, memo: DiskMemo | None = None):
        self.moe = moe
        self.disk = memo  # predictions of earlier runs of this model (None: this run only)
        self.disk_hits = 0
        self.merge_operator = merge_operator  # None: the model's own
        self.pool = dict(pool)
        self.bf16 = bf16  # bfloat16 autocast: ~2x faster on CPUs with bf16 units, logits move ~1e-3
        self.cache = moe.prepare(pool, batch_size=batch_size, progress=progress)
        self.labels = self.cache.labels
        self.where: dict[str, dict[int, tuple[int, int]]] = {t: {} for t in self.labels}
        self.width: dict[str, dict[int, int]] = {t: {} for t in self.labels}  # real tokens per example
        for b_no, b in enumerate(self.cache.batches):
            lengths = b.attention_mask.sum(1).tolist()
            for row, idx in enumerate(b.index):
                self.where[b.task][int(idx)] = (b_no, row)
                self.width[b.task][int(idx)] = int(lengths[row])
        self._memo: dict[Spec, dict[Row, float]] = {}
        self._states: OrderedDict[Spec, dict] = OrderedDict()
        self.forwards = 0  # examples actually run through the model
        self.padded_tokens = 0  # tokens those forward passes computed, padding included
        self.real_tokens = 0  # ... of which real (padded / real = the batching overhead)
        self.merge_seconds = 0.0  # spent merging experts into the models run
        self.run_seconds = 0.0  # spent running rows (merges included)

    def _state(self, spec: Spec):
        """Merged FFN weights for a spec; a small LRU, since each one is as big as the dense FFNs
        (28 MB for MiniLM) and predictions, not weights, are what gets reused."""
        if spec[0] not in ("merged", "static"):
            return None
        if spec in self._states:
            self._states.move_to_end(spec)
        else:
            t0 = time.perf_counter()
            if spec[0] == "merged":
                x = np.frombuffer(spec[1], dtype=np.float64).copy()
                self._states[spec] = self.moe.merged_state(x, self.merge_operator)
            else:
                self._states[spec] = self.moe.static_state(spec[1])
            if self.bf16:  # the casts autocast makes at every forward pass, made once (bit-identical)
                self._states[spec] = {k: v.to(torch.bfloat16) if k in ("w1", "w2") else v
                                      for k, v in self._states[spec].items()}
            self.merge_seconds += time.perf_counter() - t0
            while len(self._states) > STATE_CACHE:
                self._states.popitem(last=False)
        return self._states[spec]

    def predict(self, spec: Spec, task: str, indices: np.ndarray) -> np.ndarray:
        """Predictions of `spec` for these pool examples of one task (memoised)."""
        return self.predict_rows(spec, [(task, int(i)) for i in indices])

    @torch.no_grad()
    def predict_rows(self, spec: Spec, rows: Sequence[Row]) -> np.ndarray:
        """Predictions of `spec` for (task, example) rows of any tasks (memoised)."""
        memo = self._memo.setdefault(spec, {})
        missing = sorted({(t, int(i)) for t, i in rows} - memo.keys(), key=lambda r: (self.width[r[0]][r[1]], r))
        if missing and self.disk is not None:
            keys = {r: entry_key(spec, *r) for r in missing}
            found = {r: self.disk.get(k) for r, k in keys.items()}
            memo.update({r: v for r, v in found.items() if v is not None})
            self.disk_hits += sum(v is not None for v in found.values())
            missing = [r for r in missing if found[r] is None]
        if missing:
            preds = self._run(spec, missing)
            memo.update(zip(missing, preds))
            if self.disk is not None:
                for r, v in zip(missing, preds):
                    self.disk.put(keys[r], float(v))
        return np.asarray([memo[(t, int(i))] for t, i in rows], dtype=np.float64)

    def prefetch(self, work: Sequence[tuple[Spec, Sequence[Row]]], desc: str | None = None) -> None:
        """Run the rows of many (spec, rows) requests, each spec once over the union of its rows, so
        requests that share a model share forward passes (later `predict_rows` calls hit the memo).
        `desc`: show a progress bar over the specs under that name."""
        by_spec: dict[Spec, list[Row]] = {}
        for spec, rows in work:
            by_spec.setdefault(spec, []).extend(rows)
        for spec, rows in tqdm(by_spec.items(), desc=desc, disable=desc is None, leave=False):
            self.predict_rows(spec, rows)

    @torch.no_grad()
    def logits(self, spec: Spec, task: str, indices) -> torch.Tensor:
        """Logits of one task's pool examples, in the given order (runs them; no memo)."""
        return self.logits_rows(spec, [(task, int(i)) for i in indices])[task][1]

    def _run(self, spec: Spec, rows: list[Row]) -> list[float]:
        """Predictions for rows sorted by length, in chunks of similar length (`chunk_by_width`; the
        oracle's FFN depends on the task, so it batches one task at a time)."""
        t0 = time.perf_counter()
        preds = {}
        groups = [[r for r in rows if r[0] == t] for t in self.labels] if spec[0] == "oracle" else [rows]
        for group in groups:
            widths = [self.width[t][i] for t, i in group]
            for s, e in chunk_by_width(widths):
                chunk = group[s:e]
                self.padded_tokens += (e - s) * widths[e - 1]
                self.real_tokens += sum(widths[s:e])
                for task, (where, logits) in self.logits_rows(spec, chunk).items():
                    preds.update(zip([chunk[k] for k in where], _to_pred(task, logits)))
        self.run_seconds += time.perf_counter() - t0
        return [float(preds[r]) for r in rows]

    @torch.no_grad()
    def logits_rows(self, spec: Spec, rows: list[Row]) -> dict[str, tuple[list[int], torch.Tensor]]:
        """One forward pass over rows of one or more tasks: per task, (positions in rows, logits).
        The oracle's FFN is the task's expert, so its rows must share one task."""
        if spec[0] == "oracle" and len({t for t, _ in rows}) > 1:
            raise ValueError("oracle spec: one forward pass serves one task's rows only")
        width = max(self.width[t][i] for t, i in rows)
        h, mask = [], []
        for t, i in rows:
            b_no, row = self.where[t][i]
            b = self.cache.batches[b_no]
            hb, mb = b.h[row, :width], b.attention_mask[row, :width]
            if hb.shape[0] < width:  # from a bucket narrower than this chunk: pad (masked out)
                pad = width - hb.shape[0]
                hb = torch.nn.functional.pad(hb, (0, 0, 0, pad))
                mb = torch.nn.functional.pad(mb, (0, pad))
            h.append(hb)
            mask.append(mb)
        h, mask = torch.stack(h), torch.stack(mask)
        mode, state = spec_mode(spec), self._state(spec)
        with bf16(h.device, enabled=self.bf16):
            pooled, use = self.moe.pooled_from_first_moe(h, mask, rows[0][0], mode, state=state)
            out = {}
            for task in dict.fromkeys(t for t, _ in rows):
                where = [k for k, (t, _) in enumerate(rows) if t == task]
                out[task] = (where, self.moe.head_for(mode, task, use)(pooled[where]).float())
        self.forwards += len(rows)
        return out

    def text(self, task: str, i: int) -> tuple[str, str | None]:
        """The request text of pool example i: (text_a, text_b or None)."""
        sp = self.pool[task]
        return sp.text_a[i], None if sp.text_b is None else sp.text_b[i]

    def credit(self, task: str, indices: np.ndarray, preds: np.ndarray) -> np.ndarray:
        """Per-request credit in [0, 1]: correct (classification) or 1 - |error|/5 (STS-B)."""
        return request_credit(task, preds, self.labels[task][indices])

    def glue(self, task: str, indices: np.ndarray, preds: np.ndarray) -> float:
        return float(glue_score(task, preds, self.labels[task][indices]))
