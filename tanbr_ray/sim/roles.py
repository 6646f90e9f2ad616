"""The two roles a slot talks to, and their in-process implementations.

A *router* (steps 2 and 6) picks each node's model for the slot and learns from the slot's rewards;
an *edge* (steps 3 and 4) gets every node onto its model and serves its requests. The local backend
runs both here; the Ray backend passes the decision actor and the Serve replicas instead. Fixed
serving modes (the full MoE, static merges, the task oracle) are routers too, ones that always pick
the same model and learn nothing, so every policy runs the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from tanbr_ray.router import Policy
from tanbr_ray.sim.spec import Spec


@dataclass(frozen=True)
class Feedback:
    """What one node's slot returns to the router (steps 5 and 6): the x it was served with, the
    ψ̂ it was chosen for, the per-task rewards on the scored sample and which tasks were observed."""

    x: np.ndarray
    psi: np.ndarray
    rewards: np.ndarray
    observed: np.ndarray

    def as_lists(self) -> tuple[list, list, list, list]:
        """The wire form (a Ray call's arguments)."""
        return tuple(np.asarray(v).tolist() for v in (self.x, self.psi, self.rewards, self.observed))


class SlotRouter(Protocol):
    """Steps 2 and 6: every node's model for slot t (from ψ̂ under its budget); learning from the
    slot's feedback (only for the nodes served a merge: a fixed model has no x to learn about)."""

    def select_slot(self, t: int, psis: np.ndarray, budgets: Sequence[int]) -> list[Spec]: ...

    def update_slot(self, t: int, feedback: list[Feedback]) -> None: ...


class EdgeServing(Protocol):
    """Steps 3 and 4: get every node onto its model; serve every node's scored requests. `serve`
    returns per node (predictions, measured latency per request), the latency None where the loop
    models it (queueing over all the node's requests)."""

    def push(self, t: int, specs: list[Spec]) -> None: ...

    def serve(self, t: int, specs: list[Spec]) -> list[tuple[np.ndarray, np.ndarray | None]]: ...


class PolicyRouter:
    """A router policy in this process: one batched call per slot for the whole fleet."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def select_slot(self, t: int, psis: np.ndarray, budgets: Sequence[int]) -> list[Spec]:
        return [Spec.merged(x) for x in self.policy.select_many(psis, budgets)]

    def update_slot(self, t: int, feedback: list[Feedback]) -> None:
        if feedback:
            self.policy.update_many(*zip(*((f.x, f.psi, f.rewards, f.observed) for f in feedback)))


class FixedRouter:
    """A fixed serving mode as a router: the same model for every node and slot; nothing to learn."""

    def __init__(self, spec: Spec):
        self.spec = spec

    def select_slot(self, t: int, psis: np.ndarray, budgets: Sequence[int]) -> list[Spec]:
        return [self.spec] * len(budgets)

    def update_slot(self, t: int, feedback: list[Feedback]) -> None:
        pass


class LocalEdge:
    """Serving simulated in this process: nothing to push (the loop accounts the bytes); exact
    predictions of the scored sample from the cached evaluator, latency left to the loop's queueing
    model. A slot's requests run grouped by model, so nodes that hold the same merge share forward
    passes."""

    def __init__(self, sim):
        self.sim = sim

    def push(self, t: int, specs: list[Spec]) -> None:
        pass

    def serve(self, t: int, specs: list[Spec]) -> list[tuple[np.ndarray, None]]:
        return [(preds, None) for preds in self.sim.predict_slot(t, specs)]
