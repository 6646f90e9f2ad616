"""The Serve application: the mergers and decision actors, one edge deployment per node class, the
HTTP ingress.

`build_app(args)` is the import path `serve deploy deployments/*.yaml` uses (args validated by
AppArgs), and `tanbr serve` / `tanbr simulate --backend ray` build the same app. Each class's
deployment is pinned to the Ray nodes that carry its custom resource `edge_<class>` (cluster.yaml
declares it per node type; the local demo cluster sets it per node).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tanbr_ray.cluster.api import ApiSettings
from tanbr_ray.cluster.decision_service import RouterSpec
from tanbr_ray.cluster.names import APP_NAME, HEAD_RESOURCE, ROUTER_NAME, edge_deployment, edge_resource
from tanbr_ray.fileio import deep_merge
from tanbr_ray.moe.config import default_models_dir
from tanbr_ray.moe.config import load_config as load_moe_config
from tanbr_ray.moe import resolve
from tanbr_ray.moe.resolve import cache_names, check_spec, is_model_name, load_dir, open_model
from tanbr_ray.sim.config import load_config as load_sim_config
from tanbr_ray.sim.config import scenario_path
from tanbr_ray.sim.fleet import Fleet, load_fleet
from tanbr_ray.sim.queueing import QueueConfig

class AppArgs(BaseModel):
    """The served app. Its router is the one a simulation scenario measures: `scenario` names it and
    supplies the router's `tanbr:` block, seed and Random's points, the merge operator, the model and
    the precision; keys given here (`router.tanbr.tree.rho`, `merge_operator`, ...) override it."""

    model_config = ConfigDict(extra="forbid")

    scenario: str = Field("default", description="default | quick | a simulation YAML: the router it measures")
    model: str = Field("default", description="default | quick (the built-in MoE) | path/to/pool.yaml (a pool "
                       "of fine-tunes or a native MoE; resolved where the app is built) | the cache name of a "
                       "published model (what `tanbr build-moe --publish` prints)")
    merge_operator: Literal["linear", "fisher", "regmean"] | None = Field(
        None, description="how x merges the experts; None = the model's own (after the scenario's)")
    moe_config: str | None = Field(None, description="a MoE YAML instead of the named model")
    model_source: str | None = Field(None, description="where `tanbr build-moe --publish` put the model (a path "
                                     "every machine mounts, s3://, gs://): mergers fetch it from there into their "
                                     "machine's cache; None = each merger's machine must hold it already")
    models_dir: str | None = Field(None, description="the models cache on every machine; None = each machine's "
                                   "default ($TANBR_MODELS_DIR or ~/.cache/tanbr_ray/models)")
    fleet: str | None = Field(None, description="fleet YAML; None = the packaged default fleet")
    router: RouterSpec = Field(default_factory=RouterSpec)
    router_name: str = Field(ROUTER_NAME, min_length=1)
    slot_seconds: float = Field(30.0, ge=0.0, description="live slot length; 0 = slots driven externally")
    threads: int = Field(1, ge=1, le=64, description="torch threads per edge replica")
    merger_gpus: float = Field(0.0, ge=0.0, le=8.0, description="GPUs (fractions allowed) per merger: it merges "
                               "and scores on the one Ray gives it; edge classes set their own `replica_gpus`")
    bf16: bool = Field(False, description="edge replicas serve under bfloat16 autocast")
    queue: QueueConfig = Field(default_factory=QueueConfig, description="each node's dynamic batching (max_batch, "
                               "max_wait_ms, timeout_s); unset = the scenario's `queue:`, the one its simulation reads")
    replicas: int | None = Field(None, ge=1, description="edge replica processes for the whole fleet, nodes "
                                 "multiplexed onto them (at least one per class); None = one per node")
    api: ApiSettings = Field(default_factory=ApiSettings)

    @field_validator("model")
    @classmethod
    def _served_model(cls, v: str) -> str:
        return v if is_model_name(v) else check_spec(v)

    @model_validator(mode="before")
    @classmethod
    def _from_scenario(cls, raw):
        """Fill what the args leave out from the scenario; the router's keys merge key by key."""
        if not isinstance(raw, dict):
            return raw
        try:
            sim = load_sim_config(scenario_path(raw.get("scenario", "default")))
        except ValueError as exc:
            raise ValueError(f"scenario: {exc}") from exc
        router = raw.get("router") or {}
        router = router.model_dump(mode="json") if isinstance(router, BaseModel) else router
        if not isinstance(router, dict):
            return raw  # the field's own validation names the problem
        router = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in router.items()}
        base = {"tanbr": sim.tanbr.model_dump(mode="json"), "seed": sim.seed, "random_points": sim.random_points}
        queue = raw.get("queue") or {}
        queue = queue.model_dump() if isinstance(queue, BaseModel) else queue
        if isinstance(queue, dict):  # key by key onto the scenario's, as the router's keys
            queue = deep_merge(sim.queue.model_dump(), queue)
        return {"model": sim.model, "merge_operator": sim.merge_operator, "bf16": sim.bf16,
                **raw, "queue": queue, "router": deep_merge(base, router)}

    def model_names(self) -> list[str]:
        """The cache folders the mergers load the model from (their machine's cache, else `model_source`),
        in order of preference. A pool YAML is hashed here (its checkpoints and data must be readable)."""
        if self.moe_config:
            return load_moe_config(self.moe_config).cache_names()
        if is_model_name(self.model):
            return [self.model]
        return cache_names(self.model)

    def merge_settings(self) -> dict:
        """How the mergers merge: the model's settings (its YAML or preset; a model known only by name
        merges as built), the app's `merge_operator` over them."""
        if self.moe_config:
            own = resolve.merge_settings_of(load_moe_config(self.moe_config))
        else:
            own = {} if is_model_name(self.model) else resolve.merge_settings(self.model)
        return {**own, **({"merge_operator": self.merge_operator} if self.merge_operator else {})}

    def open_model(self, progress: bool = True):
        """The model on this machine, built on first use (`BuiltMoE`): what a local cluster publishes."""
        from tanbr_ray.moe.build import load_or_build_info

        if self.moe_config:
            return load_or_build_info(load_moe_config(self.moe_config), self.models_dir, progress=progress)
        if is_model_name(self.model):
            return load_dir(Path(self.models_dir or default_models_dir()) / self.model)
        return open_model(self.model, self.models_dir, progress=progress)

    def load_fleet(self) -> Fleet:
        return load_fleet(self.fleet)


