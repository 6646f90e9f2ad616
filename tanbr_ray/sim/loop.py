"""The slot loop: one code path for every policy.

Per slot, in order, each step one call:
  1. monitor   — each node's TaskMonitor estimates psi from the requests it saw in earlier slots
                 (`FleetMonitors`);
  2. select    — the router picks merging weights x for every node under its budget B in one call
                 (Tanbr: one shared bandit learns from every node's feedback);
  3. push      — a new x means pushing the merged FFN weights to the node (bytes / bandwidth, and the
                 edge's own push: the Ray backend's replicas acknowledge it). Merging is not a step of
                 its own: it happens where the weights are made, by the cluster's mergers while the
                 slot is decided, or locally by the evaluator just before a merge's rows run (a bounded
                 LRU of merged states, `evaluate.STATE_CACHE`);
  4. serve     — every node's requests run through its model: every request is served (it counts in
                 the queueing latency, and the monitor saw it), and a seeded sample of
                 `scored_per_slot` of them is scored exactly by the MoE (locally, each distinct merge
                 is made once and run over all its nodes' rows);
  5. reward    — per-task reward from the labelled share of the scored sample after the slot (or,
                 label free, agreement with the full MoE on it);
  6. update    — the router learns from the whole slot's feedback in one call.
Latency per request = its wait in the node's queue (dynamic batching, `sim/queueing.py`) + the batch's
service time (this host's measured batch latency for the node's model × the node's slowdown, + the
time to swap experts in from storage when the model does not fit the node's memory) + RTT.
"""

from __future__ import annotations

import hashlib
import json
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tanbr_ray.moe.data import NUM_LABELS, load_task, resolve_data_dir
from tanbr_ray.moe.infer import interleaved_latency, mode_forward
from tanbr_ray.moe.store import model_identity
from tanbr_ray.provenance import provenance
from tanbr_ray.router import Policy, TaskMonitor, registry
from tanbr_ray.simplex import psi_family, random_points
from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.evaluate import MemoMismatch, PoolEvaluator, Spec, check_for, merged_spec
from tanbr_ray.sim.fleet import Fleet, NodeClass, load_fleet
from tanbr_ray.sim.memo import DiskMemo
from tanbr_ray.sim.output import PolicySeries, SimOutput
from tanbr_ray.sim.queueing import interpolate_service, simulate_queue
from tanbr_ray.sim.workload import Workload, generate
from tanbr_ray.stats import loglog_slope, recovery_slots

STATIC_SPECS: dict[str, Spec] = {
    "Switch-top1": ("top1",), "Switch-top2": ("top2",), "Soft": ("soft",), "Oracle": ("oracle",),
    "Fisher": ("static", "fisher"), "RegMean": ("static", "regmean"),
}
SlotCallback = Callable[[str, int, float, float], None]
MODE_OF_SPEC = {"top1": "top1", "top2": "top2", "soft": "soft", "oracle": "oracle", "static": "merged", "merged": "merged"}


SERVICE_BATCHES = (1, 4, 16)
RECOVERY_TOLERANCE = 0.01  # after a mix change: back within 1 credit point of the gap to the oracle before it


@dataclass(frozen=True)
class Costs:
    """Measured on this host: batch compute per serving mode and size, and resident bytes per mode."""

    batch_ms: dict[str, list[float]]  # mode -> ms at SERVICE_BATCHES
    resident: dict[str, int]
    dense_bytes: int
    ffn_bytes: int  # what a weight push carries: the merged FFNs of the MoE layers

    @property
    def compute_ms(self) -> dict[str, float]:
        """Batch-1 compute per mode."""
        return {m: v[0] for m, v in self.batch_ms.items()}

    def swap_s(self, mode: str, node: NodeClass) -> float:
        """Per batch: reading the part of the model that does not fit the node's memory."""
        memory = node.memory_x_dense * self.dense_bytes
        return max(0, self.resident[mode] - memory) / (node.storage_mbps * 1e6 / 8)

    def service(self, mode: str, node: NodeClass) -> Callable[[int], float]:
        """Seconds to serve a batch of b requests of this mode on this node."""
        compute = interpolate_service(list(SERVICE_BATCHES), self.batch_ms[mode])
        swap = self.swap_s(mode, node)
        return lambda b: compute(b) * node.slowdown + swap


