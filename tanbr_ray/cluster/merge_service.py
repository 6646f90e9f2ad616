"""What a merger computes, on any model of the interface (`moe/interface.py`) and without Ray: merges
by x (a small cache, since a slot's distinct x are few and a re-publish repeats them), the model's meta
for the decision side, the edge package, and the label-free reward (agreement of a node's served
predictions with the full MoE's top-2). `merger.py` is the Ray actor around it."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from tanbr_ray.cluster.decision_service import ModelMeta, x_key
from tanbr_ray.moe.data import PAIR, TaskSplit
from tanbr_ray.moe.edge import EdgePackage, edge_package
from tanbr_ray.moe.infer import _to_pred, make_batches

CACHE = 16  # merged x kept


class MergeService:
    def __init__(self, moe, sample_per_slot: int = 32):
        self.moe, self.sample_per_slot = moe, sample_per_slot
        self.cache: OrderedDict[bytes, dict[str, torch.Tensor]] = OrderedDict()
        self.merges = 0

    def meta(self) -> ModelMeta:
        m = self.moe
        return ModelMeta(name=m.identity["key"], tasks=list(m.tasks), pair=[PAIR[t] for t in m.tasks],
                         num_experts=m.num_experts, task_experts=[m.expert_of[t] for t in m.tasks],
                         merge_operator=m.merge_operator)

    def package(self) -> EdgePackage:
        return edge_package(self.moe)

    def merge(self, x: list[float]) -> dict[str, torch.Tensor]:
        """x's merged FFNs with the model's operator, on the host (an edge replica may have no GPU)."""
        k = x_key(x)
        if k not in self.cache:
            self.cache[k] = {n: t.cpu() for n, t in self.moe.merged_state(np.asarray(x, dtype=np.float64)).items()}
            self.merges += 1
            while len(self.cache) > CACHE:
                self.cache.popitem(last=False)
        self.cache.move_to_end(k)
        return self.cache[k]

    @torch.no_grad()
    def rewards(self, samples: dict[str, list]) -> dict[str, tuple[list[float], list[bool]]]:
        """node -> (per-task agreement of the node's served predictions with the full MoE (top-2), mask)
        on a sample of (head, text_a, text_b, prediction): the reward when no labels come back."""
        tasks = list(self.moe.tasks)
        out = {}
        for node, sample in samples.items():
            r, mask = np.zeros(len(tasks)), np.zeros(len(tasks), dtype=bool)
            for v, task in enumerate(tasks):
                rows = [s for s in sample if s[0] == task][: self.sample_per_slot]
                if not rows:
                    continue
                split = TaskSplit(task, [s[1] for s in rows], [s[2] for s in rows] if PAIR[task] else None,
                                  np.zeros(len(rows)))
                ref = np.zeros(len(rows))
                for b in make_batches(self.moe, [split]):
                    b = b.to(self.moe.device)
                    logits = self.moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode="top2")
                    ref[b.index] = _to_pred(task, logits)
                r[v] = float(np.mean(np.abs(ref - np.asarray([s[3] for s in rows])) < 1e-6))
                mask[v] = True
            out[node] = (r.tolist(), mask.tolist())
        return out
