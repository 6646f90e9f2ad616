"""`tanbr simulate --backend ray`: the simulation's slot loop driven through the cluster.

Same workload, same monitors' psi, same scoring as the local backend; only steps 2-5 move: the
RouterActor selects and learns (step 2, 5), merged weights are published and pushed to the Serve
replicas with acknowledgements (step 3), and each node's requests are served by the replica holding
that node's model, timed end to end (step 4). Policies without a router (Switch, Oracle, static
merges) need the full MoE or no pushes and stay on the local evaluator.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import ray

from tanbr_ray.cluster.app import AppArgs, build_app
from tanbr_ray.cluster.names import APP_NAME, NAMESPACE, edge_deployment
from tanbr_ray.cluster.local import local_cluster
from tanbr_ray.cluster.push import PushResult, push
from tanbr_ray.cluster.router_actor import get_router
from tanbr_ray.cluster.router_service import RouterSpec
from tanbr_ray.moe import MoEConfig
from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.fleet import Fleet, load_fleet
from tanbr_ray.sim.loop import STATIC_SPECS, Simulation, run_simulation
from tanbr_ray.sim.output import SimOutput


class ActorRouter:
    """SlotRouter over the RouterActor."""

    def __init__(self, actor, timing: dict):
        self.actor, self.timing = actor, timing

    def select_slot(self, t: int, psis: np.ndarray, budgets) -> np.ndarray:
        t0 = time.perf_counter()
        xs = np.asarray(ray.get(self.actor.decide.remote(np.asarray(psis).tolist(), t)))
        self.timing["select"] += time.perf_counter() - t0
        return xs

    def update_slot(self, t: int, feedback: list[tuple]) -> None:
        t0 = time.perf_counter()
        ray.get(self.actor.update.remote([tuple(np.asarray(f).tolist() for f in fb) for fb in feedback], t))
        self.timing["update"] += time.perf_counter() - t0


class ServeEdge:
    """EdgeServing over the Serve replicas: push with acks, then every node's requests at once."""

    def __init__(self, sim: Simulation, actor, edges: dict, pushes: list[PushResult], timing: dict):
        self.sim, self.actor, self.edges, self.pushes, self.timing = sim, actor, edges, pushes, timing
        self.served: dict[int, tuple[list[float], float]] = {}

    def push(self, t: int, specs) -> None:
        r = push(self.actor, self.edges)
        self.pushes.append(r)
        if r.stale or r.errors:
            raise RuntimeError(f"slot {t}: push left replicas stale {r.stale} / failed {r.errors[:3]}")
        t0 = time.perf_counter()
        self.served = asyncio.run(self._serve_slot(t, r.versions))
        self.timing["serve"] += time.perf_counter() - t0

    async def _serve_slot(self, t: int, versions: dict[str, int]) -> dict:
        async def one(n: int, node: str, cls: str):
            items = self.sim.requests(t, n)
            if not items:
                return n, ([], 0.0)
            t0 = time.perf_counter()
            out = await self.edges[cls].options(multiplexed_model_id=node).infer.remote(items, versions[node])
            if out["model_version"] < versions[node]:
                raise RuntimeError(f"slot {t}: {node} served version {out['model_version']} < {versions[node]}")
            return n, (out["preds"], (time.perf_counter() - t0) * 1e3)

        done = await asyncio.gather(*(one(n, node, c.name) for n, (node, c) in enumerate(self.sim.nodes)))
        return dict(done)

    def serve(self, t: int, n: int, spec, mode: str) -> tuple[np.ndarray, np.ndarray]:
        preds, ms = self.served[n]
        return np.asarray(preds, dtype=np.float64), np.full(len(preds), ms)


def run_ray_simulation(cfg: SimConfig, moe_cfg: MoEConfig, moe, fleet: Fleet | None = None,
                       progress: bool = True, address: str | None = None, on_slot=None) -> SimOutput:
    """Start a local multi-node cluster (or join `address`), deploy the app, run the simulation on it."""
    from contextlib import nullcontext

    from ray import serve

    fleet = fleet or load_fleet(cfg.fleet)
    t0 = time.perf_counter()
    ctx = local_cluster(fleet) if address is None else nullcontext()
    if address is not None:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    with ctx:
        serve.start(proxy_location="Disabled")
        router_policies = [p for p in cfg.policies if p not in STATIC_SPECS]
        args = AppArgs(model=cfg.model, models_dir=cfg.models_dir, data_dir=cfg.data_dir, slot_seconds=0,
                       router=RouterSpec(policy=router_policies[0] if router_policies else "Tanbr", seed=cfg.seed,
                                         tanbr=cfg.tanbr, threads=cfg.threads),
                       router_name=f"tanbr-router-sim-{cfg.seed}")
        serve.run(build_app(args, fleet, moe_cfg), name=APP_NAME, route_prefix=None)
        actor = get_router(args.router_name)
        edges = {c.name: serve.get_deployment_handle(edge_deployment(c.name), app_name=APP_NAME) for c in fleet.classes}
        setup_s = time.perf_counter() - t0
        pushes: list[PushResult] = []
        timing = {"select": 0.0, "update": 0.0, "serve": 0.0}

        def backend(sim: Simulation, name: str):
            if name in STATIC_SPECS:
                return None, None
            ray.get(actor.reset.remote(name))
            return ActorRouter(actor, timing), ServeEdge(sim, actor, edges, pushes, timing)

        try:
            out = run_simulation(cfg, moe, fleet, progress, on_slot, backend=backend)
        finally:
            serve.delete(APP_NAME)
            ray.kill(actor)
    secs = np.asarray([p.seconds for p in pushes]) if pushes else np.zeros(1)
    s = out.summary
    s["backend"] = "ray"
    s["wall_seconds"] = time.perf_counter() - t0
    s["requests_per_second"] = s["requests_simulated"] / s["wall_seconds"]
    s["ray"] = {
        "cluster_setup_seconds": setup_s, "policies_on_cluster": router_policies,
        "pushes": len(pushes), "push_seconds_p50": float(np.percentile(secs, 50)),
        "push_seconds_p95": float(np.percentile(secs, 95)), "push_seconds_max": float(secs.max()),
        "push_retries": int(sum(p.attempts - 1 for p in pushes)),
        "stale_replicas": int(sum(len(p.stale) for p in pushes)),
        "replicas": int(max((p.replicas for p in pushes), default=0)),
        "seconds": {"push": float(sum(p.seconds for p in pushes)), **timing},
    }
    return out