def measure_costs(moe, runs: int = 5, seq_len: int = 64, bf16: bool = False) -> Costs:
    """Batch latency of every serving mode at SERVICE_BATCHES, in the precision the nodes serve in,
    timed round-robin (a load change on a shared host then hits every mode alike)."""
    modes = ("merged", "oracle", "top1", "top2", "soft")
    fns = {(m, b): mode_forward(moe, m, b, seq_len, bf16=bf16) for m in modes for b in SERVICE_BATCHES}
    timed = interleaved_latency(fns, runs=runs)
    batch_ms = {m: [timed[(m, b)]["p50"] for b in SERVICE_BATCHES] for m in modes}
    resident = {m: int(moe.resident_bytes(m)) for m in modes}
    x = np.full(moe.num_experts, 1.0 / moe.num_experts)
    ffn = int(sum(t.numel() * t.element_size() for t in moe.merged_state(x, "linear").values()))
    return Costs(batch_ms, resident, resident["merged"], ffn)


_HOST_COSTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[bool, Costs]]" = weakref.WeakKeyDictionary()


def host_costs(moe, bf16: bool) -> Costs:
    """measure_costs once per model and precision in this process: every seed and policy of a run
    then queues on the same service times, so their latencies differ by their traffic, not by when
    the shared host happened to be busy (separate measurements of one model here varied up to 2.7×)."""
    per_model = _HOST_COSTS.setdefault(moe, {})
    if bf16 not in per_model:
        per_model[bf16] = measure_costs(moe, bf16=bf16)
    return per_model[bf16]


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
    """Steps 2 and 6 of a slot: x per node under its budget; learning from the slot's rewards."""

    def select_slot(self, t: int, psis: np.ndarray, budgets: Sequence[int]) -> np.ndarray: ...

    def update_slot(self, t: int, feedback: list[Feedback]) -> None: ...


class EdgeServing(Protocol):
    """Steps 3 and 4: get every node onto its model; serve every node's scored requests. `serve`
    returns per node (predictions, measured latency per request), the latency None where the loop
    models it (queueing over all the node's requests)."""

    def push(self, t: int, specs: list[Spec]) -> None: ...

    def serve(self, t: int, specs: list[Spec]) -> list[tuple[np.ndarray, np.ndarray | None]]: ...


class PolicyRouter:
    """A router policy in this process (the local backend): one batched call per slot for the fleet."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def select_slot(self, t: int, psis: np.ndarray, budgets: Sequence[int]) -> np.ndarray:
        return self.policy.select_many(psis, budgets)

    def update_slot(self, t: int, feedback: list[Feedback]) -> None:
        if feedback:
            self.policy.update_many(*zip(*((f.x, f.psi, f.rewards, f.observed) for f in feedback)))


class LocalEdge:
    """Serving simulated in this process: nothing to push (the loop accounts the bytes); exact
    predictions of the scored sample from the cached evaluator, latency left to the loop's queueing
    model. A slot's requests are run grouped by model, so nodes that hold the same merge share
    forward passes."""

    def __init__(self, sim: "Simulation"):
        self.sim = sim

    def push(self, t: int, specs: list[Spec]) -> None:
        pass

    def serve(self, t: int, specs: list[Spec]) -> list[tuple[np.ndarray, None]]:
        return [(preds, None) for preds in self.sim.predict_slot(t, specs)]


def make_policy(name: str, cfg: SimConfig, K: int, V: int, task_experts: np.ndarray, tasks: list[str]) -> Policy | None:
    """Router policies behind select/update; None for the fixed serving modes (Switch, Oracle, static merges)."""
    if name in STATIC_SPECS:
        return None
    return registry.make_policy(name, K, V, cfg.seed, cfg.tanbr, task_experts, tasks=tasks, random_points=cfg.random_points)


def class_weights(tasks: Sequence[str], data_dir: str | None) -> dict[str, np.ndarray]:
    """Credit per correct answer of each class, 1 / (C p_y) with p_y the class's share of the task's
    training labels: the expected credit of a policy is then its balanced accuracy (mean recall), and
    answering every request with the majority class earns 1/C, as MCC and F1 would have it, instead of
    the majority's share. Regression tasks (STS-B) have none."""
    out = {}
    for task in tasks:
        C = NUM_LABELS[task]
        if C < 2:
            continue
        counts = np.bincount(load_task(task, "train", data_dir).labels, minlength=C).astype(np.float64)
        out[task] = 1.0 / (C * (counts + 1.0) / (counts.sum() + C))  # add-one: no class weighs infinitely
    return out


class FleetMonitors:
    """Step 1: one TaskMonitor per node, fed every request (scored or not) the node served, so slot
    t's psi-hat comes from earlier slots only. Every policy sees the same traffic, so each slot's
    estimate is made once, by the first policy to reach it, and kept for the others."""

    def __init__(self, wl: Workload, tasks: list[str], cfg: SimConfig):
        self.wl = wl
        self.monitors = [TaskMonitor(tasks, cfg.tanbr.monitor) for _ in wl.requests[0]]
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


