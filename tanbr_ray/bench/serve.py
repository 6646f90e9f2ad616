"""`tanbr bench serve`: HTTP load on the edge service over loopback, then timed weight pushes.

Load: `requests` POST /v1/infer with GLUE dev texts (every head, nodes round-robin) at a fixed
concurrency; p50/p99 latency and errors. Pushes: the router is switched to Random so every slot
gives every node a new x (a full push to every replica, the worst case), `pushes` slots are closed
through the ingress and each push's time to the last acknowledgement is recorded, with stale replicas.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np


def request_bodies(tasks: list[str], n: int, data_dir=None, seed: int = 0) -> list[dict]:
    """n request bodies drawn from the tasks' GLUE dev sets, heads interleaved."""
    from tanbr_ray.moe.data import load_task

    rng = np.random.default_rng(seed)
    splits = {t: load_task(t, "dev", data_dir).head(200, seed=seed) for t in tasks}
    out = []
    for i in range(n):
        sp = splits[tasks[i % len(tasks)]]
        j = int(rng.integers(len(sp)))
        body = {"text_a": sp.text_a[j], "head": sp.task}
        if sp.text_b is not None:
            body["text_b"] = sp.text_b[j]
        out.append(body)
    return out


async def load(url: str, bodies: list[dict], concurrency: int, timeout_s: float = 60.0) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat, errors, statuses = [], [], {}

    async def one(client, body):
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/infer", json=body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:120]}")
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            lat.append((time.perf_counter() - t0) * 1e3)

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(one(client, b) for b in bodies))
    wall = time.perf_counter() - t0
    a = np.asarray(lat)
    return {"requests": len(bodies), "concurrency": concurrency, "errors": len(errors), "error_samples": errors[:5],
            "statuses": {str(k): v for k, v in statuses.items()}, "wall_seconds": wall,
            "requests_per_second": len(bodies) / wall,
            "latency_ms_p50": float(np.percentile(a, 50)), "latency_ms_p99": float(np.percentile(a, 99))}


def timed_pushes(pushes: int, router_name: str, decision_actors: int = 1) -> dict:
    """Close `pushes` slots under the Random policy (every node gets a new x) and time each push."""
    from tanbr_ray.cluster.decision_client import DecisionClient
    from tanbr_ray.cluster.push import PushResult, summarize

    client = DecisionClient(router_name, decision_actors)
    client.call("reset", "Random")
    return summarize([PushResult(**client.call("close_slot")) for _ in range(pushes)])
