"""Edge deployments: one Serve deployment per node class, by default one replica per node of that
class; a fleet larger than the host multiplexes several nodes onto each replica (`replica_plan`).

A replica holds only merged models, never the experts: the shell (EdgePackage) it fetched from a
merger once, plus the merged FFNs of the nodes it serves. Which nodes a replica serves is Serve's
model multiplexing: a request carries its node as the multiplexed model id, Serve routes it to the
replica already holding that node's model, and the loader pulls the node's current (version, x) from
the decision leader when a replica takes a node on (a new or restarted replica included). Pushes
arrive by `broadcast("sync", assignments)`; every replica answers with the versions it now holds.
Each node's requests go through its own dynamic batcher (`batcher.py`, the scenario's `queue:`
settings, the rule the simulator models): one batch at a time per node, heads mixed in a batch.
Weights come from the pushed object-store ref, or, when that ref died with its owner (a decision
leader that was killed), from any merger. A new version with the same x (a takeover re-stamps every
node) only relabels the model it holds.
"""

from __future__ import annotations

import asyncio
import resource
import weakref

import ray
from ray import serve

from ray.serve.exceptions import BackPressureError

from tanbr_ray.cluster.batcher import DynamicBatcher
from tanbr_ray.cluster.decision_client import DecisionClient
from tanbr_ray.cluster.merger_pool import GONE as WEIGHTS_GONE
from tanbr_ray.cluster.merger_pool import MergerPool
from tanbr_ray.cluster.names import ROUTER_NAME
from tanbr_ray.moe.edge import EdgeModel
from tanbr_ray.moe.serving import check_items
from tanbr_ray.sim.queueing import QueueConfig

RETRIES = 5
REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, BackPressureError)


async def call_node(handle, node: str, items: list, min_version: int = 0) -> tuple[dict, int]:
    """Serve items on the replica holding `node` (Serve routes by the multiplexed id). A replica that
    dies under the call is replaced, or another takes the node on after pulling its weights: the
    call is re-sent. Returns (answer, requests whose first send failed)."""
    failed = 0
    for attempt in range(RETRIES + 1):
        try:
            return await handle.options(multiplexed_model_id=node).infer.remote(items, min_version), failed
        except REPLICA_GONE:
            failed += len(items)
            if attempt == RETRIES:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))


REPORTS_KEPT = 4  # per-slot reports kept, so a slot closed again after a takeover gets the same report


class NodeModel:
    """The model a replica serves for one node: (version, x, dense model); swapped whole, never edited."""

    def __init__(self, node: str):
        self.node, self.version, self.x, self.model = node, -1, None, None


