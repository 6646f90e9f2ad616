"""Calls to whichever merger answers (no model import: the decision actor uses this).

Mergers are interchangeable, so a call goes to the next one in turn; one that fails (dead, restarting,
timed out) is skipped for a while and the call moves on to the next at once. A merger Ray is
restarting refuses calls at once (max_task_retries=0), so failover costs no waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import ray

from tanbr_ray.cluster.names import NAMESPACE, merger_name

GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.OwnerDiedError,
        ray.exceptions.ObjectLostError, ValueError)  # ValueError: a name not (yet) registered
DOWN_S = 5.0  # how long a failed merger is tried last


class MergerPool:
    def __init__(self, router_name: str, n: int, timeout_s: float = 60.0):
        self.names = [merger_name(router_name, i) for i in range(n)]
        self.timeout_s = timeout_s
        self._handles: dict[str, object] = {}
        self._down: dict[str, float] = {}
        self._turn = itertools.count()
        self.failovers = 0

    def _handle(self, name: str):
        if name not in self._handles:
            self._handles[name] = ray.get_actor(name, namespace=NAMESPACE)
        return self._handles[name]

    def _order(self) -> list[str]:
        k = next(self._turn) % len(self.names)
        names = self.names[k:] + self.names[:k]
        now = time.monotonic()
        return sorted(names, key=lambda n: now - self._down.get(n, -1e9) < DOWN_S)  # healthy ones first

    def _failed(self, name: str) -> None:
        self._down[name] = time.monotonic()
        self._handles.pop(name, None)  # a restarted actor is looked up afresh
        self.failovers += 1

    async def call(self, method: str, *args, num_returns: int = 1):
        """`method(*args)` on the first merger that answers; with num_returns=2 the first result is
        awaited and the refs are returned (the second stays in the object store, owned by the caller)."""
        errors = []
        for name in self._order():
            try:
                out = getattr(self._handle(name), method).remote(*args)
                first = out[0] if num_returns > 1 else out
                value = await asyncio.wait_for(first, self.timeout_s)
                if name in self._down:
                    del self._down[name]
                return out if num_returns > 1 else value
            except (*GONE, asyncio.TimeoutError) as exc:
                errors.append(f"{name}: {type(exc).__name__}")
                self._failed(name)
        raise RuntimeError(f"no merger answered {method}: {'; '.join(errors)}")

    async def started(self) -> list[dict]:
        """How each merger started (where its model came from, how long loading took, its Ray node)."""
        return list(await asyncio.gather(*(self._handle(n).ready.remote() for n in self.names)))

    async def merged_ref(self, x) -> ray.ObjectRef:
        """A ref to x's merged FFNs, owned by the caller."""
        _, weights = await self.call("merge", [float(v) for v in x], num_returns=2)
        return weights

    async def merged(self, x) -> dict:
        """x's merged FFNs, fetched here (an edge replica whose pushed ref died with its owner)."""
        for _ in range(len(self.names) + 1):
            ref = await self.merged_ref(x)
            try:
                return await ref
            except GONE:
                continue
        raise RuntimeError("merged weights lost on every merger")

    async def package(self):
        """The edge package (shell), from any merger."""
        for _ in range(len(self.names) + 1):
            ref = (await self.call("package"))[0]
            try:
                return await ref
            except GONE:  # its owner (a merger) died in between
                continue
        raise RuntimeError("edge package lost on every merger")
