"""The decision actor: the small, stateful part of the router, as a leader and a hot standby.

It hosts a DecisionService (policy, monitors, versions, slot ids, checkpoints) and, in live serving,
the slot clock: every slot it collects what the replicas served, has a merger score a sample
(label-free reward), learns, decides x for the next slot, has the mergers merge each distinct x and
pushes the (version, x, weights ref) assignments to every replica. It imports no model code, so it
starts in about a second.

Leader and standby: two such actors share the router's storage (a path or URI every machine reads)
and its terms in Ray's GCS key-value store, nothing else. The standby keeps its imports and objects
warm and holds a `watch` call open on the leader; when the leader dies, Ray fails that call (the
actor-death signal), the standby claims the next term (election.py), restores the newest checkpoint
from storage, re-publishes and closes the next slot at once. Ray restarts the dead one, which comes back
as the new standby. Slot ids keep every call exactly-once across the takeover: a slot already decided
re-answers, a slot already learned from is not learned from again.

Threads: Ray's threads only forward calls into one event loop (the engine), so every change of state
happens there, one step at a time; `state` answers from a snapshot and never waits behind a slot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

import numpy as np
import ray

from tanbr_ray.cluster import lifecycle
from tanbr_ray.cluster.decision_service import DecisionService, ModelMeta, RouterSpec, x_key
from tanbr_ray.cluster.election import Election, NotLeader, Term
from tanbr_ray.cluster.merger_pool import MergerPool
from tanbr_ray.cluster.names import NAMESPACE, decision_name
from tanbr_ray.cluster.push import push_async
from tanbr_ray.sim.fleet import Fleet

log = logging.getLogger(__name__)
GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
LAG_SLOTS = 4  # observed slots the background learner may fall behind before it counts the oldest unscored


class DecisionActor:
    def __init__(self, spec: dict, meta: dict, fleet: dict, router_name: str, index: int, actors: int,
                 live: dict | None = None):
        t0 = time.perf_counter()
        self.spec, self.meta, self.fleet = RouterSpec(**spec), ModelMeta(**meta), Fleet(**fleet)
        self.name, self.index = decision_name(router_name, index), index
        self.router_name, self.actors = router_name, actors
        self.others = [decision_name(router_name, i) for i in range(actors) if i != index]
        self.pool = MergerPool(router_name, self.spec.mergers)
        # {"slot_seconds", "app", "edges": [deployment names]}; slot_seconds 0 or no live: slots driven by calls
        self.live = live
        self.edges: dict | None = None
        if live:
            from ray import serve  # noqa: F401 - imported now, so a takeover does not pay for it

        self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        self.election = Election(router_name) if actors > 1 else None
        self.svc = DecisionService(self.spec, self.meta, self.fleet, restore=False)  # warm; restored on taking over
        if self.election is not None:  # a checkpoint commits only while this actor holds the newest term
            self.svc.fence = lambda: self.election.fence(self.term)
        self.term: int | None = None
        self.position = "starting"
        self.refs: dict[bytes, ray.ObjectRef] = {}
        self._reports_kept: dict[int, list] = {}
        self._learner: asyncio.Future | None = None
        self.unscored_slots = 0  # live slots counted without feedback because scoring fell behind
        self.learn_seconds: deque[float] = deque(maxlen=50)
        self.published = False
        self.ticks: deque[dict] = deque(maxlen=200)
        self.takeovers: list[dict] = []
        self.last_push: dict | None = None
        self.started = {"init_s": time.perf_counter() - t0, "restarted": self.reconstructed, "at": time.time()}
        self.snapshot: dict = {}
        self._snap()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="decision-engine", daemon=True).start()
        self._publish_lock = asyncio.Lock()
        self._step_lock = asyncio.Lock()
        asyncio.run_coroutine_threadsafe(self._supervise(), self.loop).add_done_callback(_log_failure)
        if live:
            asyncio.run_coroutine_threadsafe(self._follow_app(), self.loop).add_done_callback(_log_failure)

    # --- plumbing ---------------------------------------------------------------------------------
    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _snap(self) -> None:
        self.snapshot = {**self.svc.state(), "name": self.name, "role": self.position, "term": self.term,
                         "published": self.published, "slots_closed": self.svc.decided_slot + 1,
                         "started": self.started, "takeovers": self.takeovers, "ticks": list(self.ticks),
                         "merger_failovers": self.pool.failovers, "last_push": self.last_push,
                         "unscored_slots": self.unscored_slots, "learn_seconds": list(self.learn_seconds)}

    def _check_leader(self) -> None:
        """Fencing: act only while this actor holds the newest term."""
        if self.term is None:
            raise NotLeader(f"{self.name} is {self.position}, not the leader")
        if self.election is not None:
            cur = self.election.current()
            if cur is None or cur.term != self.term:
                self._step_down(f"term {cur.term if cur else None} supersedes {self.term}")
                raise NotLeader(f"{self.name} lost the lead")

    def _step_down(self, why: str) -> None:
        log.warning("%s steps down: %s", self.name, why)
        self.term, self.position = None, "standby"
        self._snap()

    async def _follow_app(self) -> None:
        """Live and die with the app (lifecycle.py): once it has been listed, its absence for
        GONE_CHECKS checks in a row ends the router, this actor last."""
        seen, gone = False, 0
        while gone < lifecycle.GONE_CHECKS:
            await asyncio.sleep(lifecycle.CHECK_S)
            listed = await asyncio.get_running_loop().run_in_executor(None, lifecycle.app_listed, self.live["app"])
            seen, gone = seen or listed, 0 if listed or not seen else gone + 1
        lifecycle.end_router(self.router_name, self.actors, self.spec.mergers, spare=self.name,
                             group=ray.util.get_current_placement_group())
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    # --- who leads --------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        if self.election is None:  # the only decision actor: it leads (a restart restores the checkpoint)
            await self._lead(0, "only decision actor")
            return
        self.position = "standby"
        self._snap()
        while True:
            try:
                cur = self.election.current()
                if self.term is not None:
                    if cur is not None and cur.term == self.term:
                        await asyncio.sleep(0.2)  # leading; fencing is also checked on every step
                        continue
                    self._step_down(f"term {cur.term if cur else None} supersedes {self.term}")
                if cur is None:
                    if self.index != 0:  # a fresh deployment: actor 0 claims the first term
                        await asyncio.sleep(0.5 if time.time() - self.started["at"] < 10 else 0)
                        if self.election.current() is not None:
                            continue
                    if self.election.claim(1, self.name):
                        await self._lead(1, "first term")
                    continue
                if cur.leader != self.name and await self._leads(cur):
                    if not await self._watch(cur):
                        continue  # the lead changed hands some other way: look again
                    # Ray's actor-death signal: the leader is gone, claim the next term now
                # the named leader is dead, not leading, or a previous incarnation of this actor
                if self.election.claim(cur.term + 1, self.name):
                    await self._lead(cur.term + 1, f"term {cur.term} leader {cur.leader} gone")
            except Exception:  # noqa: BLE001 - supervision must go on
                log.exception("%s: supervision step failed", self.name)
                await asyncio.sleep(0.5)

    async def _leads(self, cur: Term) -> bool:
        """Does the actor named by the newest term lead it now?"""
        try:
            role = await asyncio.wait_for(ray.get_actor(cur.leader, namespace=NAMESPACE).role.remote(), 10)
        except (*GONE, ValueError, asyncio.TimeoutError):
            return False
        return role["term"] == cur.term

    async def _watch(self, cur: Term) -> bool:
        """Hold a call open on the leader of `cur`: True when Ray fails it (the leader died), False
        when the leader stepped down or a newer term appeared."""
        try:
            call = asyncio.ensure_future(ray.get_actor(cur.leader, namespace=NAMESPACE).watch.remote(cur.term))
        except ValueError:
            return True
        while True:
            done, _ = await asyncio.wait({call}, timeout=1.0)
            if done:
                return isinstance(call.exception(), GONE)
            now = self.election.current()
            if now is None or now.term != cur.term:
                call.cancel()
                return False

    async def _lead(self, term: int, why: str) -> None:
        """Take the lead: restore the newest checkpoint, re-publish, and (live) close a slot at once."""
        t0, at = time.perf_counter(), time.time()
        self.term, self.position, self.published = term, "leader", False
        self.refs = {}
        try:
            if not self.svc.restore():
                self.svc.checkpoint()
        except Exception:
            self._step_down("restore failed")  # the next term goes to an actor that can restore
            raise
        t1 = time.perf_counter()
        clocked = bool(self.live and self.live["slot_seconds"] > 0)
        if clocked:  # the slot closed at once below publishes (a replica pulling meanwhile publishes too)
            self.published = True
        else:
            try:
                await self._publish()
            except Exception:  # noqa: BLE001 - no merger up yet: the next decide re-publishes
                log.exception("%s: publishing at takeover failed", self.name)
        rec = {"term": term, "why": why, "at": at, "restored_from": self.svc.restored_from,
               "refused_checkpoints": self.svc.refused, "decided_slot": self.svc.decided_slot,
               "updated_slot": self.svc.updated_slot, "restore_s": t1 - t0,
               "publish_s": time.perf_counter() - t1}
        self.takeovers.append(rec)
        log.warning("%s leads term %d (%s): %s", self.name, term, why, rec)
        self._snap()
        if clocked:
            asyncio.ensure_future(self._clock(term))

    def watch(self, term: int) -> bool:
        """Held open by the standby: returns once this actor no longer leads `term`."""
        while self.term == term:
            time.sleep(0.1)
        return False

    def role(self) -> dict:
        return {"name": self.name, "role": self.position, "term": self.term}

    def ready(self) -> bool:
        return True

    def state(self) -> dict:
        """The state as of the last completed step: answered at once, never queued behind a slot."""
        return self.snapshot

    # --- weights ----------------------------------------------------------------------------------
    async def _publish(self, only: set[bytes] | None = None) -> None:
        """One merge per distinct x (on whichever mergers answer); the refs are owned here. `only`:
        merge just these now (the rest on demand: a replica holding the same x only relabels)."""
        async with self._publish_lock:
            need = self.svc.distinct_xs()
            missing = [k for k in need if k not in self.refs and (only is None or k in only)]
            refs = await asyncio.gather(*(self.pool.merged_ref(need[k]) for k in missing))
            self.refs = {**{k: r for k, r in self.refs.items() if k in need}, **dict(zip(missing, refs))}
            self.published = True

    def _assignments(self) -> dict[str, tuple[int, list, list]]:
        """node -> (version, x, [ref to its merged FFNs, or None: not merged yet, a replica that needs
        it asks a merger])."""
        return {node: (a.version, a.x.tolist(), [self.refs.get(x_key(a.x))]) for node, a in self.svc.assign.items()}

    async def _assignments_async(self) -> dict:
        self._check_leader()
        if any(x_key(a.x) not in self.refs for a in self.svc.assign.values()):
            await self._publish()
        return self._assignments()

    def assignments(self) -> dict:
        return self._run(self._assignments_async())

    async def _pull(self, node: str) -> tuple[int, list, list]:
        self._check_leader()
        a = self.svc.assignment(node)
        if x_key(a.x) not in self.refs:
            await self._publish()
        return a.version, a.x.tolist(), [self.refs[x_key(a.x)]]

    def pull(self, node: str) -> tuple[int, list, list]:
        """(version, x, [ref]) of the node's current model: a replica taking the node on."""
        return self._run(self._pull(node))

    # --- driven slots (tanbr simulate --backend ray) -------------------------------------------------
    async def _decide(self, psis, slot):
        async with self._step_lock:
            self._check_leader()
            xs = self.svc.decide(None if psis is None else np.asarray(psis), slot)
            await self._publish()
            self._snap()
            return xs

    def decide(self, psis: list | None = None, slot: int | None = None) -> np.ndarray:
        return self._run(self._decide(psis, slot))

    async def _update(self, feedback, slot):
        async with self._step_lock:
            self._check_leader()
            applied = self.svc.update(feedback, slot)
            self._snap()
            return applied

    def update(self, feedback: list[tuple], slot: int | None = None) -> bool:
        """True if applied, False if this slot was learned from already (a replayed call)."""
        return self._run(self._update(feedback, slot))

    async def _reset(self, policy: str) -> None:
        async with self._step_lock:
            self._check_leader()
            self.svc.reset(policy)
            self.refs = {}
            self._snap()

    def reset(self, policy: str) -> None:
        self._run(self._reset(policy))

    # --- live slots ---------------------------------------------------------------------------------
    def _edge_handles(self) -> dict:
        """The edge deployments' handles; {} until the app exists (replicas pull when they start)."""
        if not self.live:
            raise RuntimeError("close_slot: this decision actor was started without the app's edges")
        if self.edges is None:
            from ray import serve

            if self.live["app"] not in serve.status().applications:
                return {}
            self.edges = {d: serve.get_deployment_handle(d, app_name=self.live["app"]) for d in self.live["edges"]}
        return self.edges

    async def _reports(self, slot: int) -> list[dict]:
        reports = []
        for resp in [h.broadcast("report", slot) for h in self._edge_handles().values()]:
            try:
                reports += [r for r in await resp.results_async(timeout_s=30, return_exceptions=True)
                            if isinstance(r, dict)]
            except Exception as exc:  # noqa: BLE001 - a deployment not up yet reports nothing
                log.warning("reports: %s", exc)
        return reports

    async def _learn(self) -> None:
        """Background learner: score every observed live slot not learned from yet (its replicas'
        reports, kept per slot id here and at the edges; a merger's label-free scores) and apply one
        update per slot id. Scoring runs outside the step lock, so slots keep being decided meanwhile;
        when it falls more than LAG_SLOTS behind, the oldest slots are counted without feedback."""
        term = self.term
        while self.term == term and self.svc.updated_slot < self.svc.observed_slot:
            u = self.svc.updated_slot + 1
            if self.svc.observed_slot - u >= LAG_SLOTS:
                async with self._step_lock:
                    self._check_leader()
                    self.svc.live_learn(u, {})
                    self.unscored_slots += 1
                continue
            reports = self._reports_kept.get(u)
            if reports is None:
                reports = await self._reports(u)
            samples = DecisionService.samples_of(reports)
            t0 = time.time()
            rewards = await self.pool.call("rewards", samples) if samples else {}
            async with self._step_lock:
                self._check_leader()
                self.svc.live_learn(u, rewards)
                self.learn_seconds.append(time.time() - t0)
                self._snap()
        self._reports_kept = {k: v for k, v in self._reports_kept.items() if k > self.svc.updated_slot}

    def _start_learner(self) -> None:
        if self._learner is None or self._learner.done():
            self._learner = asyncio.ensure_future(self._learn())

    async def _close_slot(self, scheduled: float) -> dict:
        """Close the slot being served: what it served feeds the monitors, the next slot is decided,
        merged and pushed; the closed slot (and any a predecessor died before learning from) is then
        scored and learned from in the background, so no decision waits for the scoring."""
        async with self._step_lock:
            self._check_leader()
            s, t0 = self.svc.decided_slot, time.time()
            if s >= 0 and s > self.svc.observed_slot and self.svc.assign:
                self._reports_kept[s] = reports = await self._reports(s)
                self._check_leader()
                self.svc.live_observe(s, reports)
            before = {n: x_key(a.x) for n, a in self.svc.assign.items()}
            self.svc.decide(None, s + 1)  # checkpoints the observation too
            decided = time.time()
            # merge now only what some node did not hold before (after a takeover every node is
            # re-stamped, mostly with the same x: those replicas relabel, nothing to merge)
            await self._publish({x_key(a.x) for n, a in self.svc.assign.items() if before.get(n) != x_key(a.x)})
            assignments = self._assignments()
            self._snap()
        push = await push_async(assignments, self._edge_handles())
        self.last_push = {**vars(push), "slot": s + 1}
        out = vars(push)
        self.ticks.append({"slot": s + 1, "term": self.term, "scheduled": scheduled, "started": t0,
                           "decided": decided, "pushed": time.time(), "push_s": push.seconds,
                           "stale": len(push.stale), "errors": len(push.errors),
                           "versions": {n: v for n, (v, _, _) in assignments.items()}})
        self._start_learner()
        if any(r[0] is None for _, _, r in assignments.values()):
            asyncio.ensure_future(self._publish())  # the rest, for replicas that take a node on later
        self._snap()
        return out

    def close_slot(self) -> dict:
        """Close a slot now (the push benchmark; the clock does this every slot_seconds)."""
        return self._run(self._close_slot(time.time()))

    async def _clock(self, term: int) -> None:
        """Every slot_seconds while leading `term`; the first at once (a new leader decides now)."""
        period, nxt = float(self.live["slot_seconds"]), time.time()
        while self.term == term:
            await asyncio.sleep(max(0.0, nxt - time.time()))
            scheduled, nxt = nxt, nxt + period
            try:
                await self._close_slot(scheduled)
            except NotLeader:
                return
            except Exception:  # noqa: BLE001 - a failed slot must not stop the clock
                log.exception("%s: closing a slot failed", self.name)
            nxt = max(nxt, time.time())  # a slot that overran: the next starts now, not in a burst


