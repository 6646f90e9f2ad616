"""The merger: a Ray actor that holds the full MoE and does the heavy, stateless work.

Given x it returns the merged FFNs (the caller owns the result object, so the weights outlive the
merger that made them); it hands edge replicas the dense shell; it scores served requests against the
full MoE (the label-free reward). Nothing in it depends on the slot, so several run side by side
(`RouterSpec.mergers`) and any of them answers any call; a dead one is restarted by Ray while the
others serve (merger_pool.py fails over).
"""

from __future__ import annotations

import time

import ray
import torch

from tanbr_ray.cluster.decision_service import ModelMeta
from tanbr_ray.cluster.merge_service import MergeService
from tanbr_ray.cluster.names import MERGER_RESOURCE, NAMESPACE, merger_name
from tanbr_ray.cluster.placement import SHARE
from tanbr_ray.moe.publish import load_model
from tanbr_ray.moe.resolve import apply_merge_settings


class Merger:
    def __init__(self, model_names: list[str], merge: dict | None = None, model_source: str | None = None,
                 threads: int | None = None, sample_per_slot: int = 32, models_dir: str | None = None):
        """`model_names`: the model's cache folder names, in order of preference (`AppArgs.model_names`);
        `merge`: how it merges ({merge_operator, regmean_alpha}: the app's, not part of the cache key;
        what is left out stays as the model was built)."""
        t0 = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        # this machine's cache, else the published copy: a merger never builds the model
        moe, self.model_from = load_model(model_names, models_dir, model_source)
        apply_merge_settings(moe, merge)
        self.svc = MergeService(moe, sample_per_slot)
        self.pkg_ref: ray.ObjectRef | None = None
        self.started = {"load_model_s": time.perf_counter() - t0, "model_from": self.model_from,
                        "model": moe.identity["key"], "merge_operator": moe.merge_operator,
                        "ray_node": ray.get_runtime_context().get_node_id(),
                        "restarted": ray.get_runtime_context().was_current_actor_reconstructed}

    @ray.method(concurrency_group="merge")
    def ready(self) -> dict:
        return self.started

    def meta(self) -> dict:
        return self.svc.meta().model_dump()

    def package(self) -> list:
        """[ref] to the EdgePackage (in a list so callers get the ref, not the value)."""
        if self.pkg_ref is None:
            self.pkg_ref = ray.put(self.svc.package())
        return [self.pkg_ref]

    @ray.method(num_returns=2, concurrency_group="merge")
    def merge(self, x: list[float]) -> tuple[dict, dict]:
        """(a small receipt, the merged FFNs of x with the model's operator). The caller awaits the
        receipt and passes the weights' ref on, so the weights never travel through it."""
        weights = self.svc.merge(x)
        return {"merges": self.svc.merges}, weights

    @ray.method(concurrency_group="score")
    def rewards(self, samples: dict[str, list]) -> dict[str, tuple[list[float], list[bool]]]:
        return self.svc.rewards(samples)


def start_mergers(router_name: str, n: int, model_names: list[str], merge: dict | None,
                  model_source: str | None, threads: int | None, sample_per_slot: int, models_dir: str | None = None,
                  num_gpus: float = 0.0, detached: bool = True) -> ModelMeta:
    """Create (or reuse) the n named mergers on `tanbr_merger` machines (each with `num_gpus` of a GPU,
    which it then merges and scores on), wait until each has loaded the model; the model's meta."""
    # merges never wait behind a slot's scoring (a few seconds of full-MoE forwards under load)
    cls = ray.remote(concurrency_groups={"merge": 1, "score": 1})(Merger)
    actors = [cls.options(name=merger_name(router_name, i), namespace=NAMESPACE, get_if_exists=True,
                          lifetime="detached" if detached else None, num_cpus=0, max_restarts=-1,
                          resources={MERGER_RESOURCE: SHARE}, num_gpus=num_gpus,
                          max_task_retries=0).remote(model_names, merge, model_source, threads,
                                                            sample_per_slot, models_dir)
              for i in range(n)]
    started = ray.get([a.ready.remote() for a in actors])
    for name, st in zip((merger_name(router_name, i) for i in range(n)), started):
        # detached and reused by name: one that already runs must hold this model, merging this way
        if st["model"] not in model_names or (merge or {}).get("merge_operator") not in (None, st["merge_operator"]):
            raise ValueError(f"merger {name} already runs {st['model']} ({st['merge_operator']}), not "
                             f"{model_names[0]}: delete the running app (serve delete / serve shutdown) or give "
                             "this one another router_name")
    return ModelMeta(**ray.get(actors[0].meta.remote()))
