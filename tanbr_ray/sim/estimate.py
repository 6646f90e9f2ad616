"""What a run will cost, said before it starts: the build (or a cache hit), its size, and its time.

The time comes from this host's measured costs: the merged model's batch-16 service time (from the
run's calibration, scaled to the run's torch threads) per scored request, and one timed merge for every
MERGE_SHARE of the node-slots a merging policy plays (in a cold default run, 12 policies × 40
slots × 9 nodes on a 2-core AVX512-BF16 EPYC, the two terms add up to its 469 s).
"""

from __future__ import annotations

from dataclasses import dataclass

from tanbr_ray.router import registry
from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.costs import Costs

MERGE_SHARE = 0.25  # of a merging policy's node-slots, those that need a merge not made before
# measured builds on 2 CPU cores (seconds): default on an AVX512-BF16 EPYC in bf16, quick in fp32
BUILD_SECONDS = {"default": 665, "quick": 210}


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
               f"≈ {self.scored:,} scored requests; about {_minutes(self.seconds)} with an empty prediction memo "
               f"(from this host's measured service and merge times)"]
        if self.memo_entries:
            out.append(f"  the prediction memo holds {self.memo_entries:,} predictions of this model: whatever it "
                       "holds is reused (a warm rerun of the default takes well under a minute)")
        return out


def build_line(model: str, cached: bool | None) -> str:
    if cached is None:
        return f"model: {model} (a pool of fine-tunes: reused from the models cache, or built on first use)"
    if cached:
        return f"model: {model} MoE found in the models cache"
    return (f"model: {model} MoE not in the cache: building it first (about {_minutes(BUILD_SECONDS[model])} on 2 "
            f"CPU cores; once, then reused)" + ("; `tanbr simulate --quick` is the 5-minute look" if model == "default" else ""))


def estimate(cfg: SimConfig, costs: Costs, rates: list[float], merge_s: float, memo_entries: int = 0,
             threads: int | None = None) -> Estimate:
    """`rates`: each node's requests per second (a node-slot scores at most what it receives);
    `merge_s`: one merge by the run's operator, timed on this host; `threads`: the run's torch threads."""
    seeds = len(cfg.seed_list())
    per_slot = sum(min(cfg.scored_per_slot, r * cfg.slot_seconds) for r in rates)
    scored = int(round(len(cfg.policies) * cfg.slots * per_slot * seeds))
    full = costs.batch_ms["merged"]
    # scored in full batches, on this process's threads (a replica's calibration may use fewer)
    per_request_s = full[-1] / len(full) / 1e3 * (costs.threads or 1) / (threads or costs.threads or 1)
    merging = sum(registry.POLICIES[p].picks_x for p in cfg.policies) * cfg.slots * len(rates) * seeds
    seconds = scored * per_request_s + merging * MERGE_SHARE * merge_s
    return Estimate(len(cfg.policies), cfg.slots, len(rates), seeds, scored, memo_entries, seconds)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
