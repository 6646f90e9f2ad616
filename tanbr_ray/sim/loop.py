"""The slot loop: one code path for every policy.

Per slot, in order, each step one call:
  1. monitor   — each node's TaskMonitor estimates ψ̂ from the requests it saw in earlier slots
                 (`monitors.FleetMonitors`);
  2. select    — the router picks every node's model under its budget B in one call (Tanbr: one
                 shared bandit learns from every node's feedback; a fixed serving mode is a router
                 that always picks the same model, `roles.FixedRouter`);
  3. push      — a new model means pushing weights to the node (bytes / bandwidth, `costs.Costs.push`;
                 the Ray backend's replicas acknowledge it). Merging happens where the weights are
                 made: by the cluster's mergers while the slot is decided, or by the evaluator just
                 before a merge's rows run;
  4. serve     — every node's requests run through its model: every request is served (it counts in
                 the queueing latency, and the monitor saw it), and a seeded sample of
                 `scored_per_slot` of them is scored exactly by the MoE (each distinct model once
                 over all its nodes' rows);
  5. reward    — per-task reward from the labelled share of the scored sample after the slot (or,
                 label free, agreement with the full MoE on it);
  6. update    — the router learns from the whole slot's feedback in one call.
Latency per request = its wait in the node's queue (dynamic batching, `sim/queueing.py`) + the batch's
service time (`costs.Costs.service`) + RTT. After every policy, the best fixed x in hindsight
(`comparator`) and the summary (`summary`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tanbr_ray.moe.data import load_task
from tanbr_ray.router import registry
from tanbr_ray.sim.comparator import best_fixed_credit
from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.costs import host_costs
from tanbr_ray.sim.credit import Credit, class_weights
from tanbr_ray.sim.evaluate import MemoMismatch, PoolEvaluator, check_for
from tanbr_ray.sim.fleet import Fleet, NodeClass, load_fleet
from tanbr_ray.sim.memo import DiskMemo
from tanbr_ray.sim.monitors import FleetMonitors
from tanbr_ray.sim.output import SimOutput
from tanbr_ray.sim.roles import EdgeServing, Feedback, FixedRouter, LocalEdge, PolicyRouter, SlotRouter
from tanbr_ray.sim.spec import Spec
from tanbr_ray.sim.summary import summarise
from tanbr_ray.sim.workload import generate

SlotCallback = Callable[[str, int, float, float], None]
Backend = Callable[["Simulation", str], "tuple[SlotRouter | None, EdgeServing | None]"]


@dataclass(frozen=True)
class PolicyRun:
    """What one policy did over the run (the loop's record; `summary` turns it into results)."""

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
    """Holds what every policy shares: the pool cache, the workload, ψ̂, costs, labels."""

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
        self.monitors = FleetMonitors(self.wl, self.tasks, cfg.tanbr.monitor)
        rng = np.random.default_rng(cfg.seed + 1)
        self.labelled = [[rng.random(len(r.scored)) < cfg.label_fraction for r in slot] for slot in self.wl.requests]
        self.costs = host_costs(moe, cfg.bf16, cfg.calibration, cfg.queue.max_batch, cfg.data_dir)
        self.credit_of = Credit(self.ev, class_weights(self.tasks, cfg.data_dir) if cfg.credit == "balanced" else {})
        self._queues: dict[str, list] = {}  # mode -> per-node queue results (same arrivals for every policy)

    # --- serving ---------------------------------------------------------------------------
    def rows(self, t: int, n: int) -> list[tuple[str, int]]:
        """Node n's scored slot-t requests as (task, pool example) rows."""
        req = self.wl.requests[t][n]
        return [(self.tasks[v], int(i)) for v, i in zip(req.scored_tasks, req.scored_examples)]

    def predict_slot(self, t: int, specs: Sequence[Spec]) -> list[np.ndarray]:
        """Every node's slot-t predictions, each distinct model run once over all its nodes' rows."""
        self.ev.prefetch([(spec, self.rows(t, n)) for n, spec in enumerate(specs)])
        return [self.ev.predict_rows(spec, self.rows(t, n)) for n, spec in enumerate(specs)]

    def row_credit(self, rows: Sequence[tuple[str, int]], preds: np.ndarray) -> np.ndarray:
        return self.credit_of.rows(rows, preds)

    def serve(self, spec: Spec, t: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Node n's slot-t predictions under `spec` and their per-request credit."""
        preds = self.ev.predict_rows(spec, self.rows(t, n))
        return preds, self.row_credit(self.rows(t, n), preds)

    def requests(self, t: int, n: int) -> list[tuple[str, str, str | None]]:
        """Node n's scored slot-t requests as they travel: (head, text_a, text_b), in arrival order."""
        return [(task, *self.ev.text(task, i)) for task, i in self.rows(t, n)]

    def rewards(self, t: int, n: int, preds: np.ndarray, credit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Step 5: per-task reward on the scored sample and the observed mask (labelled accuracy, or
        agreement with the full MoE)."""
        tasks = self.wl.requests[t][n].scored_tasks
        if self.cfg.label_free:
            reference = self.ev.predict_rows(Spec("top2"), self.rows(t, n))
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

    def budget(self, cls: NodeClass) -> int:
        """B at a node: the class's, or K (the router merges centrally and pushes one FFN, so B limits
        nothing unless a node merges from resident experts itself)."""
        return self.K if cls.budget is None else cls.budget

    def router_for(self, name: str) -> SlotRouter:
        """The policy as a router in this process: its policy object, or a fixed serving mode."""
        info = registry.info(name, "simulation")
        if not info.picks_x:
            return FixedRouter(Spec.of(info.serving))
        return PolicyRouter(registry.make_policy(name, self.K, self.V, self.cfg.seed, self.cfg.tanbr, self.task_experts,
                                                 tasks=self.tasks, random_points=self.cfg.random_points))

    def queue_latency(self, mode: str) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Per node (latency ms, dropped mask, backlog) of all its requests through its queue; it
        depends only on the serving mode (every policy sees the same arrivals), so it is made once."""
        if mode not in self._queues:
            arrivals = [np.concatenate([t * self.cfg.slot_seconds + self.wl.requests[t][n].arrivals
                                        for t in range(self.cfg.slots)]) for n in range(len(self.nodes))]
            self._queues[mode] = self.costs.queue(self.nodes, arrivals, mode, self.cfg.queue,
                                                  self.cfg.slots * self.cfg.slot_seconds)
        return self._queues[mode]

    # --- one policy over the whole run ---------------------------------------------------------
    def run_policy(self, name: str, on_slot: SlotCallback | None = None, router: SlotRouter | None = None,
                   edge: EdgeServing | None = None) -> PolicyRun:
        """Every slot of the run for one policy; `on_slot(name, t, slot_score, running_score)` after each.
        `router` (steps 2 and 6) and `edge` (steps 3 and 4) default to this process."""
        router, edge = router or self.router_for(name), edge or LocalEdge(self)
        T, N = self.cfg.slots, len(self.nodes)
        self.ev.check.begin()  # the first disk-memo hits of every policy are recomputed and compared
        budgets = [self.budget(cls) for _, cls in self.nodes]
        credit_sum, counts, pushed = np.zeros((T, N)), np.zeros((T, N)), np.zeros(T)  # per node-slot: paired
        choices, push_s, mode = np.full((T, N, self.K), np.nan), 0.0, None
        per_task = {task: ([], [], []) for task in self.tasks}  # slot, example, prediction
        measured: list[list[np.ndarray]] = [[] for _ in range(N)]  # edge-measured latency (Ray backend)
        held: list[Spec | None] = [None] * N
        seconds = {k: np.zeros(T) for k in ("decide", "merge", "score", "total")}
        for t in tqdm(range(T), desc=name, disable=not self.progress, leave=False):
            t_slot, merge0, run0 = time.perf_counter(), self.ev.merge_seconds, self.ev.run_seconds
            psis = self.monitors.psi(t)  # 1. monitor: each node's estimate from earlier slots only
            specs = router.select_slot(t, psis, budgets)  # 2. select
            seconds["decide"][t] += time.perf_counter() - t_slot
            mode = mode or specs[0].mode
            choices[t] = [s.x if s.kind == "merged" else np.full(self.K, np.nan) for s in specs]
            nbytes, link_s = self.costs.push(self.nodes, held, specs, mode)  # 3. push
            pushed[t], push_s = pushed[t] + nbytes, push_s + link_s
            edge.push(t, specs)
            served = edge.serve(t, specs)  # 4. serve (the scored sample exactly)
            feedback = []
            for n, (preds, lat) in enumerate(served):
                credit = self.row_credit(self.rows(t, n), preds)
                credit_sum[t, n], counts[t, n] = credit.sum(), len(credit)
                self._record(per_task, t, n, preds)
                if lat is not None:
                    measured[n].append(np.asarray(lat, dtype=np.float64))
                if specs[n].kind == "merged":  # 5. reward: a merge's x learns from it
                    feedback.append(Feedback(choices[t, n], psis[n], *self.rewards(t, n, preds, credit)))
            t_update = time.perf_counter()
            router.update_slot(t, feedback)  # 6. update: the slot's rewards arrive after it
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
            node_credit=credit_sum, node_counts=counts, pushed=pushed, per_task=per_task,
            choices=None if np.isnan(choices).all() else choices,
            latency=np.concatenate([l for l, _, _ in latency]),
            latency_node=np.concatenate([np.full(len(l), n) for n, (l, _, _) in enumerate(latency)]),
            dropped=np.asarray([int(d.sum()) for _, d, _ in latency]),
            backlog=np.asarray([b for _, _, b in latency]), mode=mode, push_seconds=push_s, seconds=seconds)

    def _record(self, per_task: dict, t: int, n: int, preds: np.ndarray) -> None:
        """Keep node n's slot-t predictions by task, for the GLUE metrics of the run."""
        req = self.wl.requests[t][n]
        for v, task in enumerate(self.tasks):
            sel = req.scored_tasks == v
            per_task[task][0].append(np.full(sel.sum(), t))
            per_task[task][1].append(req.scored_examples[sel])
            per_task[task][2].append(preds[sel])


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
    best = best_fixed_credit(sim)
    phases["best_fixed"] = time.perf_counter() - t0 - phases["setup"] - phases["policies"]
    return sim, runs, best, phases


def run_simulation(cfg: SimConfig, moe, fleet: Fleet | None = None, progress: bool = True,
                   on_slot: SlotCallback | None = None, backend: Backend | None = None,
                   memo_dir: str | Path | None = None) -> SimOutput:
    """Run every configured policy over the same workload; return traces and the results summary.

    `on_slot(policy, slot, slot_score, running_score)` is called after every slot (Tune and W&B
    report through it). `backend(sim, policy)` gives the router and edge a policy runs on (None =
    this process); the Ray backend passes the cluster's. `memo_dir` (a folder for this model's
    weights) keeps exact predictions across runs and seeds; if a recomputed sample of its hits
    disagrees, the file is refused and the run starts over without it."""
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    memo = None
    if memo_dir is not None:
        memo = DiskMemo(memo_dir, cfg.merge_operator or moe.merge_operator, "bf16" if cfg.bf16 else "fp32")
    try:
        sim, runs, best, phases = _play(cfg, moe, fleet, progress, on_slot, backend, memo)
    except MemoMismatch as e:
        memo.refuse(str(e))
        sim, runs, best, phases = _play(cfg, moe, fleet, progress, on_slot, backend, memo)
    oracle_credit = runs["Oracle"].credit if "Oracle" in runs else sim.run_policy("Oracle").credit
    if memo is not None:
        memo.save()
    return summarise(sim, runs, best, oracle_credit, phases, memo, time.perf_counter() - t0)

