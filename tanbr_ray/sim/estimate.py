"""What a run will cost, said before it starts: the build (or a cache hit), its size, and its time.

The time comes from this host's measured service time (the merged model's batch-16 latency, which
`costs.host_costs` measures anyway) times the number of predictions the run makes, scaled by
COLD_FACTOR: a cold default run (empty prediction memo; 12 policies, 40 slots, 9 nodes) took 1.3×
that product on a 2-core AVX512-BF16 EPYC, the difference being merges and the regret comparator.
"""

from __future__ import annotations

from dataclasses import dataclass

from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.costs import SERVICE_BATCHES, Costs

COLD_FACTOR = 1.3
# measured builds on 2 CPU cores (seconds): default on an AVX512-BF16 EPYC in bf16, quick in fp32
BUILD_SECONDS = {"default": 665, "quick": 280}


@dataclass(frozen=True)
class Estimate:
    policies: int
    slots: int
    nodes: int
    seeds: int
    scored: int  # exactly scored requests over the run
    memo_entries: int  # predictions the memo holds already
    seconds: float  # cold: nothing in the memo

    def lines(self) -> list[str]:
        out = [f"this run: {self.policies} policies × {self.slots} slots × {self.nodes} nodes × {self.seeds} seed(s) "
               f"= {self.scored:,} scored requests; about {_minutes(self.seconds)} with an empty prediction memo "
               f"(from this host's measured service time)"]
        if self.memo_entries:
            out.append(f"  the prediction memo holds {self.memo_entries:,} predictions of this model: whatever it "
                       "holds is reused (a warm rerun of the default takes well under a minute)")
        return out


def build_line(model: str, cached: bool) -> str:
    if cached:
        return f"model: {model} MoE found in the models cache"
    return (f"model: {model} MoE not in the cache: building it first (about {_minutes(BUILD_SECONDS[model])} on 2 "
            f"CPU cores; once, then reused)" + ("; `tanbr simulate --quick` is the 5-minute look" if model == "default" else ""))


def estimate(cfg: SimConfig, costs: Costs, nodes: int, memo_entries: int = 0) -> Estimate:
    seeds = len(cfg.seed_list())
    scored = len(cfg.policies) * cfg.slots * nodes * cfg.scored_per_slot * seeds
    per_request_s = costs.batch_ms["merged"][SERVICE_BATCHES.index(16)] / 16 / 1e3
    return Estimate(len(cfg.policies), cfg.slots, nodes, seeds, scored, memo_entries, scored * per_request_s * COLD_FACTOR)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
