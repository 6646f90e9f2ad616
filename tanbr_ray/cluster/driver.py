"""`tanbr simulate --backend ray`: the simulation's slot loop driven through the cluster.

Same workload, same monitors' psi, same scoring and rewards as the local backend; only steps 2, 3, 4
and 6 move: the decision leader selects (step 2; the mergers merge each new x meanwhile) and learns
(step 6), the merged weights are pushed to the Serve replicas with acknowledgements (step 3), and each
node's requests are served by the replica holding that node's model, timed end to end (step 4).
Policies without a router (Switch, Oracle, static merges) need the full MoE or no pushes and stay on
the local evaluator.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import ray

from tanbr_ray.cluster import faults as fi
from tanbr_ray.cluster.app import AppArgs, make_app, replica_plan, stop_router
from tanbr_ray.cluster.decision_client import DecisionClient
from tanbr_ray.cluster.decision_service import RouterSpec
from tanbr_ray.cluster.edge import call_node
from tanbr_ray.cluster.merger_pool import MergerPool
from tanbr_ray.cluster.names import APP_NAME, LOOPBACK, NAMESPACE, edge_deployment
from tanbr_ray.cluster.local import local_cluster, pin_loopback, publish_model
from tanbr_ray.cluster.push import PushResult, push, summarize
from tanbr_ray.moe.resolve import merge_settings_of
from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.fleet import Fleet, load_fleet
from tanbr_ray.router import registry
from tanbr_ray.sim.loop import Simulation, run_simulation
from tanbr_ray.sim.roles import Feedback
from tanbr_ray.sim.spec import Spec
from tanbr_ray.sim.output import SimOutput


class ActorRouter:
    """SlotRouter over the decision leader (whichever actor leads: a call fails over)."""

    def __init__(self, client: DecisionClient, timing: dict):
        self.client, self.timing = client, timing

    def select_slot(self, t: int, psis: np.ndarray, budgets) -> list[Spec]:
        t0 = time.perf_counter()
        xs = np.asarray(self.client.call("decide", np.asarray(psis).tolist(), t))
        self.timing["select"] += time.perf_counter() - t0
        return [Spec.merged(x) for x in xs]

    def update_slot(self, t: int, feedback: list[Feedback]) -> None:
        t0 = time.perf_counter()
        self.client.call("update", [fb.as_lists() for fb in feedback], t)
        self.timing["update"] += time.perf_counter() - t0


class ServeEdge:
    """EdgeServing over the Serve replicas: push with acks, then every node's requests at once."""

    def __init__(self, sim: Simulation, client: DecisionClient, edges: dict, pushes: list[PushResult], timing: dict,
                 policy: str = "", faults: list | None = None, storage: str | None = None,
                 router_name: str = ""):
        self.sim, self.client, self.edges, self.pushes, self.timing = sim, client, edges, pushes, timing
        self.policy, self.faults, self.storage = policy, faults or [], storage
        self.router_name = router_name
        self.versions: dict[str, int] = {}  # node -> the version the last push assigned
        self.failed_requests = 0  # requests whose call failed (a replica died under them) and were re-sent

    def inject(self, t: int, phase: str) -> None:
        for f in self.faults:
            if (f.policy, f.slot, f.phase) == (self.policy, t, phase):
                if f.action == "kill_leader":
                    f.report.update(fi.kill_leader(self.client))
                elif f.action == "lose_leader_machine":
                    f.report.update(fi.lose_leader_machine(self.client))
                elif f.action == "kill_merger":
                    f.report.update(fi.kill_merger(self.router_name))
                elif f.action == "kill_replica":
                    f.report.update(fi.kill_replica(edge_deployment(f.target)))
                else:
                    f.report.update(fi.corrupt_checkpoint(self.storage))
                    f.report.update(fi.kill_leader(self.client))

    def push(self, t: int, specs) -> None:
        """The leader's assignments to every replica, acknowledged (the mergers merged them when the
        slot was decided)."""
        r = push(self.client.call("assignments"), self.edges)
        self.pushes.append(r)
        if r.stale:  # a live replica behind its node's version; an unreachable one is replaced, and its
            raise RuntimeError(f"slot {t}: push left replicas stale {r.stale}")  # successor pulls first
        self.versions = r.versions

    def serve(self, t: int, specs) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every node's scored requests on the replica holding it, at once; latency timed end to end."""
        self.inject(t, "serve")
        t0 = time.perf_counter()
        served = asyncio.run(self._serve_slot(t, self.versions))
        self.timing["serve"] += time.perf_counter() - t0
        return [(np.asarray(preds, dtype=np.float64), np.full(len(preds), ms)) for preds, ms in served]

    async def _serve_slot(self, t: int, versions: dict[str, int]) -> list[tuple[list[float], float]]:
        async def one(n: int, node: str, cls: str):
            items = self.sim.requests(t, n)
            if not items:
                return [], 0.0
            t0 = time.perf_counter()
            out, failed = await call_node(self.edges[cls], node, items, versions[node])
            self.failed_requests += failed
            if out["model_version"] < versions[node]:
                raise RuntimeError(f"slot {t}: {node} served version {out['model_version']} < {versions[node]}")
            return out["preds"], (time.perf_counter() - t0) * 1e3

        return list(await asyncio.gather(*(one(n, node, c.name) for n, (node, c) in enumerate(self.sim.nodes))))


