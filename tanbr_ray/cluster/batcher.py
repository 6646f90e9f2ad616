"""The edge replicas' dynamic batcher: the rule `sim.queueing` models, run live.

A node serves one batch at a time. When it is free and requests wait, the batch closes at the earlier
of `max_batch` requests queued or the oldest having waited `max_wait_ms`; it takes up to `max_batch`
of the requests that have arrived. A request that would start after waiting more than `timeout_s`
is refused (`RequestExpired`, a 503 at the HTTP front), never served late. The settings are the
scenario's `queue:` block, the ones the simulator reads.

Serve's own `serve.batch` closes a batch while the previous one still runs (its timer starts when the
batch loop picks the first request up, and batches then wait for the running one), so under load it
makes smaller batches than this rule; the simulator's rule is the one deployed. Plain asyncio, no
Ray: the tests drive it with a fake model and compare it with `sim.queueing.simulate_queue`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from tanbr_ray.sim.queueing import QueueConfig


class RequestExpired(RuntimeError):
    """The request waited longer than the queue's timeout before its batch could start."""


@dataclass
class _Waiting:
    item: object
    arrived: float
    future: asyncio.Future


@dataclass
class BatchRecord:
    """One closed batch: when it closed and started (monotonic seconds), its size, and its service time."""

    start: float
    size: int
    service_s: float


@dataclass
class DynamicBatcher:
    """Collects `submit`ted items into batches for `run_batch` (async, items -> one result per item)."""

    run_batch: Callable[[list], Awaitable[Sequence]]
    config: QueueConfig
    clock: Callable[[], float] = time.monotonic
    keep: int = 10_000  # batch records kept for `batches` (calibration, tests)
    queue: deque = field(default_factory=deque)
    batches: deque = field(init=False)
    _wake: asyncio.Event | None = field(default=None, init=False)
    _task: asyncio.Task | None = field(default=None, init=False)

    def __post_init__(self):
        self.batches = deque(maxlen=self.keep)

    async def submit(self, item):
        """Queue one item and wait for its result (its batch's run raises here too)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._serve())
        waiting = _Waiting(item, self.clock(), loop.create_future())
        self.queue.append(waiting)
        self._wake.set()
        return await waiting.future

    async def _serve(self) -> None:
        cfg, B = self.config, self.config.max_batch
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            close_at = self.queue[0].arrived + cfg.max_wait_ms / 1e3
            while len(self.queue) < B and self.clock() < close_at:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), close_at - self.clock())
                except asyncio.TimeoutError:
                    break
            start = self.clock()
            if start - self.queue[0].arrived > cfg.timeout_s:  # expired while the node was busy: refuse, look again
                late = self.queue.popleft()
                if not late.future.done():
                    late.future.set_exception(RequestExpired(
                        f"waited {start - late.arrived:.1f} s for a batch (queue timeout_s {cfg.timeout_s})"))
                continue
            batch = [self.queue.popleft() for _ in range(min(B, len(self.queue)))]
            await self._run([w for w in batch if not w.future.cancelled()], start)

    async def _run(self, batch: list[_Waiting], start: float) -> None:
        if not batch:
            return
        try:
            results = await self.run_batch([w.item for w in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # every waiter hears it; the batcher keeps serving
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
            results = None
        self.batches.append(BatchRecord(start, len(batch), self.clock() - start))
        if results is not None:
            for w, r in zip(batch, results):
                if not w.future.done():
                    w.future.set_result(r)
