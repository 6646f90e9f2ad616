"""The cost model of a slot: what serving, pushing and queueing cost on each node class.

Service times are this host's measured batch latency per serving mode, scaled by a node's slowdown,
plus the time to swap in the part of the model that does not fit the node's memory; a push carries
the whole model the first time a node gets one and its merged FFNs after.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from tanbr_ray.moe.infer import interleaved_latency, mode_forward
from tanbr_ray.sim.fleet import NodeClass
from tanbr_ray.sim.queueing import QueueConfig, interpolate_service, simulate_queue
from tanbr_ray.sim.spec import Spec

SERVICE_BATCHES = (1, 4, 16)
MODES = ("merged", "oracle", "top1", "top2", "soft")


@dataclass(frozen=True)
class Costs:
    """Measured on this host: batch compute per serving mode and size, and resident bytes per mode."""

    batch_ms: dict[str, list[float]]  # mode -> ms at SERVICE_BATCHES
    resident: dict[str, int]
    dense_bytes: int
    ffn_bytes: int  # what a weight push carries: the merged FFNs of the MoE layers

    @property
    def compute_ms(self) -> dict[str, float]:
        """Batch-1 compute per mode."""
        return {m: v[0] for m, v in self.batch_ms.items()}

    def swap_s(self, mode: str, node: NodeClass) -> float:
        """Per batch: reading the part of the model that does not fit the node's memory."""
        memory = node.memory_x_dense * self.dense_bytes
        return max(0, self.resident[mode] - memory) / (node.storage_mbps * 1e6 / 8)

    def service(self, mode: str, node: NodeClass) -> Callable[[int], float]:
        """Seconds to serve a batch of b requests of this mode on this node."""
        compute = interpolate_service(list(SERVICE_BATCHES), self.batch_ms[mode])
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
        for (_, cls), arr in zip(nodes, arrivals):
            q = simulate_queue(arr, self.service(mode, cls), queue, end_s=end_s)
            out.append((q.latency_s[~q.dropped] * 1e3 + cls.rtt_ms, q.dropped, q.backlog_end))
        return out


def measure_costs(moe, runs: int = 5, seq_len: int = 64, bf16: bool = False) -> Costs:
    """Batch latency of every serving mode at SERVICE_BATCHES, in the precision the nodes serve in,
    timed round-robin (a load change on a shared host then hits every mode alike)."""
    fns = {(m, b): mode_forward(moe, m, b, seq_len, bf16=bf16) for m in MODES for b in SERVICE_BATCHES}
    timed = interleaved_latency(fns, runs=runs)
    batch_ms = {m: [timed[(m, b)]["p50"] for b in SERVICE_BATCHES] for m in MODES}
    resident = {m: int(moe.resident_bytes(m)) for m in MODES}
    x = np.full(moe.num_experts, 1.0 / moe.num_experts)
    ffn = int(sum(t.numel() * t.element_size() for t in moe.merged_state(x, "linear").values()))
    return Costs(batch_ms, resident, resident["merged"], ffn)


_HOST_COSTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[bool, Costs]]" = weakref.WeakKeyDictionary()


def host_costs(moe, bf16: bool) -> Costs:
    """measure_costs once per model and precision in this process: every seed and policy of a run
    then queues on the same service times, so their latencies differ by their traffic, not by when
    the shared host happened to be busy (separate measurements of one model here varied up to 2.7×)."""
    per_model = _HOST_COSTS.setdefault(moe, {})
    if bf16 not in per_model:
        per_model[bf16] = measure_costs(moe, bf16=bf16)
    return per_model[bf16]
