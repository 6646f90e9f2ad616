"""A Serve replica that serves one mode of a model through the edge replicas' batcher: what
`tanbr bench fidelity` measures against the simulator, in a mode the edge fleet deploys (merged:
the shell and merged FFNs an edge replica holds) or one it is compared with (top-k, tagged, soft:
the whole MoE on the node).

The model arrives through the object store (a replica shares no disk with its driver); the replica
times its own batches for the calibration, so the simulator's service times are this process's.
"""

from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from tanbr_ray.cluster.batcher import DynamicBatcher
from tanbr_ray.sim.calibration import batch_times
from tanbr_ray.sim.queueing import QueueConfig


@serve.deployment(max_ongoing_requests=1024)
class ModeReplica:
    def __init__(self, model_ref: list, mode: str, queue: dict, threads: int = 1, bf16: bool = False):
        """`model_ref`: [object ref] of (EdgePackage, merged FFN state) for mode merged, else of the built-in MoE."""
        import ray

        torch.set_num_threads(threads)
        model = ray.get(model_ref[0])
        self.mode, self.bf16, self.threads = mode, bf16, threads
        self.servers = _servers(model, mode, threads, bf16)
        self.batcher = DynamicBatcher(self._batch, QueueConfig(**queue))

    async def _batch(self, items: list) -> list[float]:
        return list(await asyncio.to_thread(self.servers[self.mode], items, bf16=self.bf16))

    async def infer(self, item: tuple) -> dict:
        """One request: its prediction and the time it spent in this replica (queue + batch)."""
        t0 = time.perf_counter()
        pred = await self.batcher.submit(item)
        return {"pred": float(pred), "replica_ms": (time.perf_counter() - t0) * 1e3}

    def calibrate(self, items: list, max_batch: int, runs: int) -> dict:
        """p50 ms of one batch of 1..max_batch items in every mode this replica can serve."""
        return {"batch_ms": batch_times(self.servers, items, max_batch, runs=runs, bf16=self.bf16),
                "threads": torch.get_num_threads()}

    def take_batches(self) -> list[tuple[int, float, float]]:
        """(size, service seconds, start) of every batch served since the last call."""
        out = [(b.size, b.service_s, b.start) for b in self.batcher.batches]
        self.batcher.batches.clear()
        return out


def _servers(model, mode: str, threads: int, bf16: bool) -> dict:
    """mode -> items -> predictions: the merged shell alone, or every MoE mode but merged."""
    if mode == "merged":
        from tanbr_ray.moe.edge import EdgeModel

        pkg, state = model
        edge = EdgeModel(pkg, threads=threads, bf16=bf16)
        merged = edge.shell.with_ffn(state)
        return {"merged": lambda items, bf16=bf16: edge.predict_items(items, merged)}
    from tanbr_ray.moe.serving import moe_server

    return {m: moe_server(model, m) for m in ("oracle", "top1", "top2", "soft")}


def deploy_mode(model, mode: str, queue: dict, threads: int = 1, bf16: bool = False, cpus: float = 1.0):
    """Run a ModeReplica as its own Serve app; returns its handle. The model goes by object-store ref."""
    import ray

    ref = ray.put(model)
    app = ModeReplica.options(name=f"fidelity-{mode}", ray_actor_options={"num_cpus": cpus}).bind(
        [ref], mode, queue, threads, bf16)
    return serve.run(app, name=f"fidelity-{mode}", route_prefix=None)


async def replay(handle, arrivals_s, items: list, start_in_s: float = 0.5) -> dict:
    """Send items[i] at arrivals_s[i] (seconds from a common start), open loop: a request is sent on
    its time whatever the replica is doing. Latency counts from the scheduled time, as the simulator
    counts from arrival; `send_lag_ms` says how late this driver got a request out."""
    import numpy as np

    loop = asyncio.get_running_loop()
    t0 = loop.time() + start_in_s
    n = len(arrivals_s)
    latency, replica, lag = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n)
    errors: list[str] = []

    async def one(i: int) -> None:
        try:
            out = await handle.infer.remote(items[i])
            latency[i] = (loop.time() - (t0 + arrivals_s[i])) * 1e3
            replica[i] = out["replica_ms"]
        except Exception as exc:  # counted and shown, never a latency
            errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")

    tasks = []
    for i, a in enumerate(arrivals_s):
        delay = t0 + a - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lag[i] = (loop.time() - (t0 + a)) * 1e3
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    return {"latency_ms": latency, "replica_ms": replica, "send_lag_ms": lag, "errors": errors}
