"""The HTTP ingress deployment: the FastAPI front (api.py) over the edge deployments, plus the live
slot clock that closes each slot (reports -> router -> push)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import ray
from ray import serve

from tanbr_ray.cluster.api import ApiSettings, make_api
from tanbr_ray.cluster.edge import call_node
from tanbr_ray.cluster.push import PushResult, push_async
from tanbr_ray.cluster.names import NAMESPACE
from tanbr_ray.moe.data import PAIR

log = logging.getLogger(__name__)


@serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    async def __init__(self, edges: dict, node_classes: dict[str, str], router_name: str, api: dict,
                       slot_seconds: float):
        self.edges, self.node_classes = edges, node_classes
        self.router = ray.get_actor(router_name, namespace=NAMESPACE)
        st = await self.router.state.remote()
        self.heads = list(st["tasks"])
        self.pair_heads = {h for h in self.heads if PAIR[h]}
        self.nodes = list(node_classes)
        self._next = itertools.cycle(self.nodes)
        self.settings = ApiSettings(**api)
        self.slot_seconds = slot_seconds
        self.last_push: PushResult | None = None
        self.slots = st["updated_slot"] + 1  # the next live slot to close (continues a restored router)
        self.failed_requests = 0
        # async __init__: the clock runs on the replica's own event loop
        self.clock = asyncio.get_running_loop().create_task(self._slot_clock()) if slot_seconds > 0 else None

    def __serve_build_asgi_app__(self):
        return make_api(self, self.settings)

    # --- the InferBackend protocol of api.make_api ----------------------------------------------
    async def infer(self, head: str, text_a: str, text_b: str | None, node: str | None) -> dict:
        node = node or next(self._next)
        out, failed = await call_node(self.edges[self.node_classes[node]], node, [(head, text_a, text_b)])
        self.failed_requests += failed
        p = out["preds"][0]
        answer = {"score": float(p)} if head == "STS-B" else {"label": int(p)}
        return {**answer, "node": out["node"], "model_version": out["model_version"]}

    async def state(self) -> dict:
        st = await self.router.state.remote()
        st["replicas"] = []
        for resp in [h.broadcast("status") for h in self.edges.values()]:
            st["replicas"] += [r for r in await resp.results_async(timeout_s=10, return_exceptions=True)
                               if isinstance(r, dict)]
        st["slots_closed"] = self.slots
        st["requests_resent"] = self.failed_requests
        if self.last_push is not None:
            st["last_push"] = vars(self.last_push)
        return st

    async def health(self) -> dict:
        return {"ok": True, "nodes": len(self.nodes), "heads": self.heads, "slots_closed": self.slots}

    # --- live slots -------------------------------------------------------------------------------
    async def close_slot(self) -> PushResult:
        """Collect what every replica served, let the router learn and decide, push the new weights."""
        reports = []
        for resp in [h.broadcast("report") for h in self.edges.values()]:
            reports += [r for r in await resp.results_async(timeout_s=30, return_exceptions=True) if isinstance(r, dict)]
        await self.router.live_step.remote(reports, self.slots)
        self.last_push = await push_async(self.router, self.edges)
        self.slots += 1
        return self.last_push

    async def _slot_clock(self) -> None:
        """Close a slot every slot_seconds; the first right away, so every node has a model early."""
        wait = 0.0
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(wait)
            wait = self.slot_seconds
            try:
                r = await self.close_slot()
                log.info("slot %d closed in %.2fs: push %.3fs, %d replicas, stale %s",
                         self.slots, time.monotonic() - t0, r.seconds, r.replicas, r.stale)
            except Exception:  # noqa: BLE001 - a failed slot must not stop the clock
                log.exception("closing slot %d failed", self.slots)
