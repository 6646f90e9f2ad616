"""Tanbr: task monitor + partition tree + neural UCB, behind select/update.

Per slot: the monitor's psi (or one the caller passes) -> the tree's active leaves give one feasible
candidate each (projected to the node's budget B) -> the neural UCB scores them for psi, plus the
cell's optimism nu*rho^depth, and the best is played -> after the slot the per-task rewards come back: the played leaf counts a visit (and
splits once past its depth's threshold, refining the candidates around what gets played), and the
bandit records the observation, updates A and takes J gradient steps.

State round-trips through `save(dir)` / `load(dir)`: state.json (configs, tree, monitor, pending
choices, counters) and bandit.safetensors (network, A, optimiser moments, replay buffer, RNG state),
the latter's sha256 recorded in the former, so a loaded router makes exactly the same next choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tanbr_ray.fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes, sha256_file
from tanbr_ray.router.bandit import BanditConfig, NeuralUCB
from tanbr_ray.router.monitor import MonitorConfig, TaskMonitor
from tanbr_ray.router.policy import Policy, default_task_experts
from tanbr_ray.simplex import psi_family
from tanbr_ray.router.tree import PartitionTree, TreeConfig

STATE_FORMAT = 1


class TanbrConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tree: TreeConfig = Field(default_factory=TreeConfig)
    bandit: BanditConfig = Field(default_factory=BanditConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    psi_candidates: bool = Field(False, description="offer the ψ-family x ∝ psi^p (p in 0.5, 1, 2, 4; top-B) "
                                 "beside the tree's points every slot")


class Tanbr(Policy):
    name = "Tanbr"

    def __init__(self, num_experts: int, num_tasks: int, config: TanbrConfig | None = None,
                 tasks: Sequence[str] | None = None, task_experts: Sequence[int] | None = None):
        super().__init__(num_experts, num_tasks)
        self.config = config or TanbrConfig()
        self.tasks = list(tasks) if tasks is not None else [f"task{v}" for v in range(num_tasks)]
        if len(self.tasks) != num_tasks:
            raise ValueError(f"tasks: {len(self.tasks)} names for {num_tasks} task types")
        self.task_experts = np.asarray(task_experts if task_experts is not None
                                       else default_task_experts(num_tasks, num_experts))
        self.tree = PartitionTree(num_experts, self.config.tree)
        self.bandit = NeuralUCB(num_experts, num_tasks, self.config.bandit, self.task_experts)
        self.monitor = TaskMonitor(self.tasks, self.config.monitor)
        self.pending: dict[bytes, int] = {}  # played x -> leaf, until its reward arrives
        self.updates = 0

    # --- the per-slot path -----------------------------------------------------------------
    def select(self, psi=None, budget: int | None = None) -> np.ndarray:
        """psi defaults to the monitor's estimate, budget to K."""
        psi = self.monitor.psi() if psi is None else psi
        return super().select(psi, self.num_experts if budget is None else budget)

    def psi_family(self, psi: np.ndarray, budget: int) -> np.ndarray:
        """x ∝ m^p, top-B, m the psi mass of each expert's tasks (p = 1 is ψ-merge)."""
        m = np.bincount(self.task_experts, weights=psi, minlength=self.num_experts)
        return np.stack(list(psi_family(m, budget).values()))

    def _leaf_of(self, x: np.ndarray) -> int:
        return next((int(l) for l in self.tree.leaves if self.tree.contains(int(l), x)), -1)

    def _select(self, psi, budget):
        cands, leaf = self.tree.candidate_points(budget)
        optimism = self.tree.optimism(leaf)
        if self.config.psi_candidates:  # exact points, no cell optimism; a play visits the cell it lies in
            fam = self.psi_family(psi, budget)
            cands = np.concatenate([cands, fam])
            leaf = np.concatenate([leaf, [self._leaf_of(x) for x in fam]]).astype(np.int64)
            optimism = np.concatenate([optimism, np.zeros(len(fam))])
        mean, width = self.bandit.ucb(cands, psi)
        i = int(np.argmax(mean + self.config.bandit.gamma * width + optimism))
        x = cands[i].copy()
        self.pending[x.tobytes()] = int(leaf[i])
        return x

    def _update(self, x, psi, rewards, mask):
        leaf = self.pending.pop(x.tobytes(), None)
        if leaf is not None and leaf >= 0 and self.tree.is_leaf(leaf):
            self.tree.visit(leaf)
        self.bandit.observe(x, psi, rewards, mask)
        self.updates += 1

    # --- persistence -----------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        blob = st_save(self.bandit.tensors())
        atomic_write_bytes(directory / "bandit.safetensors", blob)
        atomic_write_json(directory / "state.json", {
            "format": STATE_FORMAT,
            "policy": self.name,
            "num_experts": self.num_experts, "num_tasks": self.num_tasks, "tasks": self.tasks,
            "task_experts": self.task_experts.tolist(),
            "config": self.config.model_dump(),
            "tree": self.tree.state_dict(),
            "monitor": self.monitor.state_dict(),
            "pending": {k.hex(): v for k, v in self.pending.items()},
            "updates": self.updates,
            "bandit_seen": self.bandit.n_seen,
            "bandit_sha256": sha256_bytes(blob),
        })

    @classmethod
    def load(cls, directory: str | Path) -> "Tanbr":
        directory = Path(directory)
        state = read_json(directory / "state.json", "router state")
        if state.get("format") != STATE_FORMAT or state.get("policy") != cls.name:
            raise ValueError(f"router state {directory / 'state.json'}: not a Tanbr state (format/policy)")
        blob_path = directory / "bandit.safetensors"
        if not blob_path.exists() or sha256_file(blob_path) != state["bandit_sha256"]:
            raise ValueError(f"router state {blob_path}: missing or checksum mismatch")
        for tree_cfg in (state["config"].get("tree", {}), state["tree"].get("config", {})):
            tree_cfg.setdefault("probes", 0)  # written before leaves had probes: candidates were the centres
        router = cls(state["num_experts"], state["num_tasks"], TanbrConfig(**state["config"]), state["tasks"],
                     state.get("task_experts"))
        router.tree = PartitionTree.from_state_dict(state["tree"])
        router.monitor = TaskMonitor.from_state_dict(state["monitor"])
        router.pending = {bytes.fromhex(k): int(v) for k, v in state["pending"].items()}
        router.updates = int(state["updates"])
        router.bandit.load_tensors(st_load(blob_path.read_bytes()), int(state["bandit_seen"]))
        return router