@dataclass(frozen=True)
class PolicyRun:
    """What one policy did over the run (the loop's record; `run_simulation` summarises it)."""

    node_credit: np.ndarray  # (slots, nodes) credit summed over each node-slot's scored sample
    node_counts: np.ndarray  # (slots, nodes) scored requests
    pushed: np.ndarray  # (slots,) bytes pushed
    choices: np.ndarray | None  # (slots, nodes, K) x per node-slot; None for fixed serving modes
    per_task: dict  # task -> (slots, examples, predictions) lists of the scored requests
    latency: np.ndarray  # (served requests,) ms, queue wait included
    latency_node: np.ndarray  # node of each latency
    dropped: np.ndarray  # (nodes,) requests dropped past the queue timeout
    backlog: np.ndarray  # (nodes,) requests unfinished at the end of the run
    mode: str
    push_seconds: float
    seconds: dict[str, np.ndarray]  # per slot, wall seconds of this process: decide, merge, score, total

    @property
    def seconds_split(self) -> dict[str, float]:
        """Wall seconds over the run: decide (select + update), merge, score, the rest, total."""
        out = {k: float(v.sum()) for k, v in self.seconds.items()}
        out["rest"] = out["total"] - out["decide"] - out["merge"] - out["score"]
        return out

    @property
    def credit(self) -> np.ndarray:
        return self.node_credit.sum(1)

    @property
    def counts(self) -> np.ndarray:
        return self.node_counts.sum(1)


