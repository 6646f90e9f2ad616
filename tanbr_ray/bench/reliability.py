"""`tanbr bench reliability`: faults under load on the loopback edge service, then malformed input.

While a constant HTTP load runs (fixed concurrency, GLUE texts), faults are injected in turn with
gaps between them: the decision leader is killed (the standby takes over; Ray restarts the dead one
as the new standby), a merger is killed (the other merges), the leader and then its successor are
killed `pair_gap_s` apart (two takeovers), an edge replica is killed (Serve replaces it; the new one
pulls its node's weights before serving), the newest checkpoint is corrupted before the leader is
killed (refused, the previous one is used), and last the leader's whole machine is lost (its raylet
killed, its local directory removed: the standby on the other control machine restores from storage,
as on a cluster with no shared disk). Per fault:

- kill -> next decision: the first slot a leader decided after the kill (its own timestamp);
- kill -> first served at a new version: the first HTTP answer carrying a version issued after the kill;
- slots lost: updates a successor did not find in the checkpoints (slot ids done before the kill);
- weights late: per slot, the last replica's ack minus the slot's scheduled start, worst in the window;
- client errors inside the fault's window (WINDOW_S after each kill) and outside it (up to the next fault).

Then every malformed request and config must be refused (4xx / ValueError) with the service still
answering a good request after each.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from tanbr_ray.bench.malformed import REQUESTS, config_cases
from tanbr_ray.cluster import faults as fi
from tanbr_ray.cluster.decision_client import DecisionClient
from tanbr_ray.cluster.names import edge_deployment

WINDOW_S = 10.0  # seconds after a kill during which errors count against that fault
FAULTS = ("kill leader under load", "kill merger under load", "kill leader and standby 20 s apart",
          "kill edge replica under load", "corrupt checkpoint + kill leader",
          "lose leader machine under load")  # last: the cluster has one control machine fewer after it
ROW = ("name", "kill_to_next_decision_s", "kill_to_first_served_s", "slots_lost", "errors_in_window",
       "errors_outside_window")


class LoadThread(threading.Thread):
    """Constant-concurrency POST /v1/infer until stopped; every request's (start, end, status,
    model_version, node index) in wall-clock seconds (the decision actors' timestamps are wall-clock
    too)."""

    def __init__(self, url: str, bodies: list[dict], concurrency: int):
        super().__init__(daemon=True)
        self.url, self.bodies, self.concurrency = url, bodies, concurrency
        self.records: list[tuple[float, float, int, int, int]] = []  # status 0 = transport error; -1 = none
        self.node_ids: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(self._worker(client, i) for i in range(self.concurrency)))

    async def _worker(self, client, i: int) -> None:
        k = i
        while not self.stop.is_set():
            body = self.bodies[k % len(self.bodies)]
            k += self.concurrency
            t0, version, node = time.time(), -1, -1
            try:
                r = await client.post(f"{self.url}/v1/infer", json=body)
                status = r.status_code
                if status == 200:
                    out = r.json()
                    version = int(out.get("model_version", -1))
                    node = self.node_ids.setdefault(str(out.get("node")), len(self.node_ids))
            except (httpx.HTTPError, ValueError):
                status = 0
            self.records.append((t0, time.time(), status, version, node))


def _leader(client: DecisionClient, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (st := client.state(timeout_s=2.0)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError("no decision leader")
        time.sleep(0.05)
    return st


def _next_decision(client: DecisionClient, after: float, timeout_s: float = 120.0) -> dict:
    """The first slot tick a leader decided after wall time `after` (polling the leader's tick log)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.state(timeout_s=2.0)
        ticks = [t for t in (st or {}).get("ticks", []) if t["decided"] > after]
        if ticks:
            return min(ticks, key=lambda t: t["decided"])
        if time.monotonic() > deadline:
            raise TimeoutError(f"no slot decided within {timeout_s:.0f} s of the fault")
        time.sleep(0.05)


def _kill(action: str, client: DecisionClient, router_name: str, storage: str) -> dict:
    """One kill; what the bench needs to measure it afterwards."""
    before = _leader(client)
    if action == "merger":
        rep = fi.kill_merger(router_name, 0)
    elif action == "replica":
        rep = fi.kill_replica(edge_deployment("board"))
    elif action == "machine":
        rep = fi.lose_leader_machine(client, wait=False)
    else:
        if action == "corrupt":
            rep = fi.corrupt_checkpoint(storage)
            rep.update(fi.kill_leader(client, wait=False))
        else:
            rep = fi.kill_leader(client, wait=False)
    t = rep["t_kill_wall"]
    tick = _next_decision(client, t)
    rep.update({"t_kill": t, "version_before": before["version"], "updated_slot_before": before["updated_slot"],
                "leader_before": before["name"], "kill_to_next_decision_s": tick["decided"] - t,
                "next_decided_slot": tick["slot"], "next_versions": tick["versions"]})
    return rep


def run_faults(url: str, router_name: str, decision_actors: int, storage: str, load: LoadThread,
               gap_s: float, pair_gap_s: float = 20.0) -> list[dict]:
    """Inject FAULTS in turn; per fault the kills made (measured after the run by `summarize_faults`)."""
    client = DecisionClient(router_name, decision_actors)
    plan = {FAULTS[0]: ["leader"], FAULTS[1]: ["merger"], FAULTS[2]: ["leader", "leader"],
            FAULTS[3]: ["replica"], FAULTS[4]: ["corrupt"], FAULTS[5]: ["machine"]}
    out = []
    for name, kills in plan.items():
        time.sleep(gap_s)
        fault = {"name": name, "kills": []}
        for i, action in enumerate(kills):
            if i:
                time.sleep(max(0.0, fault["kills"][0]["t_kill"] + pair_gap_s - time.time()))
            fault["kills"].append(_kill(action, client, router_name, storage))
        # the slot log lives in the actors (a killed one loses its own): read it once the window is over
        time.sleep(max(0.0, fault["kills"][-1]["t_kill"] + WINDOW_S - time.time()))
        states = client.states()
        fault["takeovers"] = sorted((t for s in states for t in s["takeovers"]), key=lambda t: t["at"])
        fault["ticks"] = sorted((t for s in states for t in s["ticks"]), key=lambda t: t["scheduled"])
        out.append(fault)
    time.sleep(gap_s)
    final = _leader(client)
    out.append({"final_state": {k: final[k] for k in ("name", "term", "slot", "updated_slot", "decided_slot",
                                                       "version", "merger_failovers")}})
    return out


def summarize_faults(load: LoadThread, raw: list[dict], slot_seconds: float) -> list[dict]:
    """One row per fault with the fields of ROW, plus details."""
    rec = np.asarray(load.records) if load.records else np.zeros((0, 5))
    faults = [f for f in raw if "name" in f]
    rows = []
    for i, f in enumerate(faults):
        kills = f["kills"]
        t_first = kills[0]["t_kill"]
        t_next = faults[i + 1]["kills"][0]["t_kill"] if i + 1 < len(faults) else np.inf
        ok = rec[:, 2] == 200
        in_win = np.zeros(len(rec), dtype=bool)
        served, lost = [], 0
        for k in kills:
            t = k["t_kill"]
            in_win |= (rec[:, 1] >= t) & (rec[:, 0] <= t + WINDOW_S)
            # served at the next decision's version: a node's answer carrying at least what it assigned
            need = np.full(len(rec), np.inf)
            for node, idx in load.node_ids.items():
                need[rec[:, 4] == idx] = k["next_versions"].get(node, np.inf)
            new = ok & (rec[:, 1] >= t) & (rec[:, 3] >= need)
            served.append(float(rec[new, 1].min() - t) if new.any() else float("nan"))
            for tk in f["takeovers"]:
                if t <= tk["at"] < t + 60 and tk["at"] < t_next:
                    lost += max(0, k["updated_slot_before"] - tk["updated_slot"])
                    k.setdefault("takeover", tk)
        seg = (rec[:, 1] >= t_first) & (rec[:, 0] < t_next)
        late = [tk["pushed"] - tk["scheduled"] for tk in f["ticks"]
                if any(k["t_kill"] - slot_seconds <= tk["scheduled"] <= k["t_kill"] + WINDOW_S for k in kills)]
        rows.append({
            "name": f["name"],
            "kill_to_next_decision_s": float(max(k["kill_to_next_decision_s"] for k in kills)),
            "kill_to_first_served_s": float(np.max(served)),
            "slots_lost": int(lost),
            "errors_in_window": int((seg & in_win & ~ok).sum()),
            "errors_outside_window": int((seg & ~in_win & ~ok).sum()),
            "requests_in_window": int((seg & in_win).sum()),
            "weights_late_max_s": float(max(late)) if late else float("nan"),
            "kills": [{k2: v for k2, v in k.items() if k2 not in ("takeovers", "ticks")} for k in kills],
        })
    return rows


def weights_lateness(ticks: list[dict]) -> dict:
    late = np.asarray([t["pushed"] - t["scheduled"] for t in ticks]) if ticks else np.zeros(1)
    return {"slots": len(ticks), "p50_s": float(np.percentile(late, 50)), "max_s": float(late.max())}


def malformed(url: str, tmp: Path) -> dict:
    refused, fivexx, good_after, examples = 0, 0, 0, []
    with httpx.Client(timeout=30) as c:
        for name, body, ctype in REQUESTS:
            r = c.post(f"{url}/v1/infer", content=body, headers={"Content-Type": ctype})
            refused += 400 <= r.status_code < 500
            fivexx += r.status_code >= 500
            examples.append((name, r.status_code, r.json().get("error", "")[:100] if r.content else ""))
            good_after += c.post(f"{url}/v1/infer", json={"text_a": "a fine film", "head": "SST-2"}).status_code == 200
    cfg_refused, cfg_msgs = 0, []
    tmp.mkdir(parents=True, exist_ok=True)
    for name, call in config_cases(tmp):
        try:
            call()
            cfg_msgs.append((name, "ACCEPTED"))
        except ValueError as exc:
            cfg_refused += 1
            cfg_msgs.append((name, str(exc).splitlines()[0][:140]))
    return {"sent": len(REQUESTS), "4xx": refused, "5xx": fivexx, "good_request_after_each": good_after,
            "examples": examples, "configs": len(cfg_msgs), "configs_refused": cfg_refused, "config_errors": cfg_msgs}


def load_summary(load: LoadThread, raw: list[dict]) -> dict:
    rec = np.asarray(load.records) if load.records else np.zeros((0, 5))
    ok = rec[:, 2] == 200
    lat = (rec[ok, 1] - rec[ok, 0]) * 1e3
    in_window = np.zeros(len(rec), dtype=bool)
    for f in raw:
        for k in f.get("kills", []):
            in_window |= (rec[:, 1] >= k["t_kill"]) & (rec[:, 0] <= k["t_kill"] + WINDOW_S)
    wall = float(rec[:, 1].max() - rec[:, 0].min()) if len(rec) else 0.0
    return {"requests": int(len(rec)), "concurrency": load.concurrency, "errors": int((~ok).sum()),
            "errors_outside_fault_windows": int((~ok & ~in_window).sum()),
            "statuses": {str(int(s)): int((rec[:, 2] == s).sum()) for s in np.unique(rec[:, 2])},
            "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "latency_ms_p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "requests_per_second": len(rec) / wall if wall else 0.0}


def plot_timeline(load: LoadThread, raw: list[dict], path: str | Path) -> None:
    """Request latency over time (errors in red) with each kill marked: what recovery looks like."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = np.asarray(load.records) if load.records else np.zeros((0, 5))
    t0 = rec[:, 0].min() if len(rec) else 0.0
    ok = rec[:, 2] == 200
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.scatter(rec[ok, 0] - t0, (rec[ok, 1] - rec[ok, 0]) * 1e3, s=4, alpha=0.5, label="request (200)")
    if (~ok).any():
        ax.scatter(rec[~ok, 0] - t0, (rec[~ok, 1] - rec[~ok, 0]) * 1e3, s=12, color="red", label="error")
    ax.set(xlabel="seconds since the load started", ylabel="latency ms", yscale="log",
           title="HTTP load through faults (loopback, concurrency %d)" % load.concurrency)
    top = ax.get_ylim()[1]
    for f in raw:
        for k in f.get("kills", []):
            x = k["t_kill"] - t0
            ax.axvline(x, color="black", linestyle="--", linewidth=1)
            ax.text(x, top * 0.9, f" {f['name']}", rotation=90, va="top", fontsize=7)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
