"""What the slot loop hands to the results writer and the W&B logger.

Kept as plain dataclasses (numpy inside, no Ray, no matplotlib) so the loop, the report and the
tracking code can evolve independently and tests can build a synthetic output in a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

@dataclass(frozen=True)
class PolicyResult:
    """One policy's figures over a run (fractions; latency in ms; the regrets summed over slots)."""

    credit: float
    credit_second_half: float
    score: float
    score_second_half: float
    scores: dict[str, float]
    scores_second_half: dict[str, float]
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p50_by_class: dict[str, float]
    dropped_requests: int
    backlog_end: int
    resident_bytes: int
    pushed_bytes: int
    pushed_bytes_per_slot: float
    push_seconds: float
    wall_seconds_split: dict[str, float]
    regret_vs_best_fixed: float
    regret_vs_oracle: float
    regret_slope: float | None
    recovery_slots: list



@dataclass
class PolicySeries:
    """Per-slot traces of one policy over the run.

    `choices` is None for policies that never merge (Switch, Oracle, Fisher, RegMean): they have no
    per-slot merging weight to plot.
    """

    name: str
    score: np.ndarray  # (slots,) fleet-wide score of the slot, fraction in [0, 1]
    regret_best_fixed: np.ndarray  # (slots,) per-slot regret vs the best fixed x in hindsight
    regret_oracle: np.ndarray  # (slots,) per-slot regret vs task-oracle routing
    pushed_bytes: np.ndarray  # (slots,) bytes pushed to the fleet in that slot
    choices: np.ndarray | None  # (slots, nodes, K) merging weights per node, or None
    latency_ms: np.ndarray  # (requests,) every request's latency
    resident_bytes: dict[str, int] = field(default_factory=dict)  # node -> resident model bytes
    node_credit: np.ndarray | None = None  # (slots, nodes) credit summed over the scored sample
    node_counts: np.ndarray | None = None  # (slots, nodes) scored requests

    @property
    def slots(self) -> int:
        return int(np.asarray(self.score).shape[0])

    @property
    def merges(self) -> bool:
        return self.choices is not None


@dataclass(frozen=True)
class Phases:
    """Seconds of a run's parts: setup (pool cache, workload, costs), the policies, the comparator."""

    setup: float
    policies: float
    best_fixed: float


@dataclass(frozen=True)
class SeedCredits:
    credit_second_half: list[float]  # one per seed
    credit_second_half_mean: float
    credit_second_half_sd: float  # ddof 1; 0 for one seed


@dataclass(frozen=True)
class SeedsSummary:
    list: list[int]
    policies: dict[str, SeedCredits]


@dataclass(frozen=True)
class PairedDiff:
    """Tanbr − a baseline in second-half credit (fractions), paired over the same node-slots."""

    diff_mean: float
    ci95: list[float]
    per_seed: list[float]
    ci95_t_over_seeds: list[float] | None
    method: str


@dataclass
class SimOutput:
    """Everything one `tanbr simulate` run produced; `summary` is the results.json content."""

    summary: dict
    series: dict[str, PolicySeries]
    tasks: list[str]
    experts: list[str]  # K expert labels
    nodes: list[str]  # node names, in the order of the choices' node axis
    node_classes: dict[str, str]  # node name -> class name
    mix_changes: list[int]  # slots where the task mix switches abruptly
    slot_seconds: float
    config: dict  # the simulation config as a JSON-able dict
    true_mix: np.ndarray | None = None  # (slots, nodes, V) each node's true task mix
    records: dict[str, PolicyResult] = field(default_factory=dict)  # the typed form of summary["policies"]
    phases: Phases | None = None  # of summary["wall_seconds_phases"]
    seeds: SeedsSummary | None = None  # of summary["seeds"] (first seed's output of a multi-seed run)
    paired: dict[str, PairedDiff] = field(default_factory=dict)  # of summary["paired"]