def parse_args(args: dict | AppArgs) -> AppArgs:
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs(**(args or {}))
    except ValidationError as exc:
        raise ValueError(f"app args: {exc}") from exc


def replica_plan(fleet: Fleet, replicas: int | None) -> dict[str, tuple[int, int]]:
    """class -> (replicas, nodes per replica expected): one replica per node, or `replicas` in all
    shared out in proportion to the classes' node counts (largest remainder, at least one each)."""
    counts = {c.name: c.count for c in fleet.classes}
    if replicas is None:
        return {name: (n, 1) for name, n in counts.items()}
    if replicas < len(counts):
        raise ValueError(f"replicas: {replicas} for {len(counts)} node classes; each class needs at least one")
    total = sum(counts.values())
    share = {name: replicas * n / total for name, n in counts.items()}
    plan = {name: max(1, min(counts[name], int(v))) for name, v in share.items()}
    for name in sorted(share, key=lambda k: plan[k] - share[k]):  # furthest below its share first
        if sum(plan.values()) >= min(replicas, total):
            break
        if plan[name] < counts[name]:
            plan[name] += 1
    return {name: (r, -(-counts[name] // r)) for name, r in plan.items()}


def build_app(args: dict):
    """The `import_path` of deployments/*.yaml: Ray calls it with the file's `args` (one parameter)."""
    return make_app(args)


def start_router(a: AppArgs, fleet: Fleet, model_names: list[str], merge: dict):
    """The mergers (each loads the model), then the decision actors (model-free, given the model's
    meta), all named after `router_name`, detached; returns the model's meta once one leads."""
    from tanbr_ray.cluster.decision_actor import start_decision
    from tanbr_ray.cluster.merger import start_mergers

    from tanbr_ray.cluster.placement import check_cluster

    r = a.router
    check_cluster(r.decision_actors(), [c.name for c in fleet.classes])
    meta = start_mergers(a.router_name, r.mergers, model_names, merge, a.model_source, r.threads,
                         r.sample_per_slot, a.models_dir, a.merger_gpus)
    live = {"slot_seconds": a.slot_seconds, "app": APP_NAME, "edges": [edge_deployment(c.name) for c in fleet.classes]}
    start_decision(r.model_dump(mode="json"), meta.model_dump(), fleet.model_dump(mode="json"), a.router_name, live)
    return meta


def stop_router(a: AppArgs) -> None:
    """Kill the decision actors and mergers for good (what their app's deletion does, at once)."""
    from tanbr_ray.cluster.lifecycle import end_router

    end_router(a.router_name, a.router.decision_actors(), a.router.mergers)


def make_app(args: dict | AppArgs, fleet: Fleet | None = None, model_names: list[str] | None = None,
             merge: dict | None = None):
    """Start (or reuse) the mergers and decision actors, then bind the edge deployments and the ingress.
    `fleet`, `model_names` and `merge` override the args' (a driver passes the fleet and the model it
    holds, merging as it merges there)."""
    from tanbr_ray.cluster.edge import EdgeNode
    from tanbr_ray.cluster.ingress import Ingress
    from tanbr_ray.cluster.placement import SHARE

    a = parse_args(args)
    fleet = fleet or a.load_fleet()
    meta = start_router(a, fleet, model_names or a.model_names(), a.merge_settings() if merge is None else merge)
    n_dec, n_merge = a.router.decision_actors(), a.router.mergers
    edges = {}
    plan = replica_plan(fleet, a.replicas)
    for c in fleet.classes:
        replicas, per_replica = plan[c.name]
        # A replica that shares its class's nodes may hold any of them: Serve's routing of new node ids
        # is not exactly balanced (measured: capped at ceil(nodes / replicas), a node was evicted and
        # held nowhere at the end of a 32-node run), and an evicted node reloads its weights.
        cap = 1 if per_replica == 1 else c.count
        opts = {"num_cpus": c.replica_cpus, "num_gpus": c.replica_gpus, "resources": {edge_resource(c.name): 1}}
        if c.replica_memory_mb:
            opts["memory"] = c.replica_memory_mb * 2**20
        # room for a full batch per held node and the next one forming: requests wait in the node's
        # batcher (the queue the simulator models), not in Serve's router
        ongoing = max(16, 2 * a.queue.max_batch * cap)
        edges[c.name] = EdgeNode.options(name=edge_deployment(c.name), num_replicas=replicas, ray_actor_options=opts,
                                         max_ongoing_requests=ongoing).bind(
            c.name, a.router_name, a.threads, a.router.sample_per_slot, n_dec, n_merge, cap, a.bf16,
            a.queue.model_dump())
    nodes = {node: cls.name for node, cls in fleet.nodes()}
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0, "resources": {HEAD_RESOURCE: SHARE}})
    return ingress.bind(edges, nodes, meta.tasks, meta.pair, a.router_name, n_dec, a.api.model_dump())

