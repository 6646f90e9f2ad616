"""The cost model of a slot: what serving, pushing and queueing cost on each node class.

Service times come from a calibration (`sim.calibration`): one batch of b real requests per serving
mode on this host's serving path, scaled by a node's slowdown, plus the time to swap in the part of
the model that does not fit the node's memory; each request adds the path's fixed overhead and the
node's RTT. A push carries the whole model the first time a node gets one and its merged FFNs after.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from tanbr_ray.sim.calibration import MODES, Calibration, calibration_for
from tanbr_ray.sim.fleet import NodeClass
from tanbr_ray.sim.queueing import QueueConfig, interpolate_service, simulate_queue, spread_service
from tanbr_ray.sim.spec import Spec


SPREAD_SEED = 7_000  # the service-time draws of node n use SPREAD_SEED + n


@dataclass(frozen=True)
class Costs:
    """This host's serving costs: batch time per mode and size, resident bytes per mode."""

    batch_ms: dict[str, list[float]]  # mode -> ms of a batch of 1..len requests
    resident: dict[str, int]
    dense_bytes: int
    ffn_bytes: int  # what a weight push carries: the merged FFNs of the MoE layers
    overhead_ms: float = 0.0  # per request, outside its batch (the serving path's round trip)
    spread: tuple[float, ...] = ()  # a served batch's time over its size's median, as quantiles
    threads: int | None = None  # torch threads the batch times were measured with
    service_model: str = "measured in-process"  # where batch_ms came from (results.json says it)

    @property
    def compute_ms(self) -> dict[str, float]:
        """Batch-1 compute per mode."""
        return {m: v[0] for m, v in self.batch_ms.items()}

    def swap_s(self, mode: str, node: NodeClass) -> float:
        """Per batch: reading the part of the model that does not fit the node's memory."""
        memory = node.memory_x_dense * self.dense_bytes
        return max(0, self.resident[mode] - memory) / (node.storage_mbps * 1e6 / 8)

    def service(self, mode: str, node: NodeClass, rng: np.random.Generator | None = None) -> Callable[[int], float]:
        """Seconds to serve a batch of b requests of this mode on this node (drawn around the
        calibrated time by its spread when an rng is given)."""
        compute = interpolate_service(list(range(1, len(self.batch_ms[mode]) + 1)), self.batch_ms[mode])
        compute = spread_service(compute, self.spread, rng)
        swap = self.swap_s(mode, node)
        return lambda b: compute(b) * node.slowdown + swap

    def push(self, nodes: Sequence[tuple[str, NodeClass]], held: list[Spec | None], specs: Sequence[Spec],
             mode: str) -> tuple[float, float]:
        """A slot's push over the fleet: (bytes, link seconds summed over nodes). A node whose model
        changes gets the whole model the first time, its merged FFNs after; `held` (each node's
        spec) is brought up to date."""
        nbytes = link_s = 0.0
        for n, (_, cls) in enumerate(nodes):
            if held[n] != specs[n]:
                b = self.resident[mode] if held[n] is None else self.ffn_bytes
                nbytes, link_s = nbytes + b, link_s + b / (cls.bandwidth_mbps * 1e6 / 8)
                held[n] = specs[n]
        return nbytes, link_s

    def queue(self, nodes: Sequence[tuple[str, NodeClass]], arrivals: Sequence[np.ndarray], mode: str,
              queue: QueueConfig, end_s: float) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Per node, over the whole run: (latency ms of served requests, dropped mask, backlog at the
        end) of every request it received (scored or not), through its queue with dynamic batching."""
        out = []
        for n, ((_, cls), arr) in enumerate(zip(nodes, arrivals)):  # node n draws the same batch times for every policy
            q = simulate_queue(arr, self.service(mode, cls, np.random.default_rng(SPREAD_SEED + n)), queue, end_s=end_s)
            out.append((q.latency_s[~q.dropped] * 1e3 + self.overhead_ms + cls.rtt_ms, q.dropped, q.backlog_end))
        return out


def costs_from(moe, cal: Calibration, service_model: str) -> Costs:
    """Costs of this model from a calibration's times and the model's own byte counts."""
    resident = {m: int(moe.resident_bytes(m)) for m in MODES}
    x = np.full(moe.num_experts, 1.0 / moe.num_experts)
    ffn = int(sum(t.numel() * t.element_size() for t in moe.merged_state(x, "linear").values()))
    return Costs({m: cal.batch_ms[m] for m in MODES}, resident, resident["merged"], ffn, cal.overhead_ms,
                 tuple(cal.spread), cal.threads, service_model)


_HOST_COSTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Costs]]" = weakref.WeakKeyDictionary()


def host_costs(moe, bf16: bool, calibration: str = "measure", max_batch: int = 16, data_dir=None) -> Costs:
    """One service model per model, precision and source in this process: every seed and policy of a
    run then queues on the same service times, so their latencies differ by their traffic, not by when
    the shared host happened to be busy (separate measurements of one model here varied up to 2.7×)."""
    per_model = _HOST_COSTS.setdefault(moe, {})
    key = (bf16, calibration, max_batch)
    if key not in per_model:
        cal, where = calibration_for(moe, bf16, calibration, max_batch, data_dir)
        per_model[key] = costs_from(moe, cal, where)
    return per_model[key]
