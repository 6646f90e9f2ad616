"""HOO (Bubeck et al. 2011): hierarchical optimistic optimisation on the same partition tree.

Tree UCB without a neural model: every node keeps the count and mean of the scalar reward psi.r
observed below it, U = mean + sqrt(2 ln t / n) + nu * rho^depth, and B = min(U, max(B_children))
(+inf for unplayed nodes). Each round walks from the root to a leaf along the larger B, plays the
leaf's representative and expands it (one split per round until the node cap). HOO ignores psi except
through the reward, so it cannot carry what it learned across task mixes.
"""

from __future__ import annotations

import numpy as np

from tanbr_ray.router.policy import Policy
from tanbr_ray.router.tree import PartitionTree, TreeConfig


class HOOPolicy(Policy):
    name = "HOO"

    def __init__(self, num_experts: int, num_tasks: int, nu: float = 1.0, rho: float = 0.5,
                 max_nodes: int = 1023, max_depth: int = 64):
        super().__init__(num_experts, num_tasks)
        if not 0.0 < rho < 1.0:
            raise ValueError(f"rho: must be in (0, 1), got {rho}")
        if nu <= 0:
            raise ValueError(f"nu: must be > 0, got {nu}")
        self.nu, self.rho = nu, rho
        self.tree = PartitionTree(num_experts, TreeConfig(rho=rho, tau0=1.0, max_nodes=max_nodes,
                                                          max_depth=max_depth))
        cap = max_nodes
        self.count = np.zeros(cap)
        self.mean = np.zeros(cap)
        self.bval = np.full(cap, np.inf)
        self.t = 0
        self._pending: dict[bytes, list[int]] = {}

    def _select(self, psi, budget):
        tree, node, path = self.tree, 0, [0]
        while not tree.is_leaf(node):
            left, right = tree.children[node]
            node = int(left if self.bval[left] >= self.bval[right] else right)
            path.append(node)
        x = tree.candidates(budget)[int(np.nonzero(tree.leaves == node)[0][0])]
        self._pending[x.tobytes()] = path
        return x.copy()

    def _update(self, x, psi, rewards, mask):
        path = self._pending.pop(x.tobytes(), None)
        if path is None:  # not our choice: HOO cannot attribute it to a cell
            return
        weight = psi * mask
        reward = float(weight @ rewards / weight.sum()) if weight.sum() > 0 else float(rewards[mask].mean())
        self.t += 1
        for node in path:
            self.count[node] += 1
            self.mean[node] += (reward - self.mean[node]) / self.count[node]
        self.tree.split(path[-1])
        self._refresh_bvalues()

    def _refresh_bvalues(self) -> None:
        """Recompute U and B for all nodes, deepest level first (vectorised per depth)."""
        n = self.tree.size
        depth = self.tree.depth[:n]
        cnt = self.count[:n]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.mean[:n] + np.sqrt(2.0 * np.log(max(self.t, 1)) / cnt) + self.nu * self.rho ** depth
        u[cnt == 0] = np.inf
        b = u.copy()
        children = self.tree.children[:n]
        for d in range(int(depth.max()), -1, -1):
            nodes = np.nonzero((depth == d) & (children[:, 0] >= 0))[0]
            if len(nodes):
                b[nodes] = np.minimum(u[nodes], np.maximum(b[children[nodes, 0]], b[children[nodes, 1]]))
        self.bval[:n] = b
