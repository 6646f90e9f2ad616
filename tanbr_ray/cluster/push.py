"""Weight pushes with acknowledgements: every replica must report the assigned version, or be retried.

The decision leader has had each distinct x merged once into the object store; a push broadcasts the
(version, x, [ref]) assignments to every replica of every class, collects each replica's ack (the
versions it now holds) and re-broadcasts while some replica failed or still holds a stale version.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class PushResult:
    seconds: float
    replicas: int
    attempts: int
    stale: list[str] = field(default_factory=list)  # "replica:node" still behind after the last attempt
    errors: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)  # node -> the version every replica must hold


def stale_of(acks: list, assignments: dict) -> tuple[list[str], list[str]]:
    stale, errors = [], []
    for ack in acks:
        if isinstance(ack, BaseException):
            errors.append(f"{type(ack).__name__}: {ack}")
            continue
        for node, version in ack["nodes"].items():
            if node in assignments and version != assignments[node][0]:
                stale.append(f"{ack['replica']}:{node}")
    return stale, errors


async def push_async(assignments: dict, edges: dict, retries: int = 3, timeout_s: float = 30.0) -> PushResult:
    """Broadcast node -> (version, x, [ref]) to every edge deployment until all replicas ack."""
    t0 = time.perf_counter()
    for attempt in range(1, retries + 2):
        responses = [h.broadcast("sync", assignments) for h in edges.values()]
        acks = []
        for resp in responses:
            try:
                acks += await resp.results_async(timeout_s=timeout_s, return_exceptions=True)
            except Exception as exc:  # noqa: BLE001 - a whole deployment unreachable counts as errors
                acks.append(exc)
        stale, errors = stale_of(acks, assignments)
        if not stale and not errors:
            break
        await asyncio.sleep(0.05 * attempt)
    return PushResult(time.perf_counter() - t0, len(acks), attempt, stale, errors,
                      {node: a[0] for node, a in assignments.items()})


def summarize(results: list[PushResult]) -> dict:
    """Push figures over a run: time to the last ack (p50/p95/max), stale replicas, retries, errors."""
    import numpy as np

    secs = np.asarray([r.seconds for r in results]) if results else np.zeros(1)
    return {"pushes": len(results), "replicas": int(max((r.replicas for r in results), default=0)),
            "push_seconds_p50": float(np.percentile(secs, 50)), "push_seconds_p95": float(np.percentile(secs, 95)),
            "push_seconds_max": float(secs.max()), "stale_replicas": int(sum(len(r.stale) for r in results)),
            "push_retries": int(sum(r.attempts - 1 for r in results)),
            "push_errors": int(sum(len(r.errors) for r in results))}


def push(assignments: dict, edges: dict, retries: int = 3, timeout_s: float = 30.0) -> PushResult:
    """The same, from synchronous code (the simulation driver)."""
    return asyncio.run(push_async(assignments, edges, retries, timeout_s))
