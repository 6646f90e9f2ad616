"""`tanbr bench reliability`: faults under load on the loopback edge service, then malformed input.

While a constant HTTP load runs (fixed concurrency, GLUE texts), faults are injected in turn with
gaps between them: the router actor is killed (Ray restarts it; it restores its newest checkpoint),
killed again with the load held (recovery without CPU contention), an edge replica is killed (Serve replaces it; the new one pulls its node's weights before
serving), and the newest checkpoint is corrupted before the router is killed again (refused, the
previous one is used). Per fault: recovery time (kill to the router answering, and to the next slot
closed, i.e. the first good decision), slots lost, client errors in the fault window and requests the
ingress had to re-send. Then every malformed request and config must be refused (4xx / ValueError)
with the service still answering a good request after each.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import ray

from tanbr_ray.bench.malformed import REQUESTS, config_cases
from tanbr_ray.cluster import faults as fi
from tanbr_ray.cluster.names import NAMESPACE, edge_deployment

WINDOW_S = 10.0  # seconds after a kill during which errors count against that fault


class LoadThread(threading.Thread):
    """Constant-concurrency POST /v1/infer until stopped; every request's (start, end, status)."""

    def __init__(self, url: str, bodies: list[dict], concurrency: int):
        super().__init__(daemon=True)
        self.url, self.bodies, self.concurrency = url, bodies, concurrency
        self.records: list[tuple[float, float, int]] = []  # status 0 = transport error
        self.stop = threading.Event()
        self.quiet = threading.Event()  # set: hold new requests (a fault measured without load)

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(self._worker(client, i) for i in range(self.concurrency)))

    async def _worker(self, client, i: int) -> None:
        k = i
        while not self.stop.is_set():
            if self.quiet.is_set():
                await asyncio.sleep(0.05)
                continue
            body = self.bodies[k % len(self.bodies)]
            k += self.concurrency
            t0 = time.monotonic()
            try:
                status = (await client.post(f"{self.url}/v1/infer", json=body)).status_code
            except httpx.HTTPError:
                status = 0
            self.records.append((t0, time.monotonic(), status))


def _wait_slot_after(url: str, slots: int, timeout_s: float = 120.0) -> float:
    t0 = time.monotonic()
    while httpx.get(f"{url}/healthz", timeout=10).json()["slots_closed"] <= slots:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError("no slot closed after the fault")
        time.sleep(0.1)
    return time.monotonic() - t0


def run_faults(url: str, router_name: str, checkpoint_dir: str, load: LoadThread, gap_s: float) -> list[dict]:
    router = ray.get_actor(router_name, namespace=NAMESPACE)
    out = []
    for action in ("kill_router", "kill_router_quiet", "kill_replica", "corrupt_checkpoint"):
        if action == "kill_router_quiet":
            load.quiet.set()  # the same fault with the host idle: what recovery costs without CPU contention
        time.sleep(gap_s)
        state0 = httpx.get(f"{url}/v1/state", timeout=30).json()
        t_kill = time.monotonic()
        rep = {"fault": action}
        if action == "kill_replica":
            rep.update(fi.kill_replica(edge_deployment("board")))
        else:
            if action == "corrupt_checkpoint":
                rep.update(fi.corrupt_checkpoint(checkpoint_dir))
            rep.update(fi.kill_router(router))
            rep["slots_lost"] = max(0, rep["updated_slot_before"] - rep["updated_slot_after"])
        closed = httpx.get(f"{url}/healthz", timeout=10).json()["slots_closed"]
        rep["seconds_to_next_decision"] = time.monotonic() - t_kill + _wait_slot_after(url, closed)
        load.quiet.clear()
        rep["t_kill"] = t_kill
        rep["resent_before"] = state0.get("requests_resent", 0)
        out.append(rep)
    time.sleep(gap_s)
    resent_end = httpx.get(f"{url}/v1/state", timeout=30).json().get("requests_resent", 0)
    for i, rep in enumerate(out):
        nxt = out[i + 1]["resent_before"] if i + 1 < len(out) else resent_end
        rep["requests_resent"] = nxt - rep.pop("resent_before")
    return out


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
    return {"requests": len(REQUESTS), "refused_4xx": refused, "5xx": fivexx, "good_request_after_each": good_after,
            "examples": examples, "configs": len(cfg_msgs), "configs_refused": cfg_refused, "config_errors": cfg_msgs}


def load_summary(load: LoadThread, fault_reports: list[dict]) -> dict:
    rec = np.asarray(load.records) if load.records else np.zeros((0, 3))
    ok = rec[:, 2] == 200
    lat = (rec[ok, 1] - rec[ok, 0]) * 1e3
    in_window = np.zeros(len(rec), dtype=bool)
    for rep in fault_reports:
        w = (rec[:, 1] >= rep["t_kill"]) & (rec[:, 0] <= rep["t_kill"] + WINDOW_S)
        rep["requests_in_window"] = int(w.sum())
        rep["client_errors_in_window"] = int((w & ~ok).sum())
        in_window |= w
    for rep in fault_reports:
        rep.pop("t_kill")
    wall = float(rec[:, 1].max() - rec[:, 0].min()) if len(rec) else 0.0
    return {"requests": int(len(rec)), "concurrency": load.concurrency, "errors": int((~ok).sum()),
            "errors_outside_fault_windows": int((~ok & ~in_window).sum()),
            "statuses": {str(int(s)): int((rec[:, 2] == s).sum()) for s in np.unique(rec[:, 2])},
            "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "latency_ms_p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "requests_per_second": len(rec) / wall if wall else 0.0}


def plot_timeline(load: LoadThread, fault_reports: list[dict], path: str | Path) -> None:
    """Request latency over time (errors in red) with each fault marked: what recovery looks like."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = np.asarray(load.records) if load.records else np.zeros((0, 3))
    t0 = rec[:, 0].min() if len(rec) else 0.0
    ok = rec[:, 2] == 200
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.scatter(rec[ok, 0] - t0, (rec[ok, 1] - rec[ok, 0]) * 1e3, s=4, alpha=0.5, label="request (200)")
    if (~ok).any():
        ax.scatter(rec[~ok, 0] - t0, (rec[~ok, 1] - rec[~ok, 0]) * 1e3, s=12, color="red", label="error")
    for rep in fault_reports:
        x = rep["t_kill"] - t0
        ax.axvline(x, color="black", linestyle="--", linewidth=1)
        ax.text(x, ax.get_ylim()[1] * 0.95, f" {rep['fault']}", rotation=90, va="top", fontsize=8)
    ax.set(xlabel="seconds since the load started", ylabel="latency ms", yscale="log",
           title="HTTP load through faults (loopback)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
