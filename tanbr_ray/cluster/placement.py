"""Where the app's actors run. A Ray node is a machine, and each role asks for the custom resource
that marks the machines meant for it: decision actors `tanbr_control` (leader and standby on
different machines: a STRICT_SPREAD placement group), mergers `tanbr_merger` (they hold the full
MoE), the ingress `tanbr_head`, edge replicas `edge_<class>`. cluster*.yaml declare them and the
local test cluster sets them per node. A cluster that lacks one is refused at deploy, naming it:
Ray would otherwise leave the actor pending forever."""

from __future__ import annotations

import ray
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group

from tanbr_ray.cluster.names import CONTROL_RESOURCE, HEAD_RESOURCE, MERGER_RESOURCE, edge_resource

SHARE = 0.01  # of its role's resource an actor takes: the resource marks where it may run, not how many


def machines_with(resource: str) -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource, 0) > 0]


def check_cluster(decision_actors: int, edge_classes: list[str]) -> None:
    """Refuse (ValueError naming each missing resource) a cluster the app cannot be placed on."""
    missing = []
    control = len(machines_with(CONTROL_RESOURCE))
    if control < decision_actors:
        missing.append(f"{CONTROL_RESOURCE} on {decision_actors} machines (leader and standby apart), found on "
                       f"{control}")
    for res in (MERGER_RESOURCE, HEAD_RESOURCE, *(edge_resource(c) for c in edge_classes)):
        if not machines_with(res):
            missing.append(f"{res} on no machine")
    if missing:
        raise ValueError("cluster cannot place the app: " + "; ".join(missing) + " (declare the resources per "
                         "node type in cluster.yaml, or `ray start --resources='{...}'` on each machine)")


def control_group(router_name: str, n: int, timeout_s: float = 60.0):
    """The decision actors' placement group, one bundle per actor on distinct machines (reused by a
    redeploy of the same router; removed with the app)."""
    name = f"{router_name}-control"
    try:
        pg = get_placement_group(name)
    except ValueError:
        pg = placement_group([{CONTROL_RESOURCE: SHARE}] * n, strategy="STRICT_SPREAD", name=name, lifetime="detached")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ValueError(f"placement group {name}: {n} machines carrying {CONTROL_RESOURCE} not available "
                         f"after {timeout_s:.0f} s") from None
    return pg


def remove_control_group(router_name: str) -> None:
    try:
        remove_placement_group(get_placement_group(f"{router_name}-control"))
    except ValueError:
        pass
