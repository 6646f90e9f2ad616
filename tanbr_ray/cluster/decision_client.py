"""Calls to the decision leader, whichever actor it is now (no model import).

The driver, the ingress, the edge replicas and the benches talk to the decision actors through this:
a call goes to the last known leader; `NotLeader` or a dead actor sends it to the other at once, and
it is retried until `timeout_s` while a takeover is under way. Calls carry slot ids where they change
state, so a call retried on the new leader is applied exactly once.
"""

from __future__ import annotations

import asyncio
import time

import ray

from tanbr_ray.cluster.election import NotLeader
from tanbr_ray.cluster.names import NAMESPACE, decision_name

GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class DecisionClient:
    def __init__(self, router_name: str, actors: int, timeout_s: float = 120.0):
        self.names = [decision_name(router_name, i) for i in range(actors)]
        self.timeout_s = timeout_s
        self.leader = self.names[0]
        self._handles: dict[str, object] = {}

    def handle(self, name: str):
        if name not in self._handles:
            self._handles[name] = ray.get_actor(name, namespace=NAMESPACE)
        return self._handles[name]

    def _order(self) -> list[str]:
        return [self.leader] + [n for n in self.names if n != self.leader]

    def _lost(self, name: str) -> None:
        self._handles.pop(name, None)

    def _registered(self):
        """(name, handle) of every decision actor that is registered, the last leader first."""
        for name in self._order():
            try:
                yield name, self.handle(name)
            except ValueError:  # not registered (yet, or any more)
                continue

    def _check_deadline(self, deadline: float, method: str, timeout_s: float | None) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no decision leader answered {method} in {timeout_s or self.timeout_s:.0f} s")

    def call(self, method: str, *args, timeout_s: float | None = None):
        """`method(*args)` on the leader, from synchronous code."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            for name, h in self._registered():
                try:
                    out = ray.get(getattr(h, method).remote(*args), timeout=max(1.0, deadline - time.monotonic()))
                except NotLeader:
                    continue
                except GONE:
                    self._lost(name)
                    continue
                self.leader = name
                return out
            self._check_deadline(deadline, method, timeout_s)
            time.sleep(0.05)

    async def call_async(self, method: str, *args, timeout_s: float | None = None):
        """The same from a coroutine (the same loop; only the wait differs)."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            for name, h in self._registered():
                try:
                    out = await asyncio.wait_for(getattr(h, method).remote(*args), max(1.0, deadline - time.monotonic()))
                except NotLeader:
                    continue
                except GONE:
                    self._lost(name)
                    continue
                self.leader = name
                return out
            self._check_deadline(deadline, method, timeout_s)
            await asyncio.sleep(0.05)

    async def states_async(self, timeout_s: float = 5.0) -> list[dict]:
        """Every decision actor's snapshot that answers within timeout_s (each says its role)."""
        async def one(name):
            try:
                return await asyncio.wait_for(self.handle(name).state.remote(), timeout_s)
            except (*GONE, ValueError, asyncio.TimeoutError):
                self._lost(name)
                return None

        return [s for s in await asyncio.gather(*(one(n) for n in self.names)) if s is not None]

    def _leader_of(self, states: list[dict]) -> dict | None:
        """The snapshot of the newest-term leader among these (None while no actor leads)."""
        leading = [s for s in states if s["role"] == "leader"]
        if not leading:
            return None
        best = max(leading, key=lambda s: s["term"])
        self.leader = best["name"]
        return best

    async def state_async(self, timeout_s: float = 5.0) -> dict | None:
        """The leader's snapshot (None while no actor leads)."""
        return self._leader_of(await self.states_async(timeout_s))

    def states(self, timeout_s: float = 5.0) -> list[dict]:
        out = []
        for name in self.names:
            try:
                out.append(ray.get(self.handle(name).state.remote(), timeout=timeout_s))
            except (*GONE, ValueError, ray.exceptions.GetTimeoutError):
                self._lost(name)
        return out

    def state(self, timeout_s: float = 5.0) -> dict | None:
        return self._leader_of(self.states(timeout_s))

    def wait_leader(self, since: float = 0.0, timeout_s: float = 120.0) -> dict:
        """Block until an actor that took the lead at or after `since` (time.time()) has published
        its weights; its snapshot."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.state(timeout_s=2.0)
            if st is not None and st["published"] and st["takeovers"] and st["takeovers"][-1]["at"] >= since:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"no decision leader after {timeout_s:.0f} s")
            time.sleep(0.02)
