"""Binary partition tree over the merging-weight space X.

Geometry. X is the probability simplex in R^K (intersected with ||x||_0 <= B). A node's *region* is
the simplex cut by an axis-aligned box: {x : sum(x) = 1, lo <= x <= hi}; the root's box is [0, 1]^K,
i.e. all of X. Boxes are kept tight: [lo_i, hi_i] is exactly the range x_i takes inside the region
(one pass of lo_i >= 1 - sum_{j!=i} hi_j, hi_i <= 1 - sum_{j!=i} lo_j is exact for a box cut by a
hyperplane). A split halves the longest tight side at its midpoint (lowest index on ties); both halves
are non-empty because the region is convex. Working in x itself (rather than a stick-breaking
parametrisation) keeps precision even: a dominant expert at 0.73 is as easy to reach as a balanced mix.
A node's *representative* is the point of its region nearest the box centre (Euclidean projection of
the centre onto {sum = 1} within the box); the root's is the uniform merge 1/K. Besides it, a leaf
offers `probes` more points of its region (random box points projected the same way, fixed per node
id, so they need no saved state): in high dimension (K = 8) a cell is large long before it is deep,
and the probes let the bandit's model pick the part of a coarse cell it predicts best for the current
psi, where the centre alone would play the same near-uniform merge for every mix. Candidates are
mapped into X for a budget B by keeping the B largest weights and renormalising
(`tanbr_ray.simplex.project_rows_to_budget`).

Split rule. Every time a leaf's candidate is played its visit count grows; a leaf at depth h splits
when visits >= tau_h = ceil(tau0 * rho^(-h)), rho in (0, 1). Small rho makes tau_h grow fast with
depth (few splits: little exploration, a coarse final candidate set); rho near 1 keeps splitting
(longer exploration, finer candidates near the optimum). No split beyond `max_depth`, and none that
would exceed `max_nodes` (all arrays are preallocated to that cap, so memory is flat by construction).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tanbr_ray.simplex import project_rows_to_budget


class TreeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rho: float = Field(0.9, gt=0.0, lt=1.0, description="smoothness: split threshold growth per depth")
    tau0: float = Field(1.0, gt=0.0, le=1e6, description="visits needed to split the root")
    nu: float = Field(0.05, ge=0.0, le=1e3, description="smoothness scale: optimism nu*rho^depth of a cell")
    max_depth: int = Field(64, ge=0, le=4096)
    max_nodes: int = Field(1023, ge=1, le=1 << 20)
    probes: int = Field(7, ge=0, le=256, description="points per leaf besides its representative (0 = centre only)")


def tighten(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-coordinate range of {sum(x) = 1, lo <= x <= hi} (rows of lo/hi)."""
    slo, shi = lo.sum(-1, keepdims=True), hi.sum(-1, keepdims=True)
    return np.maximum(lo, 1.0 - (shi - hi)), np.minimum(hi, 1.0 - (slo - lo))


def representatives(lo: np.ndarray, hi: np.ndarray, iters: int = 60, at: np.ndarray | None = None) -> np.ndarray:
    """Projection of each box centre (or of the box points `at`) onto {sum(x) = 1, lo <= x <= hi}:
    clip(c - t, lo, hi) with sum 1. The sum is monotone in the shift t, so bisection finds it
    (vectorised over rows).
    """
    centre = 0.5 * (lo + hi) if at is None else at
    t_lo = (centre - hi).min(-1, keepdims=True)  # sum >= 1 here (every coordinate at hi)
    t_hi = (centre - lo).max(-1, keepdims=True)  # sum <= 1 here (every coordinate at lo)
    for _ in range(iters):
        t = 0.5 * (t_lo + t_hi)
        too_big = np.clip(centre - t, lo, hi).sum(-1, keepdims=True) > 1.0
        t_lo, t_hi = np.where(too_big, t, t_lo), np.where(too_big, t_hi, t)
    x = np.clip(centre - 0.5 * (t_lo + t_hi), lo, hi)
    return x / x.sum(-1, keepdims=True)


