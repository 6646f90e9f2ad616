"""Fault injection for the reliability tests and `tanbr bench reliability`: kill the decision leader
(the standby takes over), lose the leader's whole machine (raylet and local directory; the standby on
another machine restores from storage), kill a merger (the others serve), kill an edge replica (Serve
replaces it), corrupt the newest checkpoint. Each returns what it measured."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import ray

from tanbr_ray.cluster.checkpoint import CheckpointStore
from tanbr_ray.cluster.decision_client import DecisionClient
from tanbr_ray.cluster.names import APP_NAME, NAMESPACE, merger_name

Action = Literal["kill_leader", "lose_leader_machine", "kill_merger", "kill_replica", "corrupt_checkpoint"]


@dataclass
class Fault:
    """`action` at `slot` of `policy`'s run: phase "serve" = mid-slot (after the push, before the
    requests), "end" = after the slot's update."""

    policy: str
    slot: int
    action: Action
    phase: Literal["serve", "end"] = "serve"
    target: str = "board"  # the edge class whose replica is killed
    report: dict = field(default_factory=dict)


def kill_leader(client: DecisionClient, wait: bool = True, timeout_s: float = 120.0) -> dict:
    """Kill the decision leader's process (Ray restarts it as the standby); with `wait`, block until
    the successor leads and has published."""
    before = client.state()
    if before is None:
        raise RuntimeError("no decision leader to kill")
    t_wall, t0 = time.time(), time.perf_counter()
    ray.kill(client.handle(before["name"]), no_restart=False)
    rep = {"killed": before["name"], "t_kill_wall": t_wall, "term_before": before["term"],
           "updated_slot_before": before["updated_slot"], "decided_slot_before": before["decided_slot"],
           "version_before": before["version"]}
    if not wait:
        return rep
    after = client.wait_leader(since=t_wall, timeout_s=timeout_s)
    recovery = time.perf_counter() - t0
    took = after["takeovers"][-1]
    if len(client.names) > 1:  # and the killed one back as the standby, so a second fault finds one
        deadline = time.monotonic() + timeout_s
        while len([s for s in client.states(timeout_s=2.0) if s["role"] in ("standby", "leader")]) < len(client.names):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{before['name']} not back as the standby after {timeout_s:.0f} s")
            time.sleep(0.05)
    return {**rep, "recovery_seconds": recovery, "standby_back_s": time.perf_counter() - t0,
            "new_leader": after["name"],
            "term_after": after["term"], "takeover_at_s": took["at"] - t_wall,
            "restore_s": took["restore_s"], "publish_s": took["publish_s"],
            "updated_slot_after": took["updated_slot"], "decided_slot_after": took["decided_slot"],
            "restored_from": took["restored_from"], "refused_checkpoints": took["refused_checkpoints"]}


def node_of(actor) -> str:
    """The Ray node (machine) an actor runs on."""
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=30)


def lose_leader_machine(client: DecisionClient, wait: bool = True, timeout_s: float = 120.0) -> dict:
    """Lose the machine the decision leader runs on (local cluster: its raylet killed, its directory
    removed). A leader on the head is first moved off it by a process kill, since the head holds the
    GCS. The standby, on another machine, restores from storage; the lost actor stays pending until a
    machine carrying `tanbr_control` is free for it."""
    from tanbr_ray.cluster.local import RUNNING, lose_machine

    st = client.state()
    if st is None:
        raise RuntimeError("no decision leader whose machine to lose")
    moved = None
    if node_of(client.handle(st["name"])) == RUNNING[-1].head_node.node_id:
        moved = kill_leader(client, wait=True, timeout_s=timeout_s)
        st = client.wait_leader(since=moved["t_kill_wall"], timeout_s=timeout_s)
    node = node_of(client.handle(st["name"]))
    t_wall, t0 = time.time(), time.perf_counter()
    machine = lose_machine(node)
    rep = {"killed": st["name"], "machine": machine, "t_kill_wall": t_wall, "term_before": st["term"],
           "updated_slot_before": st["updated_slot"], "decided_slot_before": st["decided_slot"],
           "version_before": st["version"], "moved_off_head_first": moved is not None}
    if not wait:
        return rep
    after = client.wait_leader(since=t_wall, timeout_s=timeout_s)
    took = after["takeovers"][-1]
    return {**rep, "recovery_seconds": time.perf_counter() - t0, "new_leader": after["name"],
            "term_after": after["term"], "updated_slot_after": took["updated_slot"],
            "decided_slot_after": took["decided_slot"], "restored_from": took["restored_from"],
            "refused_checkpoints": took["refused_checkpoints"]}


def kill_merger(router_name: str, index: int = 0) -> dict:
    """Kill one merger's process; Ray restarts it while the others answer."""
    name = merger_name(router_name, index)
    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=False)
    return {"killed": name, "t_kill_wall": time.time()}


def replica_actors(deployment: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{deployment}#"))


def kill_replica(deployment: str) -> dict:
    """Kill one replica of the deployment outright; Serve replaces it and the new one pulls its node's
    current version before serving."""
    names = replica_actors(deployment)
    if not names:
        raise ValueError(f"no live replica of {deployment!r}")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return {"killed": names[0], "t_kill_wall": time.time()}


def corrupt_checkpoint(storage: str) -> dict:
    """Truncate the newest checkpoint's bandit file in storage (what a failed disk or upload leaves)."""
    store = CheckpointStore(storage)
    newest = store.checkpoints()[0]
    victim = next(f for f in store.files(newest) if f.endswith((".safetensors", ".json")))
    return {"corrupted": store.damage(newest, victim)}
