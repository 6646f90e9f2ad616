"""The HTTP ingress deployment: the FastAPI front (api.py) over the edge deployments. It only routes
requests: the slot clock and the learning step run in the decision leader (decision_actor.py), so a
decision-leader failure never stalls or restarts the front."""

from __future__ import annotations

import itertools
import logging

from ray import serve

from tanbr_ray.cluster.api import ApiSettings, make_api
from tanbr_ray.cluster.decision_client import DecisionClient
from tanbr_ray.cluster.edge import call_node

log = logging.getLogger(__name__)


@serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    def __init__(self, edges: dict, node_classes: dict[str, str], heads: list[str], pair: list[bool],
                 router_name: str, decision_actors: int, api: dict):
        self.edges, self.node_classes = edges, node_classes
        self.decision = DecisionClient(router_name, decision_actors)
        self.heads = list(heads)
        self.pair_heads = {h for h, p in zip(self.heads, pair) if p}
        self.nodes = list(node_classes)
        self._next = itertools.cycle(self.nodes)
        self.settings = ApiSettings(**api)
        self.failed_requests = 0
        self.last_state: dict | None = None  # the leader's, kept for /healthz while a takeover is under way

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

    async def _leader_state(self) -> dict | None:
        st = await self.decision.state_async(timeout_s=2.0)
        if st is not None:
            self.last_state = st
        return st

    async def state(self) -> dict:
        st = await self._leader_state()
        if st is None:
            raise RuntimeError("no decision leader right now (a takeover is under way)")  # a 503
        st = {k: v for k, v in st.items() if k != "ticks"}
        st["replicas"] = []
        for resp in [h.broadcast("status") for h in self.edges.values()]:
            st["replicas"] += [r for r in await resp.results_async(timeout_s=10, return_exceptions=True)
                               if isinstance(r, dict)]
        st["requests_resent"] = self.failed_requests
        return st

    async def health(self) -> dict:
        """Serving does not depend on the decision leader: ok while it is replaced, with the last count."""
        fresh = await self._leader_state()
        st = fresh or self.last_state or {}
        return {"ok": True, "nodes": len(self.nodes), "heads": self.heads,
                "slots_closed": st.get("slots_closed", 0), "leader": fresh["name"] if fresh else None}
