"""The merger: a Ray actor that holds the full MoE and does the heavy, stateless work.

Given x it returns the merged FFNs (the caller owns the result object, so the weights outlive the
merger that made them); it hands edge replicas the dense shell; it scores served requests against the
full MoE (the label-free reward). Nothing in it depends on the slot, so several run side by side
(`RouterSpec.mergers`) and any of them answers any call; a dead one is restarted by Ray while the
others serve (merger_pool.py fails over).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import ray
import torch

from tanbr_ray.cluster.decision_service import ModelMeta, x_key
from tanbr_ray.cluster.names import MERGER_RESOURCE, NAMESPACE, merger_name
from tanbr_ray.cluster.placement import SHARE
from tanbr_ray.moe.data import PAIR, TaskSplit
from tanbr_ray.moe.edge import edge_package
from tanbr_ray.moe.infer import _to_pred, make_batches
from tanbr_ray.moe.publish import load_model

CACHE = 16  # merged x kept per merger (a slot's distinct x are few; a re-publish hits the cache)


class Merger:
    def __init__(self, model_names: list[str], merge_operator: str | None = None, model_source: str | None = None,
                 threads: int | None = None, sample_per_slot: int = 32, models_dir: str | None = None):
        """`model_names`: the model's cache folder names, in order of preference (`AppArgs.model_names`);
        `merge_operator`: the app's, else the model's own."""
        t0 = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        # this machine's cache, else the published copy: a merger never builds the model
        self.moe, self.model_from = load_model(model_names, models_dir, model_source)
        if merge_operator:
            self.moe.merge_operator = merge_operator
        self.sample_per_slot = sample_per_slot
        self.pkg_ref: ray.ObjectRef | None = None
        self.cache: OrderedDict[bytes, dict[str, torch.Tensor]] = OrderedDict()
        self.merges = 0
        self.started = {"load_model_s": time.perf_counter() - t0, "model_from": self.model_from,
                        "restarted": ray.get_runtime_context().was_current_actor_reconstructed}

    @ray.method(concurrency_group="merge")
    def ready(self) -> dict:
        return self.started

    def meta(self) -> dict:
        m = self.moe
        return ModelMeta(name=m.identity["key"], tasks=list(m.tasks), pair=[PAIR[t] for t in m.tasks],
                         num_experts=m.num_experts, task_experts=[m.expert_of[t] for t in m.tasks],
                         merge_operator=m.merge_operator).model_dump()

    def package(self) -> list:
        """[ref] to the EdgePackage (in a list so callers get the ref, not the value)."""
        if self.pkg_ref is None:
            self.pkg_ref = ray.put(edge_package(self.moe))
        return [self.pkg_ref]

    @ray.method(num_returns=2, concurrency_group="merge")
    def merge(self, x: list[float]) -> tuple[dict, dict]:
        """(a small receipt, the merged FFNs of x with the model's operator). The caller awaits the
        receipt and passes the weights' ref on, so the weights never travel through it."""
        k = x_key(x)
        if k not in self.cache:
            # on the host: the object store carries it to replicas that may have no GPU
            self.cache[k] = {n: t.cpu() for n, t in self.moe.merged_state(np.asarray(x, dtype=np.float64)).items()}
            self.merges += 1
            while len(self.cache) > CACHE:
                self.cache.popitem(last=False)
        self.cache.move_to_end(k)
        return {"merges": self.merges}, self.cache[k]

    @ray.method(concurrency_group="score")
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


def start_mergers(router_name: str, n: int, model_names: list[str], merge_operator: str | None,
                  model_source: str | None, threads: int | None, sample_per_slot: int, models_dir: str | None = None,
                  num_gpus: float = 0.0, detached: bool = True) -> ModelMeta:
    """Create (or reuse) the n named mergers on `tanbr_merger` machines (each with `num_gpus` of a GPU,
    which it then merges and scores on), wait until each has loaded the model; the model's meta."""
    # merges never wait behind a slot's scoring (a few seconds of full-MoE forwards under load)
    cls = ray.remote(concurrency_groups={"merge": 1, "score": 1})(Merger)
    actors = [cls.options(name=merger_name(router_name, i), namespace=NAMESPACE, get_if_exists=True,
                          lifetime="detached" if detached else None, num_cpus=0, max_restarts=-1,
                          resources={MERGER_RESOURCE: SHARE}, num_gpus=num_gpus,
                          max_task_retries=0).remote(model_names, merge_operator, model_source, threads,
                                                            sample_per_slot, models_dir)
              for i in range(n)]
    ray.get([a.ready.remote() for a in actors])
    return ModelMeta(**ray.get(actors[0].meta.remote()))
