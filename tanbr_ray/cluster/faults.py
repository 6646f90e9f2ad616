"""Fault injection for the reliability tests and `tanbr bench reliability`: kill the router actor, kill
an edge replica, corrupt the router's newest checkpoint. Each returns what it measured."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import ray

from tanbr_ray.cluster.checkpoint import CheckpointStore
from tanbr_ray.cluster.names import APP_NAME

Action = Literal["kill_router", "kill_replica", "corrupt_checkpoint"]


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


def wait_alive(actor, timeout_s: float = 120.0) -> float:
    """Seconds until the (restarting) actor answers again."""
    t0 = time.perf_counter()
    while True:
        try:
            ray.get(actor.state.remote(), timeout=timeout_s)
            return time.perf_counter() - t0
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"router actor not back after {timeout_s:.0f} s") from None


def kill_router(actor) -> dict:
    """Kill the router process; Ray restarts it and it restores its newest valid checkpoint."""
    before = ray.get(actor.state.remote())
    t0 = time.perf_counter()
    ray.kill(actor, no_restart=False)
    time.sleep(0.2)
    recovery = wait_alive(actor)
    after = ray.get(actor.state.remote())
    return {"recovery_seconds": time.perf_counter() - t0, "restart_to_answer_seconds": recovery,
            "updated_slot_before": before["updated_slot"], "updated_slot_after": after["updated_slot"],
            "decided_slot_before": before["decided_slot"], "decided_slot_after": after["decided_slot"],
            "restored_from": after["restored_from"], "refused_checkpoints": after["refused_checkpoints"]}


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
    return {"killed": names[0]}


def corrupt_checkpoint(checkpoint_dir: str | Path) -> dict:
    """Truncate the newest checkpoint's bandit file (what a crash of the disk under it would leave)."""
    newest = CheckpointStore(checkpoint_dir).checkpoints()[0]
    victim = next(p for p in sorted(newest.rglob("*")) if p.is_file() and p.name != "MANIFEST.json"
                  and p.suffix in (".safetensors", ".json"))
    victim.write_bytes(victim.read_bytes()[: max(1, victim.stat().st_size // 3)])
    return {"corrupted": str(victim)}
