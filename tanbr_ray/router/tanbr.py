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
    psi_grid: int = Field(32, ge=0, le=1_000_000, description="ψ-family points (Tanbr's and ψ-merge's) snap to "
                          "multiples of 1/psi_grid, so a steady mix replays the same x and its merge is reused; "
                          "0 = exact")


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
        self.pending: dict[bytes, list[int]] = {}  # played x -> leaf of each play, until its reward arrives
        self.updates = 0

    # --- the per-slot path -----------------------------------------------------------------
    def select(self, psi=None, budget: int | None = None) -> np.ndarray:
        """psi defaults to the monitor's estimate, budget to K."""
        psi = self.monitor.psi() if psi is None else psi
        return super().select(psi, self.num_experts if budget is None else budget)

    def psi_family(self, psi: np.ndarray, budget: int) -> np.ndarray:
        """x ∝ m^p, top-B, m the psi mass of each expert's tasks (p = 1 is ψ-merge)."""
        m = np.bincount(self.task_experts, weights=psi, minlength=self.num_experts)
        return np.stack(list(psi_family(m, budget, grid=self.config.psi_grid).values()))

    def _leaf_of(self, x: np.ndarray) -> int:
        return next((int(l) for l in self.tree.leaves if self.tree.contains(int(l), x)), -1)

    def _select(self, psi, budget):
        cands, leaf = self.tree.candidate_points(budget)
        mean, width = self.bandit.ucb(cands, psi)
        return self._choose(psi[None], budget, cands, leaf, mean[None], width[None])[0]

    def _select_many(self, psis, budgets):
        """Every node of a slot: per budget, the tree's candidates once and the bandit's scores for
        all those nodes' psi in one batched pass (`NeuralUCB.ucb_many`); the same choices as
        `select` node by node."""
        xs = np.zeros((len(psis), self.num_experts))
        for budget, rows in self._by_budget(budgets):
            cands, leaf = self.tree.candidate_points(budget)
            mean, width = self.bandit.ucb_many(cands, psis[rows])
            xs[rows] = self._choose(psis[rows], budget, cands, leaf, mean, width)
        return xs

    def _choose(self, psis, budget, cands, leaf, mean, width) -> np.ndarray:
        """Per node (row of psis, mean, width over the candidates): the candidate with the best upper
        bound plus its cell's optimism, or, with `psi_candidates`, a ψ-family point that beats it
        (exact points, no optimism: a play visits the cell it lies in). Each play is remembered as
        pending: its leaf gets the visit when the reward comes back."""
        n, gamma = len(psis), self.config.bandit.gamma
        score = mean + gamma * width + self.tree.optimism(leaf)
        best = np.argmax(score, axis=1)
        xs, leaves = cands[best].copy(), leaf[best].copy()
        if self.config.psi_candidates:
            fam = np.stack([self.psi_family(p, budget) for p in psis])  # (nodes, family, K)
            f = fam.shape[1]
            fam_mean, fam_width = self.bandit.ucb(fam.reshape(n * f, -1), np.repeat(psis, f, axis=0))
            fam_score = (fam_mean + gamma * fam_width).reshape(n, f)
            j = np.argmax(fam_score, axis=1)
            for r in np.flatnonzero(fam_score[np.arange(n), j] > score[np.arange(n), best]):
                xs[r] = fam[r, j[r]]
                leaves[r] = self._leaf_of(xs[r])
        for x, l in zip(xs, leaves):
            self.pending.setdefault(x.tobytes(), []).append(int(l))
        return xs

    def _visit_played(self, x: np.ndarray) -> None:
        """Count the play of x at the leaf it was chosen from (each node's play of the same x counts)."""
        plays = self.pending.get(x.tobytes())
        if not plays:
            return
        leaf = plays.pop(0)
        if not plays:
            del self.pending[x.tobytes()]
        if leaf >= 0 and self.tree.is_leaf(leaf):
            self.tree.visit(leaf)

    def _update(self, x, psi, rewards, mask):
        self._visit_played(x)
        self.bandit.observe(x, psi, rewards, mask)
        self.updates += 1

    def _update_many(self, xs, psis, rewards, masks):
        """A slot's feedback: every play visits its leaf, then one batched observation (A for all
        rows, J gradient steps)."""
        for x in xs:
            self._visit_played(x)
        self.bandit.observe_many(xs, psis, rewards, masks)
        self.updates += len(xs)

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
        router.pending = {bytes.fromhex(k): [int(v)] if isinstance(v, int) else [int(l) for l in v]
                          for k, v in state["pending"].items()}  # one leaf per play (older states: one)
        router.updates = int(state["updates"])
        router.bandit.load_tensors(st_load(blob_path.read_bytes()), int(state["bandit_seen"]))
        return router