def _log_failure(fut) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("decision supervision ended: %r", fut.exception())


def start_decision(spec: dict, meta: dict, fleet: dict, router_name: str, live: dict | None = None,
                   detached: bool = True) -> list:
    """Create (or reuse) the decision actors (a leader, and a standby when there is storage), each in
    its bundle of the router's STRICT_SPREAD placement group on a `tanbr_control` machine, and wait
    until one leads and has published."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tanbr_ray.cluster.decision_client import DecisionClient
    from tanbr_ray.cluster.placement import control_group

    n = RouterSpec(**spec).decision_actors()
    pg = control_group(router_name, n)
    actors = [ray.remote(concurrency_groups={"query": 4, "watch": 4})(_DecisionActor).options(
        name=decision_name(router_name, i), namespace=NAMESPACE, get_if_exists=True,
        lifetime="detached" if detached else None, num_cpus=0, max_concurrency=16, max_restarts=-1,
        max_task_retries=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
    ).remote(spec, meta, fleet, router_name, i, n, live) for i in range(n)]
    ray.get([a.ready.remote() for a in actors])
    DecisionClient(router_name, n).wait_leader()
    return actors


class _DecisionActor(DecisionActor):
    """The actor class Ray runs: queries and watches in their own thread groups, never behind a step."""

    @ray.method(concurrency_group="query")
    def state(self) -> dict:
        return super().state()

    @ray.method(concurrency_group="query")
    def role(self) -> dict:
        return super().role()

    @ray.method(concurrency_group="query")
    def ready(self) -> bool:
        return True

    @ray.method(concurrency_group="watch")
    def watch(self, term: int) -> bool:
        return super().watch(term)
