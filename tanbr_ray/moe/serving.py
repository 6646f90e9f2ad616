"""Serving one batch of raw-text requests: what an edge replica runs per batch, and exactly what a
calibration times, so the simulator's service times are the serving path's (tokenisation included).

A batch may mix heads: its rows are tokenised per head and run as one forward per head present,
padded to that group's longest row, in any serving mode (a merged dense model, or the MoE routed
top-k / tagged / soft).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from tanbr_ray.moe import precision
from tanbr_ray.moe.data import PAIR, TaskSplit, bucket_batches
from tanbr_ray.moe.infer import _to_pred, max_len_for

Item = tuple[str, str, "str | None"]  # (head, text_a, text_b)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]  # ids, mask, types, head -> logits


def check_items(items: Sequence[Item], heads: Sequence[str]) -> None:
    """A clear error for a request the model cannot serve (unknown head, text_b given or missing)."""
    for head, _, text_b in items:
        if head not in heads:
            raise ValueError(f"unknown head {head!r}; heads: {list(heads)}")
        if PAIR[head] != (text_b is not None):
            raise ValueError(f"head {head!r} {'needs' if PAIR[head] else 'takes no'} text_b")


@torch.no_grad()
def serve_items(tokenizer, max_len: Mapping[str, int], forward: Forward, items: Sequence[Item],
                device: torch.device, bf16: bool = False, chunk: int | None = None) -> np.ndarray:
    """Labels (class index) or scores (STS-B) for every item, in item order: one forward per head
    (bulk scoring passes `chunk` to cut a head's rows into length-sorted batches of that size)."""
    out = np.zeros(len(items))
    with precision.bf16(device, enabled=bf16):
        for head in sorted({h for h, _, _ in items}):
            idx = np.asarray([i for i, (h, _, _) in enumerate(items) if h == head])
            a = [items[i][1] for i in idx]
            b = [items[i][2] for i in idx] if PAIR[head] else None
            split = TaskSplit(head, a, b, np.zeros(len(a)))
            for batch in bucket_batches(tokenizer, split, max_len[head], batch_size=chunk or len(a)):
                batch = batch.to(device)
                logits = forward(batch.input_ids, batch.attention_mask, batch.token_type_ids, head)
                out[idx[batch.index]] = _to_pred(head, logits.float())
    return out


def moe_server(moe, mode: str, x=None) -> Callable[[Sequence[Item]], np.ndarray]:
    """Serve items with the MoE in one mode; `merged` runs the dense model of x (uniform if None) as a
    node holding only merged FFNs would."""
    moe.eval()
    if mode == "merged":
        forward = moe.dense_model(x=np.full(moe.num_experts, 1.0 / moe.num_experts) if x is None else x)
    else:
        def forward(ids, am, tt, head):
            return moe(ids, am, tt, head, mode=mode)
    max_len = {t: max_len_for(moe, t) for t in moe.tasks}
    return lambda items, bf16=False: serve_items(moe.tokenizer, max_len, forward, items, moe.device, bf16)
