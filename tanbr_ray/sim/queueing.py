"""Queueing latency at an edge node: Poisson arrivals, dynamic batching, a timeout.

A node serves one batch at a time. When it is free and requests wait, the batch closes at the earlier
of `max_batch` requests queued or the oldest having waited `max_wait_s` (the rule of Triton's and
TorchServe's dynamic batchers); it then takes up to `max_batch` of the requests that have arrived.
A request that would start after waiting more than `timeout_s` is dropped (counted, never served).
Service time is a function of the batch size (this host's measured batch latency for the serving mode
× the node's slowdown, plus swap time where the model does not fit), so an overloaded node shows its
wait, its backlog and its drops instead of a latency that is silently infinite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class QueueConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch: int = Field(16, ge=1, le=4096, description="requests per batch at most")
    max_wait_ms: float = Field(20.0, ge=0.0, le=60_000.0, description="how long the oldest request waits for a batch to fill")
    timeout_s: float = Field(30.0, gt=0.0, le=86_400.0, description="a request waiting longer is dropped")


@dataclass
class QueueResult:
    latency_s: np.ndarray  # (n,) wait + service for served requests, NaN for dropped ones
    dropped: np.ndarray  # (n,) bool
    batches: int
    backlog_end: int  # requests arrived but not finished at `end_s`

    @property
    def served(self) -> int:
        return int((~self.dropped).sum())


def simulate_queue(arrivals_s: np.ndarray, service_s: Callable[[int], float], config: QueueConfig,
                   end_s: float | None = None) -> QueueResult:
    """Serve `arrivals_s` (ascending seconds) one batch at a time; see the module docstring."""
    a = np.asarray(arrivals_s, dtype=np.float64)
    if len(a) and np.any(np.diff(a) < 0):
        raise ValueError("arrivals must be ascending")
    n, B, wait, timeout = len(a), config.max_batch, config.max_wait_ms / 1e3, config.timeout_s
    latency = np.full(n, np.nan)
    dropped = np.zeros(n, dtype=bool)
    finish = np.full(n, np.nan)
    free_at, i, batches = 0.0, 0, 0
    while i < n:
        full_at = a[i + B - 1] if i + B - 1 < n else np.inf
        start = max(free_at, min(a[i] + wait, full_at))
        if start - a[i] > timeout:  # the oldest expired while the node was busy: drop, look again
            dropped[i] = True
            i += 1
            continue
        j = i
        while j < n and j - i < B and a[j] <= start:
            j += 1
        done = start + float(service_s(j - i))
        finish[i:j] = done
        latency[i:j] = done - a[i:j]
        free_at, i, batches = done, j, batches + 1
    end = (a[-1] if n else 0.0) if end_s is None else end_s
    backlog = int(np.sum((a <= end) & ~dropped & (finish > end)))
    return QueueResult(latency, dropped, batches, backlog)


def spread_service(service: Callable[[int], float], spread, rng: np.random.Generator | None) -> Callable[[int], float]:
    """`service` × a draw from `spread` (quantiles, evenly spaced in probability, of a batch's service
    time over its size's median, as a replica served them): batches of one size differ by their texts'
    lengths and the host's noise, and that variance is what lengthens a queue's tail. Without a spread
    or an rng, `service` itself."""
    if rng is None or len(spread) < 2:
        return service
    q, levels = np.asarray(spread, dtype=np.float64), np.linspace(0.0, 1.0, len(spread))
    return lambda b: service(b) * float(np.interp(rng.random(), levels, q))


def interpolate_service(sizes: list[int], ms: list[float]) -> Callable[[int], float]:
    """Batch service time in seconds for any size, linear between measured sizes (and beyond the
    largest, by its slope)."""
    xs, ys = np.asarray(sizes, dtype=np.float64), np.asarray(ms, dtype=np.float64) / 1e3
    if len(xs) < 2 or np.any(np.diff(xs) <= 0):
        raise ValueError(f"service sizes must be ≥ 2 ascending batch sizes, got {sizes}")
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])

    def service(b: int) -> float:
        if b <= xs[-1]:
            return float(np.interp(b, xs, ys))
        return float(ys[-1] + slope * (b - xs[-1]))

    return service
