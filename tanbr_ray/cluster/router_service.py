"""The central router's logic, Ray-free: policy, full MoE, one monitor per node, weight versions.

The RouterActor (router_actor.py) hosts one of these and adds the object store. Per slot:
`decide` (psi per node -> x per node under its budget -> merge once per distinct x -> a new version for
the nodes whose x changed), then after the slot `update` with the nodes' per-task rewards. Live
serving feeds `observe` with what each node served, so psi comes from the node monitors; the
simulation passes its own psi-hat, computed by the same monitors, so both backends choose alike.

Durability: with `checkpoint_dir`, every decide/update/reset ends with an atomic checksummed
checkpoint (policy state incl. bandit network, A and RNG; monitors; versions; the slot ids done), and
a new service restores the newest valid one. Calls carry slot ids, so a call retried after a crash
is applied exactly once: nothing lost, nothing repeated.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from tanbr_ray.moe.data import PAIR, TaskSplit
from tanbr_ray.moe.edge import EdgePackage, edge_package
from tanbr_ray.moe.infer import _to_pred, make_batches
from tanbr_ray.router import TaskMonitor, registry
from tanbr_ray.cluster.checkpoint import CheckpointStore
from tanbr_ray.fileio import read_json
from tanbr_ray.router.tanbr import Tanbr, TanbrConfig
from tanbr_ray.sim.fleet import Fleet

log = logging.getLogger(__name__)
# policies whose whole state a checkpoint holds (the others draw from RNGs they do not persist)
CHECKPOINTABLE = ("Tanbr", "Uniform", "psi-merge")


class RouterSpec(BaseModel):
    """What the router actor is built from (validated: it crosses process boundaries as a dict)."""

    model_config = ConfigDict(extra="forbid")

    policy: str = "Tanbr"
    seed: int = 0
    tanbr: TanbrConfig = Field(default_factory=TanbrConfig)
    threads: int | None = Field(None, ge=1)
    sample_per_slot: int = Field(32, ge=0, le=10_000, description="served requests scored label-free per node")
    checkpoint_dir: str | None = Field(None, description="checkpoint every slot here; restore on start")
    checkpoint_keep: int = Field(3, ge=2, le=1000)


@dataclass
class Assignment:
    version: int
    x: np.ndarray


def x_key(x: np.ndarray) -> bytes:
    return np.asarray(x, dtype=np.float64).tobytes()


class RouterService:
    def __init__(self, spec: RouterSpec, moe, fleet: Fleet):
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec, self.moe, self.fleet = spec, moe, fleet
        self.tasks = list(moe.tasks)
        fleet.check_model(moe.num_experts, self.tasks)
        self.nodes = fleet.nodes()
        self.node_index = {name: n for n, (name, _) in enumerate(self.nodes)}
        self.task_experts = np.asarray([moe.expert_of[t] for t in self.tasks])
        self.version = 0
        self.slot = 0
        self.store = CheckpointStore(spec.checkpoint_dir, spec.checkpoint_keep) if spec.checkpoint_dir else None
        self.restored_from: str | None = None
        self.refused: list[str] = []  # checkpoints refused at restore (corrupt), newest first
        self._reset(spec.policy)
        if self.store is not None and not self.restore():
            self.checkpoint()

    def reset(self, policy: str) -> None:
        """A fresh policy and monitors (the next run); versions keep counting up, so no node can
        mistake an old model for a new one."""
        self._reset(policy)
        self.checkpoint()

    def _reset(self, policy: str) -> None:
        if policy not in registry.ROUTER_POLICIES or policy == "Oracle":
            choices = [p for p in registry.ROUTER_POLICIES if p != "Oracle"]
            raise ValueError(f"policy: {policy!r} is not a router policy; choose from {', '.join(choices)}")
        if self.store is not None and policy not in CHECKPOINTABLE:
            raise ValueError(f"policy: {policy!r} cannot be checkpointed; with checkpoint_dir use one of "
                             f"{', '.join(CHECKPOINTABLE)}")
        self.policy_name = policy
        self.policy = registry.make_policy(policy, self.moe.num_experts, len(self.tasks), self.spec.seed,
                                           self.spec.tanbr, self.task_experts, tasks=self.tasks)
        self.monitors = [TaskMonitor(self.tasks, self.spec.tanbr.monitor) for _ in self.nodes]
        self.assign: dict[str, Assignment] = {}
        self.weights: dict[bytes, dict[str, torch.Tensor]] = {}
        self.last_psi = np.zeros((len(self.nodes), len(self.tasks)))
        self.slot = 0
        self.decided_slot = self.updated_slot = -1  # the slot ids done (a retried call is a no-op)
        self.last_xs: np.ndarray | None = None

    def package(self) -> EdgePackage:
        return edge_package(self.moe)

    # --- per slot ------------------------------------------------------------------------------
    def decide(self, psis: np.ndarray | None = None, slot: int | None = None) -> np.ndarray:
        """x per node (node order); psis None = each node monitor's estimate from what it served.
        `slot` identifies the call: deciding a slot already decided returns the same choice."""
        if slot is not None and slot == self.decided_slot and self.last_xs is not None:
            return self.last_xs
        if psis is None:
            psis = np.stack([m.psi() for m in self.monitors])
        psis = np.asarray(psis, dtype=np.float64)
        if psis.shape != (len(self.nodes), len(self.tasks)):
            raise ValueError(f"psis: shape {psis.shape}, want ({len(self.nodes)}, {len(self.tasks)})")
        xs = np.stack([self.policy.select(psi, cls.budget) for psi, (_, cls) in zip(psis, self.nodes)])
        self.last_psi = psis
        changed = [name for (name, _), x in zip(self.nodes, xs)
                   if name not in self.assign or not np.array_equal(self.assign[name].x, x)]
        if changed:
            self.version += 1
            for name in changed:
                self.assign[name] = Assignment(self.version, xs[self.node_index[name]])
        self._merge()
        self.decided_slot = self.decided_slot + 1 if slot is None else slot
        self.last_xs = xs
        self.checkpoint()
        return xs

    def _merge(self) -> None:
        live = {x_key(a.x) for a in self.assign.values()}
        self.weights = {k: w for k, w in self.weights.items() if k in live}
        for a in self.assign.values():  # merge once per distinct x
            if x_key(a.x) not in self.weights:
                self.weights[x_key(a.x)] = self.moe.merged_state(a.x)

    def update(self, feedback: list[tuple], slot: int | None = None) -> None:
        """(x, psi, per-task reward, observed mask) per node, in node order, after the slot.
        `slot` identifies the call: a slot already learned from is not learned from twice."""
        if slot is not None and slot <= self.updated_slot:
            return
        for x, psi, r, mask in feedback:
            self.policy.update(np.asarray(x), np.asarray(psi), np.asarray(r), observed=np.asarray(mask, dtype=bool))
        self.slot += 1
        self.updated_slot = self.updated_slot + 1 if slot is None else slot
        self.checkpoint()

    # --- durability -----------------------------------------------------------------------------
    def checkpoint(self) -> Path | None:
        return None if self.store is None else self.store.save(self._write)

    def _write(self, d: Path) -> None:
        if isinstance(self.policy, Tanbr):
            self.policy.save(d / "policy")
        state = {
            "policy": self.policy_name, "version": self.version, "slot": self.slot,
            "decided_slot": self.decided_slot, "updated_slot": self.updated_slot,
            "last_xs": None if self.last_xs is None else self.last_xs.tolist(),
            "last_psi": self.last_psi.tolist(),
            "assign": {n: [a.version, a.x.tolist()] for n, a in self.assign.items()},
            "monitors": [m.state_dict() for m in self.monitors],
        }
        (d / "router.json").write_text(json.dumps(state))

    def restore(self) -> bool:
        """Load the newest valid checkpoint (refusing corrupt ones with the file named); False if none."""
        path, self.refused = self.store.latest()
        for err in self.refused:
            log.error("refused checkpoint: %s", err)
        if path is None:
            return False
        st = read_json(path / "router.json", "router checkpoint")
        self._reset(st["policy"])
        if st["policy"] == "Tanbr":
            self.policy = Tanbr.load(path / "policy")
        self.version, self.slot = int(st["version"]), int(st["slot"])
        self.decided_slot, self.updated_slot = int(st["decided_slot"]), int(st["updated_slot"])
        self.last_xs = None if st["last_xs"] is None else np.asarray(st["last_xs"])
        self.last_psi = np.asarray(st["last_psi"])
        self.assign = {n: Assignment(int(v), np.asarray(x)) for n, (v, x) in st["assign"].items()}
        self.monitors = [TaskMonitor.from_state_dict(m) for m in st["monitors"]]
        # Versions issued after this checkpoint were lost with the newer ones (at most keep - 1, plus one
        # decide in flight): jump past them and re-stamp every node, so no replica mistakes a lost
        # version's weights for the restored ones; each node is re-synced once.
        self.version += self.spec.checkpoint_keep + 1
        for a in self.assign.values():
            a.version = self.version
        self._merge()
        self.restored_from = path.name
        return True

    # --- live serving: what the nodes report -----------------------------------------------------
    def observe(self, node: str, heads: list[str]) -> None:
        self.monitors[self._node(node)].observe_many(heads)

    def end_slot(self) -> None:
        for m in self.monitors:
            m.end_slot()

    @torch.no_grad()
    def label_free_rewards(self, node: str, sample: list[tuple[str, str, str | None, float]]) -> tuple[np.ndarray, np.ndarray]:
        """Per-task agreement of the node's served predictions with the full MoE (top-2) on a sample
        of (head, text_a, text_b, prediction): the reward when no labels come back."""
        self._node(node)
        r, mask = np.zeros(len(self.tasks)), np.zeros(len(self.tasks), dtype=bool)
        for v, task in enumerate(self.tasks):
            rows = [s for s in sample if s[0] == task][: self.spec.sample_per_slot]
            if not rows:
                continue
            split = TaskSplit(task, [s[1] for s in rows], [s[2] for s in rows] if PAIR[task] else None, np.zeros(len(rows)))
            ref = np.zeros(len(rows))
            for b in make_batches(self.moe, [split]):
                ref[b.index] = _to_pred(task, self.moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode="top2"))
            r[v] = float(np.mean(np.abs(ref - np.asarray([s[3] for s in rows])) < 1e-6))
            mask[v] = True
        return r, mask

    # --- queries ---------------------------------------------------------------------------------
    def _node(self, node: str) -> int:
        if node not in self.node_index:
            raise ValueError(f"unknown node {node!r}; nodes: {list(self.node_index)}")
        return self.node_index[node]

    def weights_for(self, node: str) -> tuple[int, dict[str, torch.Tensor]]:
        a = self.assign.get(node)
        if a is None:
            self._node(node)
            raise RuntimeError(f"node {node!r} has no model yet (no slot decided)")  # not ready: a 503
        return a.version, self.weights[x_key(a.x)]

    def state(self) -> dict:
        return {
            "policy": self.policy_name, "version": self.version, "slot": self.slot, "tasks": self.tasks,
            "decided_slot": self.decided_slot, "updated_slot": self.updated_slot,
            "restored_from": self.restored_from, "refused_checkpoints": self.refused,
            "nodes": {name: {"class": cls.name, "budget": cls.budget,
                             "x": self.assign[name].x.tolist() if name in self.assign else None,
                             "version": self.assign[name].version if name in self.assign else None,
                             "psi": self.last_psi[n].tolist()}
                      for n, (name, cls) in enumerate(self.nodes)},
        }
