"""Per-node request streams: task mixes over time, Poisson arrivals, requests drawn from GLUE dev.

A request carries its text (a pool example), the output head it asks for and its arrival time; its
true task is kept only for scoring. A node-slot holds rate × slot length requests (Poisson): all of
them are served (they count in the queueing latency and the monitor sees every one), and a seeded
sample of `scored_per_slot` of them is scored exactly by running the MoE — it gives the rewards and
the accuracy estimate. Unscored requests count in latency and the monitor, not in accuracy. Every node serves one or two applications most of the time, so its mixes are drawn
from Dirichlet(0.3) (concentrated). Schedules: ``stationary`` (one mix per node), ``drifting``
(linear interpolation between two mixes over the run), ``switching`` (a new mix every
`switch_every` slots, abruptly) and ``diurnal`` (a day/night sinusoid between two mixes).
Everything is drawn from one seeded generator, so every policy sees exactly the same requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tanbr_ray.simplex import MIX_CONCENTRATION

SCHEDULES = ("stationary", "drifting", "switching", "diurnal")


@dataclass
class SlotRequests:
    """One node's requests in one slot, and the sample of them that is scored exactly."""

    tasks: np.ndarray     # (n,) task index per request (hidden from the router)
    examples: np.ndarray  # (n,) pool example index within its task
    heads: list[str]      # output head each request asks for (what the monitor sees)
    arrivals: np.ndarray  # (n,) seconds since the slot began, ascending (Poisson process)
    scored: np.ndarray    # (k,) indices of the exactly scored requests, ascending (k ≤ scored_per_slot)

    @property
    def scored_tasks(self) -> np.ndarray:
        return self.tasks[self.scored]

    @property
    def scored_examples(self) -> np.ndarray:
        return self.examples[self.scored]


@dataclass
class Workload:
    psi: np.ndarray                 # (slots, nodes, V) true task mix
    requests: list[list[SlotRequests]]  # [slot][node]
    mix_changes: list[int]          # slots where a mix switches abruptly

    @property
    def total_requests(self) -> int:
        return sum(len(r.tasks) for slot in self.requests for r in slot)

    @property
    def scored_requests(self) -> int:
        return sum(len(r.scored) for slot in self.requests for r in slot)


def mixes(schedule: str, slots: int, nodes: int, num_tasks: int, rng: np.random.Generator,
          switch_every: int, fixed: list[np.ndarray | None] | None = None) -> tuple[np.ndarray, list[int]]:
    """(slots, nodes, V) true mixes; `fixed[n]`, when given, is node n's mix before any change."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: unknown {schedule!r}; choose from {', '.join(SCHEDULES)}")
    anchors = rng.dirichlet(np.full(num_tasks, MIX_CONCENTRATION), size=(max(2, slots // max(switch_every, 1) + 2), nodes))
    for n, mix in enumerate(fixed or []):
        if mix is not None:
            anchors[0, n] = mix
    t = np.arange(slots)[:, None, None]
    if schedule == "stationary":
        psi, changes = np.repeat(anchors[:1], slots, axis=0), []
    elif schedule == "switching":
        psi = anchors[np.arange(slots) // switch_every]
        changes = list(range(switch_every, slots, switch_every))
    elif schedule == "drifting":
        frac = t / max(slots - 1, 1)
        psi, changes = (1 - frac) * anchors[0][None] + frac * anchors[1][None], []
    else:  # diurnal: one "day" every switch_every slots
        w = 0.5 * (1 + np.sin(2 * np.pi * t / switch_every))
        psi, changes = (1 - w) * anchors[0][None] + w * anchors[1][None], []
    return psi / psi.sum(-1, keepdims=True), changes


def generate(tasks: list[str], pool_sizes: dict[str, int], rates: list[float], slot_seconds: float,
             slots: int, schedule: str, seed: int, switch_every: int | None = None,
             fixed: list[np.ndarray | None] | None = None, scored_per_slot: int = 32) -> Workload:
    """All requests of the run, per slot and node (seeded). The scored sample has its own generator,
    so its size changes which requests are scored, never which requests arrive."""
    if slot_seconds <= 0:
        raise ValueError(f"slot_seconds: must be > 0, got {slot_seconds}")
    if slots < 1:
        raise ValueError(f"slots: must be >= 1, got {slots}")
    if scored_per_slot < 1:
        raise ValueError(f"scored_per_slot: must be >= 1, got {scored_per_slot}")
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"rate: every node needs a request rate > 0, got {rates}")
    rng = np.random.default_rng(seed)
    sample_rng = np.random.default_rng([seed, 7])
    switch_every = switch_every or max(1, slots // 3)
    psi, changes = mixes(schedule, slots, len(rates), len(tasks), rng, switch_every, fixed)
    requests = []
    for t in range(slots):
        row = []
        for n, rate in enumerate(rates):
            count = int(rng.poisson(rate * slot_seconds))
            task_ids = rng.choice(len(tasks), size=count, p=psi[t, n])
            examples = np.asarray([rng.integers(pool_sizes[tasks[v]]) for v in task_ids], dtype=np.int64)
            arrivals = np.sort(rng.uniform(0.0, slot_seconds, size=count))
            scored = np.sort(sample_rng.choice(count, size=min(scored_per_slot, count), replace=False))
            row.append(SlotRequests(task_ids, examples, [tasks[v] for v in task_ids], arrivals, scored.astype(np.int64)))
        requests.append(row)
    return Workload(psi, requests, changes)