class Simulation:
    """Holds what every policy shares: the pool cache, the workload, psi-hat, costs, labels."""

    def __init__(self, cfg: SimConfig, moe, fleet: Fleet | None = None, progress: bool = True,
                 memo: DiskMemo | None = None):
        self.cfg, self.moe, self.progress = cfg, moe, progress
        self.fleet = fleet or load_fleet(cfg.fleet)
        self.tasks = list(moe.tasks)
        self.fleet.check_model(moe.num_experts, self.tasks)
        self.nodes = self.fleet.nodes()
        self.K, self.V = moe.num_experts, len(self.tasks)
        self.task_experts = np.asarray([moe.expert_of[t] for t in self.tasks])
        # one pool for every seed (requests differ by seed, the examples they draw from do not), so
        # predictions memoised for one seed serve the next
        pool = {t: load_task(t, "dev", cfg.data_dir).head(cfg.pool_per_task, seed=0) for t in self.tasks}
        self.ev = PoolEvaluator(moe, pool, progress=progress, bf16=cfg.bf16, merge_operator=cfg.merge_operator,
                                memo=memo, check=check_for(cfg.bf16, cfg.seed))
        self.wl = generate(self.tasks, {t: len(pool[t]) for t in self.tasks}, [c.rate for _, c in self.nodes],
                           cfg.slot_seconds, cfg.slots, cfg.schedule, cfg.seed, cfg.switch_every,
                           [None if c.mix is None else np.asarray([c.mix.get(t, 0.0) for t in self.tasks])
                            for _, c in self.nodes], cfg.scored_per_slot)
        self.monitors = FleetMonitors(self.wl, self.tasks, cfg)
        rng = np.random.default_rng(cfg.seed + 1)
        self.labelled = [[rng.random(len(r.scored)) < cfg.label_fraction for r in slot] for slot in self.wl.requests]
        self.costs = host_costs(moe, cfg.bf16)
        self.class_weight = class_weights(self.tasks, cfg.data_dir) if cfg.credit == "balanced" else {}
        self._queues: dict[str, list] = {}  # mode -> queue_latency (same arrivals for every policy)

    # --- serving ---------------------------------------------------------------------------
    def rows(self, t: int, n: int) -> list[tuple[str, int]]:
        """Node n's scored slot-t requests as (task, pool example) rows."""
        req = self.wl.requests[t][n]
        return [(self.tasks[v], int(i)) for v, i in zip(req.scored_tasks, req.scored_examples)]

    def predict(self, spec: Spec, t: int, n: int) -> np.ndarray:
        """Predictions for node n's requests in slot t under a model spec (exact, memoised)."""
        return self.ev.predict_rows(spec, self.rows(t, n))

    def predict_slot(self, t: int, specs: Sequence[Spec]) -> list[np.ndarray]:
        """Every node's slot-t predictions, each distinct model run once over all its nodes' rows."""
        self.ev.prefetch([(spec, self.rows(t, n)) for n, spec in enumerate(specs)])
        return [self.predict(spec, t, n) for n, spec in enumerate(specs)]

    def credit(self, t: int, n: int, preds: np.ndarray) -> np.ndarray:
        """Per-request credit of these predictions for node n's requests in slot t (`row_credit`)."""
        return self.row_credit(self.rows(t, n), preds)

    def serve(self, spec: Spec, t: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        preds = self.predict(spec, t, n)
        return preds, self.credit(t, n, preds)

    def requests(self, t: int, n: int) -> list[tuple[str, str, str | None]]:
        """Node n's scored slot-t requests as they travel: (head, text_a, text_b), in arrival order."""
        req = self.wl.requests[t][n]
        return [(self.tasks[v], *self.ev.text(self.tasks[v], int(i))) for v, i in zip(req.scored_tasks, req.scored_examples)]

    def rewards(self, t: int, n: int, preds: np.ndarray, credit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-task reward on the scored sample and the observed mask: labelled accuracy, or
        agreement with the full MoE."""
        tasks = self.wl.requests[t][n].scored_tasks
        if self.cfg.label_free:
            reference = self.predict(("top2",), t, n)
            credit = (np.abs(preds - reference) < 1e-6).astype(np.float64)
            lab = np.ones(len(tasks), dtype=bool)
        else:
            lab = self.labelled[t][n]
        r, mask = np.zeros(self.V), np.zeros(self.V, dtype=bool)
        for v in range(self.V):
            sel = (tasks == v) & lab
            if sel.any():
                r[v], mask[v] = credit[sel].mean(), True
        return r, mask

    # --- one policy over the whole run ---------------------------------------------------------
    def run_policy(self, name: str, on_slot: SlotCallback | None = None, router: SlotRouter | None = None,
                   edge: EdgeServing | None = None) -> "PolicyRun":
        """Every slot of the run for one policy; `on_slot(name, t, slot_score, running_score)` after each.

        `router` (steps 2 and 6) and `edge` (steps 3 and 4) default to this process: the policy object
        and the cached evaluator with the latency model. The Ray backend passes the router actor and
        the Serve replicas instead; the loop, the workload and the scoring stay the same."""
        cfg, T, N = self.cfg, self.cfg.slots, len(self.nodes)
        self.ev.check.begin()  # the first disk-memo hits of every policy are recomputed and compared
        fixed = STATIC_SPECS.get(name)
        if router is None and fixed is None:
            router = PolicyRouter(make_policy(name, cfg, self.K, self.V, self.task_experts, self.tasks))
        if fixed is not None:
            router, edge = None, None  # full-MoE and static baselines: no router, served locally
        edge = edge or LocalEdge(self)
        mode = "merged" if router is not None else MODE_OF_SPEC[fixed[0]]
        budgets = [self.budget(cls) for _, cls in self.nodes]
        credit_sum, counts = np.zeros((T, N)), np.zeros((T, N))  # per node-slot: paired comparisons need them
        pushed = np.zeros(T)
        push_s = 0.0  # link time spent on weight pushes, summed over nodes
        choices = np.full((T, N, self.K), np.nan) if router is not None else None
        per_task = {task: ([], [], []) for task in self.tasks}  # slot, example, prediction
        measured: list[list[np.ndarray]] = [[] for _ in range(N)]  # edge-measured latency (Ray backend)
        current: list[Spec | None] = [None] * N
        seconds = {k: np.zeros(T) for k in ("decide", "merge", "score", "total")}
        for t in tqdm(range(T), desc=name, disable=not self.progress, leave=False):
            t_slot, merge0, run0 = time.perf_counter(), self.ev.merge_seconds, self.ev.run_seconds
            psis = self.monitors.psi(t)  # 1. monitor: each node's estimate from earlier slots only
            if router is not None:  # 2. select: x per node under its budget
                choices[t] = router.select_slot(t, psis, budgets)
                seconds["decide"][t] += time.perf_counter() - t_slot
                specs = [merged_spec(x) for x in choices[t]]
            else:
                specs = [fixed] * N
            nbytes, link_s = self.push_cost(current, specs, mode)  # 3. push
            pushed[t] += nbytes
            push_s += link_s
            edge.push(t, specs)
            served = edge.serve(t, specs)  # 4. serve (the scored sample exactly)
            scores = self.score_slot(t, [preds for preds, _ in served], rewards=router is not None)  # 5. reward
            for n, ((preds, lat), (credit, _)) in enumerate(zip(served, scores)):
                credit_sum[t, n], counts[t, n] = credit.sum(), len(credit)
                self._record(per_task, t, n, preds)
                if lat is not None:
                    measured[n].append(np.asarray(lat, dtype=np.float64))
            if router is not None:  # 6. update: the slot's rewards arrive after it
                t_update = time.perf_counter()
                router.update_slot(t, [Feedback(choices[t, n], psis[n], *rw) for n, (_, rw) in enumerate(scores)])
                seconds["decide"][t] += time.perf_counter() - t_update
            seconds["merge"][t] = self.ev.merge_seconds - merge0
            seconds["score"][t] = self.ev.run_seconds - run0 - seconds["merge"][t]
            seconds["total"][t] = time.perf_counter() - t_slot
            if on_slot is not None:
                on_slot(name, t, float(credit_sum[t].sum() / max(counts[t].sum(), 1)),
                        float(credit_sum[:t + 1].sum() / max(counts[:t + 1].sum(), 1)))
        latency = self.queue_latency(mode) if not any(measured) else [
            (np.concatenate(m) if m else np.zeros(0), np.zeros(0, dtype=bool), 0) for m in measured]
        return PolicyRun(
            node_credit=credit_sum, node_counts=counts, pushed=pushed, choices=choices, per_task=per_task,
            latency=np.concatenate([l for l, _, _ in latency]),
            latency_node=np.concatenate([np.full(len(l), n) for n, (l, _, _) in enumerate(latency)]),
            dropped=np.asarray([int(d.sum()) for _, d, _ in latency]),
            backlog=np.asarray([b for _, _, b in latency]), mode=mode, push_seconds=push_s, seconds=seconds)

    def push_cost(self, held: list[Spec | None], specs: list[Spec], mode: str) -> tuple[float, float]:
        """Step 3's bytes and link seconds over the fleet: a node whose model changes gets the whole
        model the first time, its merged FFNs after. `held` (each node's spec) is brought up to date."""
        nbytes = link_s = 0.0
        for n, (_, cls) in enumerate(self.nodes):
            if held[n] != specs[n]:
                b = self.costs.resident[mode] if held[n] is None else self.costs.ffn_bytes
                nbytes, link_s = nbytes + b, link_s + b / (cls.bandwidth_mbps * 1e6 / 8)
                held[n] = specs[n]
        return nbytes, link_s

    def score_slot(self, t: int, preds: list[np.ndarray], rewards: bool) -> list[tuple[np.ndarray, tuple | None]]:
        """Step 5, per node: the scored requests' credit and, for a router, its (per-task reward,
        observed mask)."""
        out = []
        for n, p in enumerate(preds):
            credit = self.credit(t, n, p)
            out.append((credit, self.rewards(t, n, p, credit) if rewards else None))
        return out

    def _record(self, per_task: dict, t: int, n: int, preds: np.ndarray) -> None:
        """Keep node n's slot-t predictions by task, for the GLUE metrics of the run."""
        req = self.wl.requests[t][n]
        for v, task in enumerate(self.tasks):
            sel = req.scored_tasks == v
            per_task[task][0].append(np.full(sel.sum(), t))
            per_task[task][1].append(req.scored_examples[sel])
            per_task[task][2].append(preds[sel])

    def budget(self, cls: NodeClass) -> int:
        """B at a node: the class's, or K (the router merges centrally and pushes one FFN, so B limits
        nothing unless a node merges from resident experts itself)."""
        return self.K if cls.budget is None else cls.budget

    def queue_latency(self, mode: str) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Per node, over the whole run: (latency ms of served requests, dropped mask, backlog at the
        end) of all its requests, scored or not, through its queue. It depends only on the serving
        mode (every policy sees the same arrivals), so it is computed once per mode."""
        if mode in self._queues:
            return self._queues[mode]
        out = []
        for n, (_, cls) in enumerate(self.nodes):
            arrivals = np.concatenate([t * self.cfg.slot_seconds + self.wl.requests[t][n].arrivals
                                       for t in range(self.cfg.slots)])
            q = simulate_queue(arrivals, self.costs.service(mode, cls), self.cfg.queue,
                               end_s=self.cfg.slots * self.cfg.slot_seconds)
            out.append((q.latency_s[~q.dropped] * 1e3 + cls.rtt_ms, q.dropped, q.backlog_end))
        self._queues[mode] = out
        return out

    def fixed_candidates(self, n: int) -> list[np.ndarray]:
        """Fixed x tried for node n's best-in-hindsight, all under its budget: the ψ-family on the
        node's true average mix (x ∝ mass^p, top-B, p in PSI_POWERS; p = 1 is ψ-merge), Uniform,
        each expert alone that serves at least 5 % of its requests, and `fixed_candidates` random
        points of X: the first of the points Random plays (`simplex.random_points`, seeded by budget
        alone), so nodes of one budget, every seed and Random share them and their predictions."""
        budget = self.budget(self.nodes[n][1])
        mix = self.wl.psi[:, n].mean(0)
        mass = np.bincount(self.task_experts, weights=mix, minlength=self.K)
        xs = list(psi_family(mass, budget).values())
        xs.append(registry.make_policy("Uniform", self.K, self.V, task_experts=self.task_experts).select(mix, budget))
        xs += [np.eye(self.K)[k] for k in np.flatnonzero(mass >= 0.05)]
        xs += list(random_points(self.K, budget, self.cfg.fixed_candidates))
        return list({x.tobytes(): x for x in xs}.values())

    def selection_rows(self) -> dict[str, list[tuple[str, int]]]:
        """Per task, the pool examples every fixed candidate is scored on (`regret_sample` of them,
        0 = the whole pool): one seeded draw, the same for every node, candidate and seed."""
        out = {}
        for v, task in enumerate(self.tasks):
            size = len(self.ev.labels[task])
            k = size if self.cfg.regret_sample == 0 else min(self.cfg.regret_sample, size)
            out[task] = [(task, int(i)) for i in np.sort(np.random.default_rng([3, v]).permutation(size)[:k])]
        return out

    def best_fixed_credit(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per-slot credit of the best fixed x in hindsight, one per node (each node has its own mix
        and budget), and each node's winner. Two stages, so the winner is the best in hindsight and
        not merely the luckiest on a small sample: every candidate is screened once per task on
        `selection_rows` (a node's estimate weighs those task means by the node's own request count
        of each task over the run, the same examples for every candidate, so the ranking is paired);
        the node's `regret_finalists` best are then scored on all the node's requests, and the one
        with the most credit there is the comparator. Candidates several nodes share (the random
        points, each expert alone) are screened once."""
        self.ev.check.begin()
        select = self.selection_rows()
        plans = []  # (node, all its rows, its candidate specs, its request count per task)
        for n in range(len(self.nodes)):
            rows = [r for t in range(self.cfg.slots) for r in self.rows(t, n)]
            if not rows:
                continue
            counts = np.asarray([sum(task == t for t, _ in rows) for task in self.tasks], dtype=np.float64)
            plans.append((n, rows, [merged_spec(x) for x in self.fixed_candidates(n)], counts))
        specs = list(dict.fromkeys(spec for _, _, cands, _ in plans for spec in cands))
        sel_rows = [r for task in self.tasks for r in select[task]]
        task_of = np.asarray([self.tasks.index(t) for t, _ in sel_rows])
        table = {}  # spec -> mean credit per task on the selection rows
        for spec in tqdm(specs, desc="best fixed x: screen", disable=not self.progress, leave=False):
            credit = self.row_credit(sel_rows, self.ev.predict_rows(spec, sel_rows))
            table[spec] = np.asarray([credit[task_of == v].mean() for v in range(self.V)])
        finalists = {n: sorted(cands, key=lambda spec: -float(table[spec] @ counts))[:self.cfg.regret_finalists]
                     for n, _, cands, counts in plans}  # stable: ties keep the candidate order
        self.ev.prefetch([(spec, rows) for n, rows, _, _ in plans for spec in finalists[n]],
                         desc="best fixed x: finalists" if self.progress else None)
        out, winners = np.zeros(self.cfg.slots), {}
        for n, _, _, _ in plans:
            per_slot = {spec: np.asarray([self.serve(spec, t, n)[1].sum() for t in range(self.cfg.slots)])
                        for spec in finalists[n]}
            best = max(finalists[n], key=lambda spec: float(per_slot[spec].sum()))
            out += per_slot[best]
            winners[self.nodes[n][0]] = np.frombuffer(best[1], dtype=np.float64).copy()
        return out, winners

    def task_metric(self, task: str, indices: np.ndarray, preds: np.ndarray) -> float:
        """The task's GLUE metric over scored requests; STS-B as its mean per-request credit (see
        `glue_note` in the summary)."""
        if task == "STS-B":
            return float(self.ev.credit(task, indices, preds).mean())
        return self.ev.glue(task, indices, preds)

    def monitor_error(self) -> dict[str, float]:
        """Mean total-variation distance between ψ̂ and the true mix, second half, per node class."""
        half = self.cfg.slots // 2
        tv = 0.5 * np.abs(self.monitors.all()[half:] - self.wl.psi[half:]).sum(-1)  # (slots, nodes)
        out = {}
        for cls in dict.fromkeys(c.name for _, c in self.nodes):
            idx = [n for n, (_, c) in enumerate(self.nodes) if c.name == cls]
            out[cls] = float(tv[:, idx].mean())
        out["fleet"] = float(tv.mean())
        return out

    def row_credit(self, rows: Sequence[tuple[str, int]], preds: np.ndarray) -> np.ndarray:
        """Per-request credit of predictions for (task, example) rows: 1 per correct class (times the
        class's weight under `credit: balanced`), 1 - |error|/5 for STS-B."""
        tasks = np.asarray([t for t, _ in rows])
        idx = np.asarray([i for _, i in rows], dtype=np.int64)
        credit = np.zeros(len(rows))
        for task in set(tasks.tolist()):
            sel = tasks == task
            credit[sel] = self.ev.credit(task, idx[sel], preds[sel])
            if task in self.class_weight:
                credit[sel] *= self.class_weight[task][self.ev.labels[task][idx[sel]].astype(np.int64)]
        return credit


def _p50_by_class(latency: np.ndarray, node: np.ndarray, nodes) -> dict[str, float]:
    """Median request latency per node class (where the full MoE fits and where it must swap)."""
    out = {}
    for cls in dict.fromkeys(c.name for _, c in nodes):
        sel = np.isin(node, [n for n, (_, c) in enumerate(nodes) if c.name == cls])
        if sel.any():
            out[cls] = float(np.percentile(latency[sel], 50))
    return out


Backend = Callable[["Simulation", str], "tuple[SlotRouter | None, EdgeServing | None]"]


NOT_RESULT_KEYS = ("name", "out", "wandb", "data_dir", "models_dir")  # where things live, not what is measured


def run_identity(cfg: SimConfig, model: dict, data: dict) -> dict:
    """The model and data a run measured, and a fingerprint of them with its config: runs with the
    same fingerprint scored the same requests of the same examples on the same model, so their
    figures compare (and, seed for seed, repeat)."""
    what = {"model": model["weights_sha256"], "pool": data["pool_sha256"], "labels": data["labels_sha256"],
            "config": {k: v for k, v in cfg.model_dump().items() if k not in NOT_RESULT_KEYS}}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return {"model": model, "data": data, "fingerprint": digest[:16]}


def _play(cfg: SimConfig, moe, fleet, progress, on_slot, backend, memo):
    """Every policy, then the best fixed x in hindsight: (sim, runs, best, phase seconds)."""
    t0 = time.perf_counter()
    sim = Simulation(cfg, moe, fleet, progress, memo)
    phases = {"setup": time.perf_counter() - t0}  # pool cache, workload, measured costs
    runs = {}
    for name in tqdm(cfg.policies, desc="policies", disable=not progress):
        router, edge = backend(sim, name) if backend is not None else (None, None)
        runs[name] = sim.run_policy(name, on_slot, router, edge)
    phases["policies"] = time.perf_counter() - t0 - phases["setup"]
    best = sim.best_fixed_credit()
    phases["best_fixed"] = time.perf_counter() - t0 - phases["setup"] - phases["policies"]
    return sim, runs, best, phases


def run_simulation(cfg: SimConfig, moe, fleet: Fleet | None = None, progress: bool = True,
                   on_slot: SlotCallback | None = None, backend: Backend | None = None,
                   memo_dir: str | Path | None = None) -> SimOutput:
    """Run every configured policy over the same workload; return traces and the results summary.

    `on_slot(policy, slot, slot_score, running_score)` is called after every slot (Tune reports
    through it, so schedulers can stop bad trials early). `backend(sim, policy)` gives the router and
    edge a policy runs on (None, None = this process); the Ray backend passes the cluster's.
    `memo_dir` (a folder for this model's weights) keeps exact predictions across runs and seeds; if
    a recomputed sample of its hits disagrees, the file is refused and the run starts over without it."""
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    memo = None
    if memo_dir is not None:
        memo = DiskMemo(memo_dir, cfg.merge_operator or moe.merge_operator, "bf16" if cfg.bf16 else "fp32")
    try:
        sim, runs, (best_credit, best_x), phases = _play(cfg, moe, fleet, progress, on_slot, backend, memo)
    except MemoMismatch as e:
        memo.refuse(str(e))
        sim, runs, (best_credit, best_x), phases = _play(cfg, moe, fleet, progress, on_slot, backend, memo)
    counts = next(iter(runs.values())).counts
    safe = np.maximum(counts, 1)
    oracle_credit = runs["Oracle"].credit if "Oracle" in runs else sim.run_policy("Oracle").credit
    half = cfg.slots // 2
    summary = {"policies": {}}
    series = {}
    for name, r in runs.items():
        glue, glue2 = {}, {}
        for task, (slot_l, ex_l, pred_l) in r.per_task.items():
            slot, ex, pred = (np.concatenate(a) if a else np.zeros(0) for a in (slot_l, ex_l, pred_l))
            ex = ex.astype(np.int64)
            late = slot >= half
            if len(ex):
                glue[task] = sim.task_metric(task, ex, pred)
            if late.any():
                glue2[task] = sim.task_metric(task, ex[late], pred[late])
        reg_fixed = (best_credit - r.credit) / safe
        reg_oracle = (oracle_credit - r.credit) / safe
        resident = {node: int(sim.costs.resident[r.mode]) for node, _ in sim.nodes}
        lat = r.latency
        summary["policies"][name] = {
            "credit": float(r.credit.sum() / max(r.counts.sum(), 1)),
            "credit_second_half": float(r.credit[half:].sum() / max(r.counts[half:].sum(), 1)),
            "score": float(np.mean(list(glue.values()))) if glue else float("nan"),
            "score_second_half": float(np.mean(list(glue2.values()))) if glue2 else float("nan"),
            "scores": glue,
            "scores_second_half": glue2,
            "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "latency_ms_p95": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
            "latency_ms_p50_by_class": _p50_by_class(lat, r.latency_node, sim.nodes),
            "dropped_requests": int(r.dropped.sum()),
            "backlog_end": int(r.backlog.sum()),
            "resident_bytes": int(max(resident.values())),
            "pushed_bytes": int(r.pushed.sum()),
            "pushed_bytes_per_slot": float(r.pushed.mean()),
            "push_seconds": float(r.push_seconds),
            "wall_seconds_split": r.seconds_split,
            "regret_vs_best_fixed": float(reg_fixed.sum()),
            "regret_vs_oracle": float(reg_oracle.sum()),
            "regret_slope": loglog_slope(np.cumsum(reg_fixed), start_frac=0.5),
            "recovery_slots": [recovery_slots(reg_oracle, c, max(3, cfg.slots // 10), RECOVERY_TOLERANCE)
                               for c in sim.wl.mix_changes],
        }
        series[name] = PolicySeries(name, r.credit / safe, reg_fixed, reg_oracle, r.pushed, r.choices,
                                    r.latency, resident, r.node_credit, r.node_counts)
    if memo is not None:
        memo.save()
    wall = time.perf_counter() - t0
    total, scored = sim.wl.total_requests, sim.wl.scored_requests
    summary.update({
        "headline": "credit_second_half: per-request accuracy credit (STS-B: 1 - |error|/5) over the scored "
                    "sample of the second half of the run",
        "glue_note": "score / scores: GLUE metrics over the scored sample, except STS-B, which enters as its "
                     "per-request credit (a correlation pooled over the many models a merging policy plays "
                     "measures their disagreement, not their accuracy)",
        "requests": int(total),
        "requests_simulated": int(total * len(runs)),
        "scored_requests": int(scored * len(runs)),
        "scored_per_slot": cfg.scored_per_slot,
        "scored_requests_per_second": scored * len(runs) / wall,
        "model_forwards": int(sim.ev.forwards),
        "memo_hits": int(sim.ev.disk_hits),
        "memo": None if memo is None else {"file": str(memo.path), "hits": int(sim.ev.disk_hits),
                                           "verified": int(sim.ev.check.checked), "refused": memo.refused},
        **run_identity(cfg, model_identity(moe), {"source": str(resolve_data_dir(cfg.data_dir) or "hub"),
                                                   "split": "dev", "pool_seed": 0, **sim.ev.data_identity()}),
        "padded_tokens_per_real": sim.ev.padded_tokens / max(sim.ev.real_tokens, 1),
        "wall_seconds": wall,
        "wall_seconds_phases": phases,
        "requests_per_second": total * len(runs) / wall,
        "slots": cfg.slots,
        "nodes": {node: cls.name for node, cls in sim.nodes},
        "tasks": sim.tasks,
        "full_moe_bytes": int(sim.costs.resident["top2"]),
        "dense_bytes": int(sim.costs.dense_bytes),
        "compute_ms_batch1": sim.costs.compute_ms,
        "batch_ms": {m: dict(zip(map(str, SERVICE_BATCHES), v)) for m, v in sim.costs.batch_ms.items()},
        "monitor_error_tv": sim.monitor_error(),
        "best_fixed_x": {node: x.round(6).tolist() for node, x in best_x.items()},
        "provenance": provenance(wall, cfg.bf16),
    })
    return SimOutput(summary, series, sim.tasks, [f"expert:{t}" for t in sim.tasks], [n for n, _ in sim.nodes],
                     {n: c.name for n, c in sim.nodes}, sim.wl.mix_changes, cfg.slot_seconds,
                     cfg.model_dump(), sim.wl.psi)
