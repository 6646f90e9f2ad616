"""Simulation config: a scenario, typed and validated, composed as torchtune and Hydra compose theirs.

A config file is merged key by key onto the scenario its `base:` names (`default`, `quick` or another
file, relative to this one; `default` when it names none), so a file holding only `slots: 60` is the
default scenario with 60 slots. `tanbr simulate slots=60 tanbr.tree.rho=0.8` then overrides keys
(values parsed as YAML); unknown keys and out-of-range values fail with the offending field named.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Sequence

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tanbr_ray.fileio import deep_merge, read_yaml_mapping
from tanbr_ray.moe.precision import native_bf16
from tanbr_ray.router import registry
from tanbr_ray.router.tanbr import TanbrConfig
from tanbr_ray.sim.queueing import QueueConfig
from tanbr_ray.sim.workload import SCHEDULES

DEFAULT_CONFIG = Path(__file__).parent / "data" / "simulate_default.yaml"
QUICK_CONFIG = Path(__file__).parent / "data" / "simulate_quick.yaml"


class SimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("simulate", pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field("default", description="default | quick (the built-in MoE) | path/to/pool.yaml (a pool "
                       "of fine-tunes)")
    models_dir: str | None = None
    data_dir: str | None = None
    fleet: str | None = Field(None, description="fleet YAML, or a packaged fleet: default (9 nodes), 8, 32 or 128 "
                              "nodes; None = default")
    slots: int = Field(40, ge=1, le=1_000_000)
    slot_seconds: float = Field(10.0, gt=0.0)
    schedule: str = "stationary"
    switch_every: int | None = Field(None, ge=1)
    pool_per_task: int = Field(400, ge=2, description="dev examples per task requests are drawn from (fewer if the task has fewer)")
    scored_per_slot: int = Field(24, ge=1, le=100_000, description="requests per node-slot scored exactly "
                                 "(rewards, accuracy); the rest are served, queued and monitored, not scored")
    queue: QueueConfig = Field(default_factory=QueueConfig)
    calibration: str = Field("auto", min_length=1, description="service times: auto = the model's calibration on this "
                             "host (written by `tanbr bench fidelity`; else measured here once and stored), measure = "
                             "measure here every run, or a calibration JSON")
    label_fraction: float = Field(1.0, ge=0.0, le=1.0, description="share of requests labelled after the slot")
    label_free: bool = Field(False, description="reward = agreement with the full MoE (top-2) instead of labels")
    credit: Literal["accuracy", "balanced"] = Field(
        "accuracy", description="per-request credit of a classification answer: accuracy = 1 per correct "
        "answer; balanced = a correct answer of class y earns 1/(C p_y), p_y its share of the task's "
        "training labels, so the expected credit is the balanced accuracy (collapsing onto the majority "
        "class earns 1/C, as MCC and F1 would have it)")
    fixed_candidates: int = Field(50, ge=0, le=1000, description="random fixed x tried per node for the best-in-hindsight "
                                  "(besides the ψ-family on the node's true mix)")
    random_points: int = Field(64, ge=0, le=100_000, description="Random plays a uniformly random one of this many "
                               "seeded uniform draws from X (fixed per budget, so their merges are reused; the regret "
                               "comparator's random candidates are the first of them); 0 = a fresh draw every play")
    regret_sample: int = Field(32, ge=0, description="pool examples per task every fixed x is scored on to pick "
                               "each node's best fixed x (weighted by the node's task counts); 0 = the whole pool")
    regret_finalists: int = Field(4, ge=1, le=1000, description="per node, the candidates with the best "
                                  "screened estimate that are then scored on all the node's requests; the one with "
                                  "the most credit there is the best fixed x in hindsight (1 = the screen's pick)")
    policies: list[str] = Field(default_factory=lambda: registry.names("simulation"))
    merge_operator: Literal["linear", "fisher", "regmean"] | None = Field(
        None, description="how every x-policy's x merges the experts; None = the model's own (MoEConfig.merge_operator)")
    tanbr: TanbrConfig = Field(default_factory=TanbrConfig)
    threads: int | None = Field(None, ge=1, description="torch threads; None = torch's default")
    bf16: bool = Field(False, description="nodes serve under bfloat16 autocast: the scored sample, the measured "
                       "batch latency and the cluster's replicas (merged and full-MoE modes score 2.4x faster "
                       "on a CPU with AVX512-BF16; logits move ~1e-3). `auto` (the embedded scenarios): where "
                       "the hardware has bf16 units (`precision.native_bf16`), as the model build chooses")
    seed: int = 0
    seeds: int | list[int] | None = Field(None, description="several runs: a count (seed, seed+1, ...) or a list; "
                                          "results report each policy's mean ± sd and Tanbr's paired differences")
    wandb: Literal["online", "offline", "disabled"] | None = None
    wandb_project: str = Field("tanbr-ray", min_length=1, description="W&B project the runs are logged to")
    out: str = "results/simulate"

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16(cls, v):
        if v == "auto":
            return native_bf16("cuda" if torch.cuda.is_available() else "cpu")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        from tanbr_ray.moe.resolve import check_spec

        return check_spec(v)

    @field_validator("fleet", mode="before")
    @classmethod
    def _fleet_name(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # fleet=32: a packaged fleet

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        if v not in SCHEDULES:
            raise ValueError(f"unknown schedule {v!r}; choose from {', '.join(SCHEDULES)}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if v is None:
            return v
        if isinstance(v, int) and v < 1:
            raise ValueError(f"seeds: need at least one, got {v}")
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError(f"seeds: need a non-empty list of distinct seeds, got {v}")
        return v

    def seed_list(self) -> list[int]:
        if self.seeds is None:
            return [self.seed]
        return list(range(self.seed, self.seed + self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @field_validator("policies")
    @classmethod
    def _policies(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("need at least one policy")
        for name in v:
            registry.info(name, "simulation")
        return v


EMBEDDED = {"default": DEFAULT_CONFIG, "quick": QUICK_CONFIG}


def scenario_path(name: str | Path) -> Path:
    """An embedded scenario by name (`default`, `quick`) or a simulation YAML by path."""
    return EMBEDDED.get(str(name), Path(name))


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Set dotted keys (`a.b.c=value`, value parsed as YAML) in a copy of `raw`."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (e.g. slots=20 or tanbr.tree.rho=0.8)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return out


def scenario_raw(source: str | Path = "default", _inside: tuple[Path, ...] = ()) -> dict:
    """The raw settings of a scenario: an embedded one by name, or a file merged onto its `base`."""
    path = scenario_path(source)
    raw = read_yaml_mapping(path, "simulation config")
    embedded = path in EMBEDDED.values()
    base = raw.pop("base", None if embedded else "default")
    if base is None:
        return raw
    base_path = EMBEDDED.get(str(base)) or (path.parent / str(base))
    if base_path.resolve() in (*_inside, path.resolve()):
        raise ValueError(f"config {path}: base {base!r} includes itself")
    return deep_merge(scenario_raw(base_path, (*_inside, path.resolve())), raw)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SimConfig:
    """A scenario (name or file, composed onto its base) with dotted overrides, validated."""
    source = path or "default"
    try:
        return SimConfig(**apply_overrides(scenario_raw(source), overrides))
    except ValidationError as exc:
        raise ValueError(f"config {scenario_path(source)}: {exc}") from exc
