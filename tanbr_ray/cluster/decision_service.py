"""The decision state, Ray-free and model-free: policy, one monitor per node, weight versions, slot ids,
checkpoints.

It imports no model code (no MoE, no transformers), so the actor that hosts it (decision_actor.py)
starts in about a second and a standby can hold a warm copy; merging and the label-free reference
predictions live in the mergers (merger.py), which hold the experts. What it needs to know about the
model comes in a `ModelMeta` (tasks, number of experts, each task's expert).

Per slot: `decide` (psi per node -> x per node under its budget -> a new version for the nodes whose
x changed), then after the slot `update` with the nodes' per-task rewards. Live serving feeds
`observe` with what each node served, so psi comes from the node monitors; the simulation passes its
own psi-hat, computed by the same monitors, so both backends choose alike.

Durability: with `storage` (a path or URI every machine reads: NFS, `s3://`, `gs://`), every
decide/update/reset ends with a checksummed checkpoint there (policy state incl. bandit network, A and RNG; monitors; versions; the slot ids done), and
`restore` loads the newest valid one. Calls carry slot ids, so a call retried after a crash or a
takeover is applied exactly once: nothing lost, nothing repeated.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tanbr_ray.cluster.checkpoint import CheckpointStore
from tanbr_ray.fileio import read_json
from tanbr_ray.router import TaskMonitor, registry
from tanbr_ray.router.tanbr import Tanbr, TanbrConfig
from tanbr_ray.sim.fleet import Fleet

log = logging.getLogger(__name__)
HISTORY = 8  # slots whose (x, psi) are kept: live learning of a slot runs after the next one is decided


class RouterSpec(BaseModel):
    """What the decision actors and mergers are built from (validated: it crosses process boundaries)."""

    model_config = ConfigDict(extra="forbid")

    policy: str = "Tanbr"
    seed: int = 0
    random_points: int = Field(0, ge=0, le=100_000, description="Random's finite set of draws (RandomPolicy); 0 = fresh draws")
    tanbr: TanbrConfig = Field(default_factory=TanbrConfig)
    threads: int | None = Field(None, ge=1)
    sample_per_slot: int = Field(32, ge=0, le=10_000, description="served requests scored label-free per node")
    storage: str | None = Field(None, description="where decision state lives: a path every machine of the cluster "
                                "reads (NFS), or an object-store URI (s3://, gs://); checkpoint every slot, restore on start")
    checkpoint_keep: int = Field(3, ge=2, le=1000)
    mergers: int = Field(2, ge=1, le=16, description="merger actors, each holding the experts (stateless)")
    standby: bool | None = Field(None, description="a standby decision actor that takes over when the leader "
                                                   "dies; needs storage; None = on when storage is set")

    @field_validator("storage")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return None if v is None or "://" in v else os.path.expanduser(v)

    @model_validator(mode="after")
    def _standby_needs_checkpoints(self) -> "RouterSpec":
        if self.standby and not self.storage:
            raise ValueError("router.standby: needs router.storage (the standby restores from it)")
        return self

    def decision_actors(self) -> int:
        """1 (a leader) or 2 (leader + standby)."""
        return 2 if (self.standby is None and self.storage) or self.standby else 1


class ModelMeta(BaseModel):
    """What the decision side knows of the model: a merger reads it from the MoE once."""

    model_config = ConfigDict(extra="forbid")

    name: str  # the model's cache key
    tasks: list[str] = Field(min_length=1)
    pair: list[bool]  # per task: whether its requests carry text_b (the ingress checks requests by it)
    num_experts: int = Field(ge=1)
    task_experts: list[int]
    merge_operator: str

    @model_validator(mode="after")
    def _one_expert_per_task(self) -> "ModelMeta":
        if len(self.pair) != len(self.tasks):
            raise ValueError(f"model meta: {len(self.pair)} pair flags for {len(self.tasks)} tasks")
        if len(self.task_experts) != len(self.tasks) or not all(0 <= e < self.num_experts for e in self.task_experts):
            raise ValueError(f"model meta: task_experts {self.task_experts} do not fit {len(self.tasks)} tasks and "
                             f"{self.num_experts} experts")
        return self


@dataclass
class Assignment:
    version: int
    x: np.ndarray


def x_key(x) -> bytes:
    return np.asarray(x, dtype=np.float64).tobytes()


class DecisionService:
    def __init__(self, spec: RouterSpec, meta: ModelMeta, fleet: Fleet, restore: bool = True):
        if spec.threads:
            import torch  # the bandit's network only

            torch.set_num_threads(spec.threads)
        self.spec, self.meta, self.fleet = spec, meta, fleet
        self.tasks = list(meta.tasks)
        fleet.check_model(meta.num_experts, self.tasks)
        self.nodes = fleet.nodes()
        self.node_index = {name: n for n, (name, _) in enumerate(self.nodes)}
        self.task_experts = np.asarray(meta.task_experts)
        self.version = 0
        self.store = CheckpointStore(spec.storage, spec.checkpoint_keep) if spec.storage else None
        self.fence = None  # set by the decision actor: raises when a newer term has replaced it
        self.restored_from: str | None = None
        self.refused: list[str] = []  # checkpoints refused at restore (corrupt), newest first
        self._reset(spec.policy)
        if restore and self.store is not None and not self.restore():
            self.checkpoint()

    def reset(self, policy: str) -> None:
        """A fresh policy and monitors (the next run); versions keep counting up, so no node can
        mistake an old model for a new one."""
        self._reset(policy)
        self.checkpoint()

    def _reset(self, policy: str) -> None:
        if policy not in registry.names("served"):
            raise ValueError(f"policy: {policy!r} is not a router policy; choose from "
                             f"{', '.join(registry.names('served'))}")
        if self.store is not None and not registry.POLICIES[policy].checkpointable:
            raise ValueError(f"policy: {policy!r} cannot be checkpointed; with storage use one of "
                             f"{', '.join(p for p in registry.names('served') if registry.POLICIES[p].checkpointable)}")
        self.policy_name = policy
        self.policy = registry.make_policy(policy, self.meta.num_experts, len(self.tasks), self.spec.seed,
                                           self.spec.tanbr, self.task_experts, tasks=self.tasks,
                                           random_points=self.spec.random_points)
        self.monitors = [TaskMonitor(self.tasks, self.spec.tanbr.monitor) for _ in self.nodes]
        self.assign: dict[str, Assignment] = {}
        self.last_psi = np.zeros((len(self.nodes), len(self.tasks)))
        self.slot = 0  # updates applied
        self.decided_slot = self.updated_slot = -1  # the slot ids done (a retried call is a no-op)
        self.observed_slot = -1  # live: the last slot whose served heads fed the monitors
        self.history: dict[int, tuple[list, list]] = {}  # slot -> (x per node, psi per node) it was decided with
        self.last_xs: np.ndarray | None = None

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
        xs = self.policy.select_many(psis, [cls.budget for _, cls in self.nodes])
        self.last_psi = psis
        changed = [name for (name, _), x in zip(self.nodes, xs)
                   if name not in self.assign or not np.array_equal(self.assign[name].x, x)]
        if changed:
            self.version += 1
            for name in changed:
                self.assign[name] = Assignment(self.version, xs[self.node_index[name]])
        self.decided_slot = self.decided_slot + 1 if slot is None else slot
        self.last_xs = xs
        self.history[self.decided_slot] = (xs.tolist(), psis.tolist())
        for old in sorted(self.history)[:-HISTORY]:
            del self.history[old]
        self.checkpoint()
        return xs

    def update(self, feedback: list[tuple], slot: int | None = None) -> bool:
        """(x, psi, per-task reward, observed mask) per node, in node order, after the slot.
        `slot` identifies the call: a slot already learned from is not learned from twice (False)."""
        if slot is not None and slot <= self.updated_slot:
            return False
        if feedback:  # one batched update for the slot's nodes
            xs, psis, rewards, masks = zip(*feedback)
            self.policy.update_many(xs, psis, rewards, [np.asarray(m, dtype=bool) for m in masks])
        self.slot += 1
        self.updated_slot = self.updated_slot + 1 if slot is None else slot
        self.checkpoint()
        return True

    def live_observe(self, slot: int, reports: list[dict]) -> bool:
        """What each replica served in live slot `slot` feeds the node monitors (psi for the next
        decision). Not checkpointed on its own: the decision that follows checkpoints both.
        Exactly-once by slot id: a slot already observed is not counted again."""
        if slot <= self.observed_slot or slot <= self.updated_slot:
            return False
        for rep in reports:
            for node, heads in rep.get("heads", {}).items():
                self.observe(node, heads)
        for m in self.monitors:
            m.end_slot()
        self.observed_slot = slot
        return True

    def live_learn(self, slot: int, rewards: dict[str, tuple]) -> bool:
        """Each node's label-free reward for live slot `slot` (a merger scored it) updates the policy,
        with the x and psi that slot was decided with. It runs after the next slot is decided, so the
        next decision never waits for the scoring. Exactly-once by slot id."""
        if slot <= self.updated_slot:
            return False
        xs, psis = self.history.get(slot, ([], []))
        feedback = []
        for n, (node, _) in enumerate(self.nodes):
            if n < len(xs) and node in rewards:
                r, mask = rewards[node]
                feedback.append((np.asarray(xs[n]), np.asarray(psis[n]), np.asarray(r), np.asarray(mask, dtype=bool)))
        return self.update(feedback, slot)  # checkpoints even with no feedback

    @staticmethod
    def samples_of(reports: list[dict]) -> dict[str, list]:
        """node -> the served (head, text_a, text_b, prediction) rows the replicas sampled."""
        samples: dict[str, list] = {}
        for rep in reports:
            for node, rows in rep.get("sample", {}).items():
                samples.setdefault(node, []).extend(rows)
        return samples

    # --- durability -----------------------------------------------------------------------------
    def checkpoint(self) -> str | None:
        return None if self.store is None else self.store.save(self._write, fence=self.fence)

    def _write(self, d: Path) -> None:
        if isinstance(self.policy, Tanbr):
            self.policy.save(d / "policy")
        state = {
            "policy": self.policy_name, "version": self.version, "slot": self.slot,
            "decided_slot": self.decided_slot, "updated_slot": self.updated_slot,
            "observed_slot": self.observed_slot, "history": {str(k): v for k, v in self.history.items()},
            "last_xs": None if self.last_xs is None else self.last_xs.tolist(),
            "last_psi": self.last_psi.tolist(),
            "assign": {n: [a.version, a.x.tolist()] for n, a in self.assign.items()},
            "monitors": [m.state_dict() for m in self.monitors],
        }
        (d / "router.json").write_text(json.dumps(state))

    def restore(self) -> bool:
        """Load the newest valid checkpoint (refusing corrupt ones with the file named); False if none."""
        if self.store is None:
            return False
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
        self.observed_slot = int(st.get("observed_slot", -1))
        self.history = {int(k): (v[0], v[1]) for k, v in st.get("history", {}).items()}
        self.last_xs = None if st["last_xs"] is None else np.asarray(st["last_xs"])
        self.last_psi = np.asarray(st["last_psi"])
        self.assign = {n: Assignment(int(v), np.asarray(x)) for n, (v, x) in st["assign"].items()}
        self.monitors = [TaskMonitor.from_state_dict(m) for m in st["monitors"]]
        # Versions issued after this checkpoint were lost with the newer ones (at most keep - 1, plus one
        # decide in flight): jump past them and re-stamp every node, so no replica mistakes a lost
        # version's weights for the restored ones. A replica that holds the same x only relabels.
        self.version += self.spec.checkpoint_keep + 1
        for a in self.assign.values():
            a.version = self.version
        self.restored_from = path.name
        return True

    # --- live serving: what the nodes report -----------------------------------------------------
    def observe(self, node: str, heads: list[str]) -> None:
        self.monitors[self._node(node)].observe_many(heads)

    # --- queries ---------------------------------------------------------------------------------
    def _node(self, node: str) -> int:
        if node not in self.node_index:
            raise ValueError(f"unknown node {node!r}; nodes: {list(self.node_index)}")
        return self.node_index[node]

    def assignment(self, node: str) -> Assignment:
        a = self.assign.get(node)
        if a is None:
            self._node(node)
            raise RuntimeError(f"node {node!r} has no model yet (no slot decided)")  # not ready: a 503
        return a

    def distinct_xs(self) -> dict[bytes, np.ndarray]:
        """One x per distinct merge the nodes need (each is merged once)."""
        return {x_key(a.x): a.x for a in self.assign.values()}

    def state(self) -> dict:
        return {
            "router": {**self.spec.model_dump(mode="json"), "merge_operator": self.meta.merge_operator},
            "policy": self.policy_name, "version": self.version, "slot": self.slot, "tasks": self.tasks,
            "decided_slot": self.decided_slot, "updated_slot": self.updated_slot, "observed_slot": self.observed_slot,
            "restored_from": self.restored_from, "refused_checkpoints": self.refused,
            "nodes": {name: {"class": cls.name, "budget": cls.budget,
                             "x": self.assign[name].x.tolist() if name in self.assign else None,
                             "version": self.assign[name].version if name in self.assign else None,
                             "psi": self.last_psi[n].tolist()}
                      for n, (name, cls) in enumerate(self.nodes)},
        }