def _app_args(cfg: SimConfig, router_policies: list[str], model_source, storage, replicas) -> AppArgs:
    """The served app a simulation drives: its router, precision and batching are the scenario's."""
    return AppArgs(model=cfg.model, merge_operator=cfg.merge_operator, model_source=model_source, slot_seconds=0,
                   router=RouterSpec(policy=router_policies[0] if router_policies else "Tanbr", seed=cfg.seed,
                                     random_points=cfg.random_points, tanbr=cfg.tanbr, threads=cfg.threads,
                                     storage=storage),
                   router_name=f"tanbr-router-sim-{cfg.seed}", replicas=replicas, bf16=cfg.bf16, queue=cfg.queue)


def run_ray_simulation(cfg: SimConfig, moe, fleet: Fleet | None = None,
                       progress: bool = True, address: str | None = None, on_slot=None,
                       storage: str | None = None, faults: list | None = None,
                       replicas: int | None = None, model_source: str | None = None) -> SimOutput:
    """Start a local multi-node cluster (or join `address`, or use the Ray this process is connected
    to), deploy the app, run the simulation on it. `faults` (faults.Fault) are injected on the way.
    With `storage` the decision leader has a standby. `replicas` caps the edge replica
    processes (nodes multiplexed onto them; `app.replica_plan`); None = one per node. The mergers
    load `moe` by its cache key, fetched from `model_source`; on a local cluster started here, None
    publishes this process's cached copy (`moe.cache_dir`) to the cluster's storage first."""
    from contextlib import nullcontext

    from ray import serve

    if getattr(moe, "cache_dir", None) is None:
        raise ValueError("the cluster loads a model from its cache folder (published to its storage); a model that "
                         "was never stored runs on the local backend only")
    fleet = fleet or load_fleet(cfg.fleet)
    faults = faults or []
    t0 = time.perf_counter()
    ctx = local_cluster(fleet) if address is None and not ray.is_initialized() else nullcontext()
    if address is not None:
        if address.startswith(LOOPBACK):
            pin_loopback()
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    with ctx as cluster:
        if model_source is None and cluster is not None:
            model_source = publish_model(cluster, moe.cache_dir)
        serve.start(proxy_location="Disabled")
        router_policies = [p for p in cfg.policies if registry.POLICIES[p].picks_x]
        args = _app_args(cfg, router_policies, model_source, storage, replicas)
        # the mergers load this model and merge as it merges here (its operator and α are not in its cache key)
        merge = {**merge_settings_of(moe), "merge_operator": cfg.merge_operator or moe.merge_operator}
        serve.run(make_app(args, fleet, [moe.identity["key"]], merge), name=APP_NAME, route_prefix=None)
        mergers = MergerPool(args.router_name, args.router.mergers)
        client = DecisionClient(args.router_name, args.router.decision_actors())
        edges = {c.name: serve.get_deployment_handle(edge_deployment(c.name), app_name=APP_NAME) for c in fleet.classes}
        setup_s = time.perf_counter() - t0
        pushes: list[PushResult] = []
        timing = {"select": 0.0, "update": 0.0, "serve": 0.0}

        edge_of: dict[str, ServeEdge] = {}

        def backend(sim: Simulation, name: str):
            if not registry.POLICIES[name].picks_x:
                return None, None
            client.call("reset", name)
            edge_of[name] = ServeEdge(sim, client, edges, pushes, timing, name, faults, storage, args.router_name)
            return ActorRouter(client, timing), edge_of[name]

        def slot_done(name, t, *scores):
            if name in edge_of:
                edge_of[name].inject(t, "end")
            if on_slot is not None:
                on_slot(name, t, *scores)

        try:
            out = run_simulation(cfg, moe, fleet, progress, slot_done, backend=backend)
            final_state = client.wait_leader()
            merger_status = asyncio.run(mergers.started())
            replica_status = [st for h in edges.values() for st in h.broadcast("status").results(timeout_s=60)]
        finally:
            serve.delete(APP_NAME)
            stop_router(args)
    s = out.summary
    s["backend"] = "ray"
    s["wall_seconds"] = time.perf_counter() - t0
    s["requests_per_second"] = s["requests_simulated"] / s["wall_seconds"]
    s["ray"] = {
        "cluster_setup_seconds": setup_s, "policies_on_cluster": router_policies, **summarize(pushes),
        "seconds": {"push": float(sum(p.seconds for p in pushes)), **timing},
        "failed_requests": int(sum(e.failed_requests for e in edge_of.values())),
        "final_router_state": {k: final_state[k] for k in ("policy", "version", "slot", "updated_slot", "restored_from",
                                                            "name", "term")},
        "takeovers": final_state["takeovers"],
        "mergers": merger_status,
        "replica_plan": {c: {"replicas": r, "nodes_per_replica": k} for c, (r, k) in replica_plan(fleet, replicas).items()},
        "replicas_status": [{k: st[k] for k in ("replica", "class", "resident_bytes", "peak_rss_bytes", "weights_refetched")}
                            | {"nodes": sorted(st["nodes"])} for st in replica_status],
        "faults": [{"policy": f.policy, "slot": f.slot, "phase": f.phase, "action": f.action, **f.report}
                   for f in faults],
    }
    return out
