"""The RouterActor: the central router as a named Ray actor that publishes merged weights.

It hosts a RouterService (policy, full MoE, node monitors). After each `decide` it puts every distinct
merged FFN set into the object store once, tagged with the version at which its nodes got it; edge
replicas `pull(node)` a (version, [ref]) and fetch the tensors straight from the object store.

Crashes: Ray restarts the actor (max_restarts=-1) and retries the calls in flight; the service
restores its newest valid checkpoint and re-publishes the weights of the restored assignments, and
slot ids on decide/update make the retried calls exactly-once.
"""

from __future__ import annotations

import time

import numpy as np
import ray

from tanbr_ray.cluster.names import NAMESPACE, ROUTER_NAME
from tanbr_ray.cluster.router_service import RouterService, RouterSpec, x_key
from tanbr_ray.moe import MoEConfig, load_or_build
from tanbr_ray.sim.fleet import Fleet



class RouterActor:
    def __init__(self, spec: dict, moe_config: dict, fleet: dict, models_dir: str | None = None,
                 data_dir: str | None = None):
        t0 = time.perf_counter()
        moe = load_or_build(MoEConfig(**moe_config), models_dir, progress=False, data_dir=data_dir)
        t1 = time.perf_counter()
        self.svc = RouterService(RouterSpec(**spec), moe, Fleet(**fleet))
        self.refs: dict[bytes, ray.ObjectRef] = {}
        self.pkg_ref: ray.ObjectRef | None = None
        self._publish()  # a restarted actor serves the restored assignments at once
        self.started = {"load_model_s": t1 - t0, "restore_and_publish_s": time.perf_counter() - t1,
                        "restarted": ray.get_runtime_context().was_current_actor_reconstructed}
        self.snapshot["started"] = self.started

    def ready(self) -> bool:
        return True

    def package(self) -> list:
        """[ref] to the EdgePackage (wrapped in a list so callers get the ref, not the value)."""
        if self.pkg_ref is None:
            self.pkg_ref = ray.put(self.svc.package())
        return [self.pkg_ref]

    def reset(self, policy: str) -> None:
        self.svc.reset(policy)
        self.refs.clear()
        self._publish()

    def _publish(self) -> None:
        self.refs = {k: self.refs[k] if k in self.refs else ray.put(w) for k, w in self.svc.weights.items()}
        self.snapshot = {**self.svc.state(), "started": getattr(self, "started", None)}  # what state() answers

    def decide(self, psis: list | None = None, slot: int | None = None) -> np.ndarray:
        xs = self.svc.decide(None if psis is None else np.asarray(psis), slot)
        self._publish()
        return xs

    def update(self, feedback: list[tuple], slot: int | None = None) -> None:
        self.svc.update(feedback, slot)
        self.snapshot = {**self.svc.state(), "started": self.started}

    def assignments(self) -> dict[str, tuple[int, list]]:
        """node -> (version, [ref to its merged FFNs])."""
        return {node: (a.version, [self.refs[x_key(a.x)]]) for node, a in self.svc.assign.items()}

    def pull(self, node: str) -> tuple[int, list]:
        version, _ = self.svc.weights_for(node)
        return version, [self.refs[x_key(self.svc.assign[node].x)]]

    def live_step(self, reports: list[dict], slot: int) -> np.ndarray:
        """Close live slot `slot`: what each replica served feeds the node monitors, the label-free
        rewards of the sampled requests update the policy, then x for slot + 1 is decided and
        published. Exactly-once per slot id: a call retried after a crash only re-answers."""
        if slot > self.svc.updated_slot and self.svc.assign:
            samples: dict[str, list] = {}
            for rep in reports:
                for node, heads in rep.get("heads", {}).items():
                    self.svc.observe(node, heads)
                for node, rows in rep.get("sample", {}).items():
                    samples.setdefault(node, []).extend(rows)
            self.svc.end_slot()
            feedback = []
            for n, (node, _) in enumerate(self.svc.nodes):
                a = self.svc.assign.get(node)
                if a is not None and samples.get(node):
                    r, mask = self.svc.label_free_rewards(node, samples[node])
                    feedback.append((a.x, self.svc.last_psi[n], r, mask))
            self.svc.update(feedback, slot)  # checkpoints (monitors included) even with no feedback
        return self.decide(None, slot + 1)

    @ray.method(concurrency_group="query")
    def state(self) -> dict:
        """The state as of the last completed call: answered at once, never queued behind a slot."""
        return self.snapshot


def start_router(spec: dict, moe_config: dict, fleet: dict, models_dir: str | None = None,
                 data_dir: str | None = None, name: str = ROUTER_NAME, detached: bool = False,
                 resources: dict | None = None):
    """Create (or reuse) the named router actor and wait until its model is loaded."""
    actor = ray.remote(concurrency_groups={"query": 1})(RouterActor).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached" if detached else None,
        num_cpus=0, resources=resources or {}, max_concurrency=1, max_restarts=-1, max_task_retries=-1,
    ).remote(spec, moe_config, fleet, models_dir, data_dir)
    ray.get(actor.ready.remote())
    return actor


def get_router(name: str = ROUTER_NAME):
    return ray.get_actor(name, namespace=NAMESPACE)