@serve.deployment(max_ongoing_requests=32)
class EdgeNode:
    async def __init__(self, node_class: str, router_name: str = ROUTER_NAME, threads: int = 1,
                       sample_per_slot: int = 32, decision_actors: int = 1, mergers: int = 1,
                       max_nodes: int = 1, bf16: bool = False, queue: dict | None = None):
        self.node_class, self.sample_per_slot = node_class, sample_per_slot
        self.queue = QueueConfig(**(queue or {}))
        self.batchers: dict[str, DynamicBatcher] = {}  # per node: one batch at a time, as on a machine of its own

        async def node_model(node: str) -> NodeModel:  # Serve's LRU over the nodes this replica holds
            return await self._load_node(node)

        self.node_model = serve.multiplexed(max_num_models_per_replica=max_nodes)(node_model)
        self.decision = DecisionClient(router_name, decision_actors)
        self.mergers = MergerPool(router_name, mergers)
        self.edge = EdgeModel(await self.mergers.package(), threads=threads, bf16=bf16)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.loaded: weakref.WeakValueDictionary[str, NodeModel] = weakref.WeakValueDictionary()
        self.heads: dict[str, list[str]] = {}
        self.sample: dict[str, list] = {}
        self.reports: dict[int, dict] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.weights_refetched = 0

    async def _load_node(self, node: str) -> NodeModel:
        nm = NodeModel(node)
        await self._refresh(nm)
        self.loaded[node] = nm
        return nm

    async def _refresh(self, nm: NodeModel, assignment: tuple | None = None) -> None:
        """Fetch and build the node's model, then swap it in whole (a request already running keeps
        the model it started with; none ever sees a half-written one)."""
        async with self.locks.setdefault(nm.node, asyncio.Lock()):
            if assignment is None:
                assignment = await self.decision.call_async("pull", nm.node)
            version, x, refs = assignment
            if version == nm.version:
                return
            if nm.model is not None and nm.x == list(x):  # same merge, new stamp: relabel
                nm.version = version
                return
            state = None
            if refs[0] is not None:  # None: the leader merges it on demand only
                try:
                    state = await refs[0]
                except WEIGHTS_GONE:  # the ref died with its owner (a killed leader)
                    pass
            if state is None:  # any merger makes the same weights
                state = await self.mergers.merged(x)
                self.weights_refetched += 1
            model = await asyncio.to_thread(self.edge.shell.with_ffn, state)
            nm.version, nm.x, nm.model = version, list(x), model

    async def infer(self, items: list[tuple[str, str, str | None]], min_version: int = 0) -> dict:
        """Serve (head, text_a, text_b) requests for the node named by the multiplexed model id."""
        node = serve.get_multiplexed_model_id()
        if not node:
            raise ValueError("infer: no node given (pass it as the multiplexed model id)")
        check_items(items, self.edge.tasks)  # a bad request fails alone, never the batch it would join
        nm = await self.node_model(node)
        if nm.version < min_version:  # a push this replica missed: pull before serving
            await self._refresh(nm)
        batcher = self.batchers.get(node)
        if batcher is None:
            batcher = self.batchers[node] = DynamicBatcher(self._serve_batch, self.queue)
        served = await asyncio.gather(*(batcher.submit((nm, item)) for item in items))
        preds = [p for p, _ in served]
        version = min(v for _, v in served)
        seen = self.heads.setdefault(node, [])
        rows = self.sample.setdefault(node, [])
        for (head, a, b), p in zip(items, preds):
            seen.append(head)
            if len(rows) < self.sample_per_slot:
                rows.append((head, a, b, float(p)))
        return {"preds": preds, "node": node, "model_version": version, "replica": self.replica}

    async def _serve_batch(self, batch: list[tuple[NodeModel, tuple]]) -> list[tuple[float, int]]:
        """One batch of a node's requests on the model it holds when the batch starts: (pred, version)."""
        nm = batch[0][0]
        model, version = nm.model, nm.version
        preds = await asyncio.to_thread(self.edge.predict_items, [item for _, item in batch], model)
        return [(float(p), version) for p in preds]

    async def sync(self, assignments: dict[str, tuple[int, list, list]]) -> dict:
        """A push: bring every node this replica holds to its assigned version; ack what it holds."""
        for node, nm in list(self.loaded.items()):
            if node in assignments and assignments[node][0] != nm.version:
                await self._refresh(nm, assignments[node])
        return self.status()

    def report(self, slot: int | None = None) -> dict:
        """What this replica served since the last report (heads per node, a sample for rewards).
        With a slot id the answer is kept: asked again for the same slot (a new leader closing the
        slot its predecessor died in), it answers the same, so nothing is counted twice or lost."""
        if slot is not None and slot in self.reports:
            return self.reports[slot]
        out = {"replica": self.replica, "heads": self.heads, "sample": self.sample, "slot": slot}
        self.heads, self.sample = {}, {}
        if slot is not None:
            self.reports[slot] = out
            for old in sorted(self.reports)[:-REPORTS_KEPT]:
                del self.reports[old]
        return out

    def held_bytes(self) -> int:
        """Model memory this replica holds: the shell once, plus each held node's merged FFNs (the
        versions share the shell's tensors; each tensor counted once)."""
        tensors = {id(p): p for p in self.edge.shell.parameters()}
        for nm in self.loaded.values():
            if nm.model is not None:
                tensors.update((id(t), t) for t in nm.model.tensors())
        return int(sum(t.numel() * t.element_size() for t in tensors.values()))

    def status(self) -> dict:
        return {"replica": self.replica, "class": self.node_class, "ray_node": ray.get_runtime_context().get_node_id(),
                "nodes": {node: nm.version for node, nm in self.loaded.items()},
                "weights_refetched": self.weights_refetched,
                "batches": {node: {"batches": len(b.batches), "requests": sum(r.size for r in b.batches),
                                   "largest": max((r.size for r in b.batches), default=0)}
                            for node, b in self.batchers.items()},
                "resident_bytes": self.held_bytes(),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
