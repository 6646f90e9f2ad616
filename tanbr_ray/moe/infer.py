"""Cheap evaluation of many merges on the same examples, and latency measurement.

Nothing below the first MoE layer's FFN depends on x or the mode (tokenisation, embeddings, the
layers below, and that layer's attention), so `prepare` runs it once and every `predict` starts there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from tanbr_ray.moe import precision
from tanbr_ray.moe.data import Batch, TaskSplit, bucket_batches


@dataclass
class CachedBatch:
    task: str
    h: torch.Tensor  # input of the first MoE layer's FFN
    attention_mask: torch.Tensor
    index: np.ndarray


@dataclass
class EvalCache:
    """Per-task labels plus the x-independent part of the forward pass, batch by batch."""

    batches: list[CachedBatch]
    labels: dict[str, np.ndarray]
    tasks: list[str] = field(default_factory=list)

    def num_examples(self) -> int:
        return int(sum(len(v) for v in self.labels.values()))


def max_len_for(moe, task: str) -> int:
    from tanbr_ray.moe.data import PAIR

    return moe.max_len_pair if PAIR[task] else moe.max_len_single


def make_batches(moe, splits: Mapping[str, TaskSplit] | list[TaskSplit], batch_size: int = 32) -> list[Batch]:
    items = splits.values() if isinstance(splits, Mapping) else splits
    out = []
    for sp in items:
        moe.task_index(sp.task)
        out.extend(bucket_batches(moe.tokenizer, sp, max_len_for(moe, sp.task), batch_size))
    return out


@torch.no_grad()
def prepare(moe, splits: Mapping[str, TaskSplit] | list[TaskSplit], batch_size: int = 32, progress: bool = False) -> EvalCache:
    """Tokenise, bucket (batches of ~32 are fastest on CPU) and run the x-independent prefix once."""
    from tqdm.auto import tqdm

    moe.eval()
    items = list(splits.values() if isinstance(splits, Mapping) else splits)
    batches = make_batches(moe, items, batch_size)
    cached = []
    for b in tqdm(batches, desc="prepare eval cache", disable=not progress, leave=False):
        b = b.to(moe.device)
        h = moe.embed_to_first_moe(b.input_ids, b.attention_mask, b.token_type_ids)
        cached.append(CachedBatch(b.task, h, b.attention_mask, b.index))
    return EvalCache(cached, {sp.task: np.asarray(sp.labels) for sp in items}, [sp.task for sp in items])


def _to_pred(task: str, logits: torch.Tensor) -> np.ndarray:
    if task == "STS-B":
        return logits[:, 0].float().cpu().numpy()
    return logits.argmax(-1).cpu().numpy()


@torch.no_grad()
def predict(
    moe, cache: EvalCache, mode: str = "oracle", x=None, state=None, adapted=None, bf16: bool = False
) -> dict[str, np.ndarray]:
    """Predictions per task (in split order) for one mode / x / merged state, from the cache.
    bf16=True runs under bfloat16 autocast (≈2× faster on CPUs with AVX512-BF16; logits move by ~1e-3)."""
    moe.eval()
    if bf16:
        with precision.bf16(moe.device):
            return predict(moe, cache, mode, x, state, adapted, bf16=False)
    if mode == "merged" and state is None:
        state = moe.merged_state(x)  # validate and merge once, not per batch
        x = None
    out = {t: np.zeros(len(y), dtype=np.float32 if t == "STS-B" else np.int64) for t, y in cache.labels.items()}
    for b in cache.batches:
        pooled, use = moe.pooled_from_first_moe(b.h, b.attention_mask, b.task, mode, x=x, state=state, adapted=adapted)
        logits = moe.head_for(mode, b.task, use)(pooled)
        out[b.task][b.index] = _to_pred(b.task, logits)
    return out


def score(cache: EvalCache, preds: Mapping[str, np.ndarray], subset: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """GLUE score per task; `subset` restricts each task to some example indices (e.g. a dev half)."""
    from tanbr_ray.moe.metrics import glue_score  # scipy: only when scoring, not on edge nodes

    res = {}
    for t, y in cache.labels.items():
        idx = slice(None) if subset is None else subset[t]
        res[t] = glue_score(t, np.asarray(preds[t])[idx], y[idx])
    return res


def halves(cache: EvalCache, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split each task's examples into a selection half and a scoring half."""
    rng = np.random.default_rng(seed)
    a, b = {}, {}
    for t, y in cache.labels.items():
        perm = rng.permutation(len(y))
        a[t], b[t] = np.sort(perm[: len(y) // 2]), np.sort(perm[len(y) // 2 :])
    return a, b


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=g)
    ids[:, 0] = 101
    return ids.to(device), torch.ones_like(ids).to(device), torch.zeros_like(ids).to(device)


def measure_latency(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> dict[str, float]:
    """p50/p95/mean wall time (ms) of fn() over `runs` calls after `warmup` calls (GPU-synchronised)."""
    return interleaved_latency({"fn": fn}, runs=runs, warmup=warmup)["fn"]


@torch.inference_mode()
def interleaved_latency(fns: Mapping[str, Callable[[], object]], runs: int = 20,
                        warmup: int = 2) -> dict[str, dict[str, float]]:
    """p50/p95/mean wall time (ms) of each fn, timed round-robin: a load change on a shared host then
    hits every fn alike, so their ratios hold even when the absolute times drift."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                ts[k].append((time.perf_counter() - t0) * 1000)
    return {k: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                "mean": float(np.mean(v)), "runs": runs} for k, v in ts.items()}


def mode_forward(moe, mode: str, batch_size: int, seq_len: int = 64, task: str | None = None, x=None,
                 bf16: bool = False):
    """A zero-argument forward of one synthetic batch in the given mode (for the latency bench), under
    bf16 autocast if asked. dense/merged run a standalone dense model (one FFN per layer), the others
    run the MoE."""
    fn = _mode_forward(moe, mode, batch_size, seq_len, task, x)
    if not bf16:
        return fn

    def in_bf16():
        with precision.bf16(moe.device):
            return fn()
    return in_bf16


def _mode_forward(moe, mode: str, batch_size: int, seq_len: int, task: str | None, x):
    task = task or moe.tasks[0]
    tok = getattr(moe, "tokenizer", None)
    vocab = tok.vocab_size if tok is not None else moe.bert_config.vocab_size
    ids, am, tt = synthetic_batch(batch_size, seq_len, vocab, moe.device)
    moe.eval()
    if mode == "dense":
        dm = moe.dense_model()
        return lambda: dm(ids, am, tt, task)
    if mode == "merged":
        x = np.full(moe.num_experts, 1.0 / moe.num_experts) if x is None else x
        dm = moe.dense_model(x=x)
        return lambda: dm(ids, am, tt, task)
    return lambda: moe(ids, am, tt, task, mode=mode)


def batch_latency(moe, mode: str, batch_size: int, seq_len: int = 64, runs: int = 20, warmup: int = 3, x=None) -> dict[str, float]:
    """Forward latency of one batch in a mode — the per-batch service time the simulator needs."""
    return measure_latency(mode_forward(moe, mode, batch_size, seq_len, x=x), runs=runs, warmup=warmup)
