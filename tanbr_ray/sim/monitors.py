"""Step 1 of a slot: each node's task monitor, and how far its estimate is from the true mix."""

from __future__ import annotations

import numpy as np

from tanbr_ray.router import TaskMonitor
from tanbr_ray.sim.workload import Workload


class FleetMonitors:
    """Step 1: one TaskMonitor per node, fed every request (scored or not) the node served, so slot
    t's psi-hat comes from earlier slots only. Every policy sees the same traffic, so each slot's
    estimate is made once, by the first policy to reach it, and kept for the others."""

    def __init__(self, wl: Workload, tasks: list[str], monitor):
        self.wl = wl
        self.monitors = [TaskMonitor(tasks, monitor) for _ in wl.requests[0]]
        self.estimates: list[np.ndarray] = []  # per slot, (nodes, V)

    def psi(self, t: int) -> np.ndarray:
        """psi-hat of every node for slot t (nodes, V)."""
        while len(self.estimates) <= t:
            s = len(self.estimates)
            self.estimates.append(np.stack([m.psi() for m in self.monitors]))
            for n, m in enumerate(self.monitors):  # what slot s serves counts from slot s + 1 on
                m.observe_many(self.wl.requests[s][n].heads)
                m.end_slot()
        return self.estimates[t]

    def all(self) -> np.ndarray:
        """(slots, nodes, V): every slot's estimates."""
        return np.stack([self.psi(t) for t in range(len(self.wl.requests))])



    def error(self, node_classes: list[str]) -> dict[str, float]:
        """Mean total-variation distance between ψ̂ and the true mix over the second half, per node
        class (`node_classes`: each node's) and over the fleet."""
        half = len(self.wl.requests) // 2
        tv = 0.5 * np.abs(self.all()[half:] - self.wl.psi[half:]).sum(-1)  # (slots, nodes)
        out = {}
        for cls in dict.fromkeys(node_classes):
            out[cls] = float(tv[:, [n for n, c in enumerate(node_classes) if c == cls]].mean())
        out["fleet"] = float(tv.mean())
        return out
