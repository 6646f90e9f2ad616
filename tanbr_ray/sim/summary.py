"""From the loop's records to what a run reports: per-policy results, the run's identity, its costs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np

from tanbr_ray.moe.data import resolve_data_dir
from tanbr_ray.moe.store import model_identity
from tanbr_ray.provenance import provenance
from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.output import Phases, PolicyResult, PolicySeries, SimOutput
from tanbr_ray.stats import loglog_slope, recovery_slots

RECOVERY_TOLERANCE = 0.01  # after a mix change: back within 1 credit point of the gap to the oracle before it
NOT_RESULT_KEYS = ("name", "out", "wandb", "wandb_project", "data_dir", "models_dir")  # where things live, not what is measured
HEADLINE = ("credit_second_half: per-request accuracy credit (STS-B: 1 - |error|/5) over the scored "
            "sample of the second half of the run")
GLUE_NOTE = ("score / scores: GLUE metrics over the scored sample, except STS-B, which enters as its "
             "per-request credit (a correlation pooled over the many models a merging policy plays "
             "measures their disagreement, not their accuracy)")


def run_identity(cfg: SimConfig, model: dict, data: dict) -> dict:
    """The model and data a run measured, and a fingerprint of them with its config: runs with the
    same fingerprint scored the same requests of the same examples on the same model, so their
    figures compare (and, seed for seed, repeat)."""
    what = {"model": model["weights_sha256"], "pool": data["pool_sha256"], "labels": data["labels_sha256"],
            "config": {k: v for k, v in cfg.model_dump().items() if k not in NOT_RESULT_KEYS}}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return {"model": model, "data": data, "fingerprint": digest[:16]}


def _p50_by_class(latency: np.ndarray, node: np.ndarray, nodes) -> dict[str, float]:
    """Median request latency per node class (where the full MoE fits and where it must swap)."""
    out = {}
    for cls in dict.fromkeys(c.name for _, c in nodes):
        sel = np.isin(node, [n for n, (_, c) in enumerate(nodes) if c.name == cls])
        if sel.any():
            out[cls] = float(np.percentile(latency[sel], 50))
    return out


def _metrics(sim, run, half: int) -> tuple[dict[str, float], dict[str, float]]:
    """Each task's GLUE metric over the run's scored requests, and over its second half."""
    glue, glue2 = {}, {}
    for task, (slot_l, ex_l, pred_l) in run.per_task.items():
        slot, ex, pred = (np.concatenate(a) if a else np.zeros(0) for a in (slot_l, ex_l, pred_l))
        ex = ex.astype(np.int64)
        late = slot >= half
        if len(ex):
            glue[task] = sim.credit_of.task_metric(task, ex, pred)
        if late.any():
            glue2[task] = sim.credit_of.task_metric(task, ex[late], pred[late])
    return glue, glue2


def policy_result(sim, run, best_credit: np.ndarray, oracle_credit: np.ndarray) -> PolicyResult:
    half, safe, lat = sim.cfg.slots // 2, np.maximum(run.counts, 1), run.latency
    glue, glue2 = _metrics(sim, run, half)
    reg_fixed, reg_oracle = (best_credit - run.credit) / safe, (oracle_credit - run.credit) / safe
    pct = lambda q: float(np.percentile(lat, q)) if len(lat) else float("nan")  # noqa: E731
    return PolicyResult(
        credit=float(run.credit.sum() / max(run.counts.sum(), 1)),
        credit_second_half=float(run.credit[half:].sum() / max(run.counts[half:].sum(), 1)),
        score=float(np.mean(list(glue.values()))) if glue else float("nan"),
        score_second_half=float(np.mean(list(glue2.values()))) if glue2 else float("nan"),
        scores=glue, scores_second_half=glue2, latency_ms_p50=pct(50), latency_ms_p95=pct(95),
        latency_ms_p50_by_class=_p50_by_class(lat, run.latency_node, sim.nodes),
        dropped_requests=int(run.dropped.sum()), backlog_end=int(run.backlog.sum()),
        resident_bytes=int(sim.costs.resident[run.mode]), pushed_bytes=int(run.pushed.sum()),
        pushed_bytes_per_slot=float(run.pushed.mean()), push_seconds=float(run.push_seconds),
        wall_seconds_split=run.seconds_split, regret_vs_best_fixed=float(reg_fixed.sum()),
        regret_vs_oracle=float(reg_oracle.sum()), regret_slope=loglog_slope(np.cumsum(reg_fixed), start_frac=0.5),
        recovery_slots=[recovery_slots(reg_oracle, c, max(3, sim.cfg.slots // 10), RECOVERY_TOLERANCE)
                        for c in sim.wl.mix_changes])


def summarise(sim, runs: dict, best: tuple, oracle_credit: np.ndarray, phases: dict, memo, wall: float) -> SimOutput:
    """The run's results (results.json) and per-slot traces (the plots, W&B)."""
    cfg, (best_credit, best_x) = sim.cfg, best
    records = {name: policy_result(sim, r, best_credit, oracle_credit) for name, r in runs.items()}
    series = {name: PolicySeries(name, r.credit / np.maximum(r.counts, 1), (best_credit - r.credit) / np.maximum(r.counts, 1),
                                 (oracle_credit - r.credit) / np.maximum(r.counts, 1), r.pushed, r.choices, r.latency,
                                 {node: int(sim.costs.resident[r.mode]) for node, _ in sim.nodes},
                                 r.node_credit, r.node_counts)
              for name, r in runs.items()}
    total, scored = sim.wl.total_requests, sim.wl.scored_requests
    data = {"source": str(resolve_data_dir(cfg.data_dir) or "hub"), "split": "dev", "pool_seed": 0,
            **sim.ev.data_identity()}
    summary = {
        "policies": {name: asdict(rec) for name, rec in records.items()},
        "headline": HEADLINE, "glue_note": GLUE_NOTE,
        "requests": int(total), "requests_simulated": int(total * len(runs)),
        "scored_requests": int(scored * len(runs)), "scored_per_slot": cfg.scored_per_slot,
        "scored_requests_per_second": scored * len(runs) / wall,
        "model_forwards": int(sim.ev.forwards), "memo_hits": int(sim.ev.disk_hits),
        "memo": None if memo is None else {"file": str(memo.path), "hits": int(sim.ev.disk_hits),
                                           "verified": int(sim.ev.check.checked), "refused": memo.refused},
        **run_identity(cfg, model_identity(sim.moe), data),
        "padded_tokens_per_real": sim.ev.padded_tokens / max(sim.ev.real_tokens, 1),
        "wall_seconds": wall, "wall_seconds_phases": phases, "requests_per_second": total * len(runs) / wall,
        "slots": cfg.slots, "nodes": {node: cls.name for node, cls in sim.nodes}, "tasks": sim.tasks,
        "expert_map": {"source": sim.moe.expert_map, "task_experts": {t: int(sim.moe.expert_of[t]) for t in sim.tasks}},
        "full_moe_bytes": int(sim.costs.resident["top2"]), "dense_bytes": int(sim.costs.dense_bytes),
        "compute_ms_batch1": sim.costs.compute_ms,
        "batch_ms": {m: {str(b): ms for b, ms in enumerate(v, 1)} for m, v in sim.costs.batch_ms.items()},
        "service_model": {"source": sim.costs.service_model, "overhead_ms": sim.costs.overhead_ms},
        "monitor_error_tv": sim.monitors.error([c.name for _, c in sim.nodes]),
        "best_fixed_x": {node: x.round(6).tolist() for node, x in best_x.items()},
        "provenance": provenance(wall, cfg.bf16),
    }
    return SimOutput(summary, series, sim.tasks, list(sim.moe.expert_labels), [n for n, _ in sim.nodes],
                     {n: c.name for n, c in sim.nodes}, sim.wl.mix_changes, cfg.slot_seconds, cfg.model_dump(),
                     sim.wl.psi, records, Phases(**phases))
