"""Exact scoring of served requests: every prediction comes from running the MoE.

What does not change between slots is computed once: the model's `prepare` caches each pool example's
hidden states up to the first MoE layer's FFN (tokenisation, embeddings, the layers below and that
layer's attention; in memory, for this run only), and predictions are memoised per (model spec,
example), so a merge that is played again (Tanbr's leaves, static merges, the full MoE) never
recomputes an example it already served. Across runs, the disk memo (`sim/memo.py`) is keyed by the
example's content; a seeded sample of its hits is recomputed and compared before any is used
(`MemoCheck`), so a stale or altered file cannot pass for a measurement.
Only the requested rows run, and requests of different tasks that meet the same model run in one
batch (the trunk of a merged or routed model does not depend on the task; only the heads do), so a
slot costs what it serves, in as few forward passes as its distinct models allow.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tanbr_ray.moe.infer import _to_pred
from tanbr_ray.moe.metrics import glue_score, request_credit
from tanbr_ray.moe.precision import bf16
from tanbr_ray.sim.memo import DiskMemo, example_id
from tanbr_ray.sim.spec import Spec

# merged states are kept up to this many bytes (MiniLM's are 14 MB under bf16, 28 MB in fp32): a slot's
# nodes, the x they replay on the ψ grid and most of Random's 64 points, which the regret comparator's
# random candidates then reuse, without the cache alone outgrowing a laptop's memory
STATE_CACHE_BYTES = 768 << 20
MAX_ROWS = 32  # rows per forward pass: batches of ~32 are the fastest per example on CPU
# A forward pass costs about CALL_TOKENS padded tokens' worth before its first token (measured here:
# 1 row of 16 tokens 16 ms, 32 rows x 128 tokens 0.19 ms per token — the weights stream from memory
# once per pass), then time in proportion to rows x the widest row. `chunk_by_width` trades the two.
CALL_TOKENS = 64
Row = tuple  # (task, pool example index)


def _nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


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


class MemoMismatch(RuntimeError):
    """A disk-memo prediction disagreed with the model recomputing it: the file cannot be trusted."""


@dataclass
class MemoCheck:
    """Which disk-memo hits are recomputed before use: the first `first` hits after each `begin` (a
    policy, the regret comparator), then a seeded `fraction` of the rest whose model this run holds
    already (chosen by hashing the entry key with the seed, so the sample does not depend on the
    order requests arrive in). A stale or foreign memo is wrong nearly everywhere, so the first hits
    of every policy catch it; the tail widens the sample at the price of forwards only, since a merge
    (0.2 s for x-weighted RegMean here) costs as much as ~40 forwards and a rerun plays hundreds of x.

    A stored class agrees when the recomputed logits put it within `class_tol` of their maximum
    (exact argmax, but a near-tie that the batch's padding flips is no evidence of a bad file); a
    regression output agrees within `value_tol`."""

    seed: int = 0
    first: int = 32
    fraction: float = 0.01
    class_tol: float = 1e-4
    value_tol: float = 1e-4
    left: int = 0  # of `first`, in the current stretch
    checked: int = 0  # over the run

    def begin(self) -> None:
        self.left = self.first

    def pick(self, key: int, held: bool) -> bool:
        """Verify this hit? `held`: its model is at hand (no merge needed to recompute it)."""
        if self.left > 0:
            self.left -= 1
            return True
        if not held:
            return False
        digest = hashlib.blake2b(key.to_bytes(8, "little", signed=True), digest_size=4,
                                 key=self.seed.to_bytes(8, "little", signed=True)).digest()
        return int.from_bytes(digest, "little") < self.fraction * 2**32

    def agrees(self, task: str, stored: float, logits: torch.Tensor) -> bool:
        if task == "STS-B":
            return abs(float(logits[0]) - stored) <= self.value_tol
        return float(logits[int(stored)]) >= float(logits.max()) - self.class_tol


def check_for(bf16_serving: bool, seed: int) -> MemoCheck:
    """Tolerances for the precision the predictions were made in. Measured on the default model (512
    rows x top-1, static RegMean and one random x, batched whole and in random groups of 5): another
    batch moved fp32 logits by at most 2.2e-6 and bf16 logits by up to 0.044, flipping 2 argmaxes in
    1,536 (bf16 rounds every matmul's output, so the reduction order a batch shape picks shows)."""
    return MemoCheck(seed=seed, class_tol=0.1, value_tol=0.1) if bf16_serving else MemoCheck(seed=seed)


class PoolEvaluator:
    """Predictions for (spec, task, example index) over a fixed pool of dev examples."""

    def __init__(self, moe, pool: Mapping[str, object], batch_size: int = 32, progress: bool = False,
                 bf16: bool = False, merge_operator: str | None = None, memo: DiskMemo | None = None,
                 check: MemoCheck | None = None):
        self.moe = moe
        self.disk = memo  # predictions of earlier runs of this model (None: this run only)
        self.check = check or check_for(bf16, 0)  # which of the disk memo's hits are recomputed
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
        # each example's content hash: what the disk memo keys it by, and what names the pool
        self.ids = {t: [example_id(t, *self.text(t, i)) for i in range(len(self.labels[t]))] for t in self.labels}
        self._memo: dict[Spec, dict[Row, float]] = {}
        self._states: OrderedDict[Spec, dict] = OrderedDict()
        self.state_bytes = 0  # held by _states, at most STATE_CACHE_BYTES (and one state)
        self.forwards = 0  # examples actually run through the model
        self.padded_tokens = 0  # tokens those forward passes computed, padding included
        self.real_tokens = 0  # ... of which real (padded / real = the batching overhead)
        self.merge_seconds = 0.0  # spent merging experts into the models run
        self.run_seconds = 0.0  # spent running rows (merges included)

    def _state(self, spec: Spec):
        """Merged FFN weights for a spec; an LRU bounded in bytes (`STATE_CACHE_BYTES`), since each one
        is as big as the dense FFNs and predictions, not weights, are what gets reused."""
        if spec.mode != "merged":
            return None
        if spec in self._states:
            self._states.move_to_end(spec)
        else:
            t0 = time.perf_counter()
            if spec.kind == "merged":
                self._states[spec] = self.moe.merged_state(spec.x, self.merge_operator)
            else:
                self._states[spec] = self.moe.static_state(spec.operator)
            if self.bf16:  # the casts autocast makes at every forward pass, made once (bit-identical)
                self._states[spec] = {k: v.to(torch.bfloat16) if k in ("w1", "w2") else v
                                      for k, v in self._states[spec].items()}
            self.merge_seconds += time.perf_counter() - t0
            self.state_bytes += _nbytes(self._states[spec])
            while self.state_bytes > STATE_CACHE_BYTES and len(self._states) > 1:
                self.state_bytes -= _nbytes(self._states.popitem(last=False)[1])
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
            keys = {r: self.disk.key(spec, self.ids[r[0]][r[1]]) for r in missing}
            found = {r: v for r in missing if (v := self.disk.get(keys[r])) is not None}
            held = spec.kind != "merged" or spec in self._states
            self._verify(spec, {r: found[r] for r in found if self.check.pick(keys[r], held)})
            memo.update(found)
            self.disk_hits += len(found)
            missing = [r for r in missing if r not in found]
        if missing:
            preds = self._run(spec, missing)
            memo.update(zip(missing, preds))
            if self.disk is not None:
                for r, v in zip(missing, preds):
                    self.disk.put(keys[r], float(v))
        return np.asarray([memo[(t, int(i))] for t, i in rows], dtype=np.float64)

    def _verify(self, spec: Spec, stored: dict[Row, float]) -> None:
        """Recompute these disk-memo hits; raise `MemoMismatch` if any disagrees (`MemoCheck.agrees`)."""
        if not stored:
            return
        rows = sorted(stored, key=lambda r: (self.width[r[0]][r[1]], r))
        logits: dict[Row, torch.Tensor] = {}
        self._run(spec, rows, logits)
        self.check.checked += len(rows)
        bad = [r for r in rows if not self.check.agrees(r[0], stored[r], logits[r])]
        if bad:
            t, i = bad[0]
            raise MemoMismatch(f"{len(bad)} of {len(rows)} recomputed predictions of {spec.kind} disagree with the "
                               f"memo (e.g. {t} pool example {i}: stored {stored[bad[0]]:g}, logits "
                               f"{[round(float(v), 4) for v in logits[bad[0]]]})")

    def data_identity(self) -> dict:
        """Content hashes of the pool (each task's examples, in order) and of its labels: two runs
        with the same hashes, model and config scored the same requests."""
        pool = {t: hashlib.sha256(b"".join(ids)).hexdigest() for t, ids in self.ids.items()}
        labels = {t: hashlib.sha256(np.ascontiguousarray(y, dtype=np.float64).tobytes()).hexdigest()
                  for t, y in self.labels.items()}
        return {"examples": {t: len(y) for t, y in self.labels.items()}, "pool_sha256": pool, "labels_sha256": labels}

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

    def _run(self, spec: Spec, rows: list[Row], logits_out: dict | None = None) -> list[float]:
        """Predictions for rows sorted by length, in chunks of similar length (`chunk_by_width`; the
        oracle's FFN depends on the task, so it batches one task at a time). `logits_out`, if given,
        receives each row's logits."""
        t0 = time.perf_counter()
        preds = {}
        groups = [[r for r in rows if r[0] == t] for t in self.labels] if spec.kind == "oracle" else [rows]
        for group in groups:
            widths = [self.width[t][i] for t, i in group]
            for s, e in chunk_by_width(widths):
                chunk = group[s:e]
                self.padded_tokens += (e - s) * widths[e - 1]
                self.real_tokens += sum(widths[s:e])
                for task, (where, logits) in self.logits_rows(spec, chunk).items():
                    preds.update(zip([chunk[k] for k in where], _to_pred(task, logits)))
                    if logits_out is not None:
                        logits_out.update(zip([chunk[k] for k in where], logits))
        self.run_seconds += time.perf_counter() - t0
        return [float(preds[r]) for r in rows]

    @torch.no_grad()
    def logits_rows(self, spec: Spec, rows: list[Row]) -> dict[str, tuple[list[int], torch.Tensor]]:
        """One forward pass over rows of one or more tasks: per task, (positions in rows, logits).
        The oracle's FFN is the task's expert, so its rows must share one task."""
        if spec.kind == "oracle" and len({t for t, _ in rows}) > 1:
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
        mode, state = spec.mode, self._state(spec)
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