class PartitionTree:
    """Nodes with a region (u-box), depth, visit count and a representative point."""

    def __init__(self, num_experts: int, config: TreeConfig | None = None):
        if num_experts < 2:
            raise ValueError(f"num_experts: need at least 2 experts to merge, got {num_experts}")
        self.num_experts = num_experts
        self.config = config or TreeConfig()
        cap = self.config.max_nodes
        self.lo = np.zeros((cap, num_experts))
        self.hi = np.ones((cap, num_experts))
        self.rep = np.zeros((cap, num_experts))
        self.depth = np.zeros(cap, dtype=np.int64)
        self.visits = np.zeros(cap, dtype=np.int64)
        self.parent = np.full(cap, -1, dtype=np.int64)
        self.children = np.full((cap, 2), -1, dtype=np.int64)
        self.size = 1
        self.rep[0] = representatives(self.lo[:1], self.hi[:1])[0]
        self._leaves = [0]
        self._cand_cache: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray]] = {}
        self._points: dict[int, np.ndarray] = {}  # a node's region never changes: its points neither

    # --- structure -------------------------------------------------------------------------
    @property
    def leaves(self) -> np.ndarray:
        """Ids of the active leaves: they form the candidate set."""
        return np.asarray(self._leaves, dtype=np.int64)

    def is_leaf(self, node: int) -> bool:
        return 0 <= node < self.size and self.children[node, 0] < 0

    def threshold(self, depth: int) -> int:
        """Visits a leaf at this depth needs before it splits: ceil(tau0 * rho^-depth)."""
        return int(math.ceil(self.config.tau0 * self.config.rho ** (-depth) - 1e-9))

    def optimism(self, nodes: np.ndarray | None = None) -> np.ndarray:
        """nu * rho^depth per node (default: the active leaves): how much better than its
        representative a cell may be.

        A representative is one point of its cell; under the usual smoothness assumption (HOO, HCT)
        the cell's best point beats it by at most nu * rho^depth, so coarse cells near the optimum
        still get played, and therefore split, even while their representative scores poorly.
        """
        return self.config.nu * self.config.rho ** self.depth[self.leaves if nodes is None else nodes]

    def can_split(self, node: int) -> bool:
        return (self.is_leaf(node) and self.depth[node] < self.config.max_depth
                and self.size + 2 <= self.config.max_nodes)

    def split(self, node: int) -> tuple[int, int] | None:
        """Halve the node's box along its longest side (lowest index on ties); None at a cap."""
        if not self.can_split(node):
            return None
        side = int(np.argmax(self.hi[node] - self.lo[node]))
        mid = 0.5 * (self.lo[node, side] + self.hi[node, side])
        ids = (self.size, self.size + 1)
        for child, (a, b) in zip(ids, ((self.lo[node, side], mid), (mid, self.hi[node, side]))):
            self.lo[child], self.hi[child] = self.lo[node], self.hi[node]
            self.lo[child, side], self.hi[child, side] = a, b
            self.depth[child] = self.depth[node] + 1
            self.parent[child] = node
        self.lo[list(ids)], self.hi[list(ids)] = tighten(self.lo[list(ids)], self.hi[list(ids)])
        self.rep[list(ids)] = representatives(self.lo[list(ids)], self.hi[list(ids)])
        self.children[node] = ids
        self.size += 2
        pos = self._leaves.index(node)
        self._leaves[pos:pos + 1] = list(ids)
        self._cand_cache.clear()
        return ids

    def visit(self, node: int) -> tuple[int, int] | None:
        """Count one play of a leaf; split it once its visits reach the depth's threshold."""
        if not self.is_leaf(node):
            raise ValueError(f"node: {node} is not an active leaf of this tree")
        self.visits[node] += 1
        if self.visits[node] >= self.threshold(int(self.depth[node])):
            return self.split(node)
        return None

    # --- candidates ------------------------------------------------------------------------
    def points(self, node: int) -> np.ndarray:
        """The node's representative, then its `probes` fixed random points (seeded by node id)."""
        m = self.config.probes
        if m == 0:
            return self.rep[node][None]
        if node not in self._points:
            u = np.random.default_rng(node).random((m, self.num_experts))
            lo, hi = np.repeat(self.lo[node][None], m, 0), np.repeat(self.hi[node][None], m, 0)
            self._points[node] = np.concatenate([self.rep[node][None], representatives(lo, hi, at=lo + u * (hi - lo))])
        return self._points[node]

    def candidates(self, budget: int) -> np.ndarray:
        """Representatives of the active leaves mapped into X for this budget (cached until a split)."""
        return self._candidates(budget, probes=False)[0]

    def candidate_points(self, budget: int) -> tuple[np.ndarray, np.ndarray]:
        """(points, leaf of each point): every active leaf's representative and probes, in X for
        this budget (cached until a split)."""
        return self._candidates(budget, probes=True)

    def _candidates(self, budget: int, probes: bool) -> tuple[np.ndarray, np.ndarray]:
        cached = self._cand_cache.get((budget, probes))
        if cached is None:
            leaves = self.leaves
            pts = np.concatenate([self.points(int(n)) for n in leaves]) if probes else self.rep[leaves]
            cached = (project_rows_to_budget(pts, budget), np.repeat(leaves, len(pts) // len(leaves)))
            self._cand_cache[(budget, probes)] = cached
        return cached

    def contains(self, node: int, x: np.ndarray) -> bool:
        """Whether x (on the simplex) lies in the node's region."""
        x = np.asarray(x, dtype=np.float64)
        return bool(np.all(x >= self.lo[node] - 1e-12) and np.all(x <= self.hi[node] + 1e-12))

    # --- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        n = self.size
        return {
            "num_experts": self.num_experts,
            "config": self.config.model_dump(),
            "size": n,
            "lo": self.lo[:n].tolist(), "hi": self.hi[:n].tolist(),
            "depth": self.depth[:n].tolist(), "visits": self.visits[:n].tolist(),
            "parent": self.parent[:n].tolist(), "children": self.children[:n].tolist(),
            "leaves": list(self._leaves),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "PartitionTree":
        tree = cls(int(state["num_experts"]), TreeConfig(**state["config"]))
        n = int(state["size"])
        if not 1 <= n <= tree.config.max_nodes:
            raise ValueError(f"tree.size: {n} outside [1, max_nodes={tree.config.max_nodes}]")
        tree.size = n
        tree.lo[:n], tree.hi[:n] = np.asarray(state["lo"]), np.asarray(state["hi"])
        tree.depth[:n], tree.visits[:n] = state["depth"], state["visits"]
        tree.parent[:n], tree.children[:n] = state["parent"], np.asarray(state["children"])
        tree.rep[:n] = representatives(tree.lo[:n], tree.hi[:n])
        tree._leaves = [int(i) for i in state["leaves"]]
        return tree
