"""Sweep config: one YAML file naming the base simulation, the search space and how to run it.

Every search-space key is a dotted simulation parameter (`tanbr.tree.rho`, `slot_seconds`), checked on
load by applying its extreme values as overrides to the base simulation config, so a typo or an
out-of-range bound fails before Ray starts, with the file and the parameter named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tanbr_ray.fileio import read_yaml_mapping
from tanbr_ray.sim.config import EMBEDDED, SimConfig, apply_overrides, scenario_raw

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform")
# Reported after every slot, so ASHA can compare trials at any milestone.
METRICS = ("running_score", "slot_score")
# The trainable sets these itself; sweeping them would break the trial (one policy, no nested W&B).
RESERVED = ("policies", "wandb", "out")


class SearchDist(BaseModel):
    """One search dimension: exactly one of choice/grid (a list) or uniform/loguniform ([low, high])."""

    model_config = ConfigDict(extra="forbid")

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: list[float] | None = None
    loguniform: list[float] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchDist":
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one distribution of {', '.join(DISTRIBUTIONS)}; got {given or 'none'}")
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("choice", "grid"):
            if not values:
                raise ValueError(f"{kind}: empty list of values")
        else:
            if len(values) != 2:
                raise ValueError(f"{kind}: expected [low, high], got {values}")
            low, high = values
            if not low < high:
                raise ValueError(f"{kind}: empty range [{low}, {high}] (need low < high)")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def values(self) -> list:
        return getattr(self, self.kind)

    def extremes(self) -> list:
        """Values that must all be valid simulation settings: every listed value, or both bounds."""
        return list(self.values)

    def to_tune(self):
        from ray import tune

        v = self.values
        return {"choice": lambda: tune.choice(v), "grid": lambda: tune.grid_search(v),
                "uniform": lambda: tune.uniform(*v), "loguniform": lambda: tune.loguniform(*v)}[self.kind]()


class AshaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period: int = Field(4, ge=1, description="slots every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0)


class Resources(BaseModel):
    """Per trial; on a cluster Ray packs trials onto nodes by these."""

    model_config = ConfigDict(extra="forbid")

    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)


class WandbSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str = Field("tanbr-ray", min_length=1)
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="None = offline unless a W&B key is configured")


class TuneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("tune", pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field("quick", description="'quick', 'default' or a simulation YAML (relative to this file)")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides of the base config")
    moe_config: str | None = Field(None, description="MoEConfig YAML instead of the base's model preset")
    search_space: dict[str, SearchDist] = Field(min_length=1)
    seeds: list[int] | None = Field(None, min_length=1,
                                    description="replicate every point over these simulation seeds; "
                                                "None = the base seed for all (paired comparison)")
    metric: str = "running_score"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    asha: AshaConfig = Field(default_factory=AshaConfig)
    num_samples: int = Field(1, ge=1, le=100_000, description="samples of the space (grids multiply)")
    max_concurrent: int | None = Field(None, ge=1)
    search_seed: int = Field(0, description="seed of the random search-space sampler")
    resources: Resources = Field(default_factory=Resources)
    num_cpus: int | None = Field(None, ge=1, description="local Ray: CPUs to start with (None = all)")
    address: str | None = Field(None, description="Ray cluster address ('auto' on a head node); None = local")
    storage: str | None = Field(None, description="Ray storage path (shared FS or s3:// on a cluster); "
                                                  "None = the results directory")
    model_source: str | None = Field(None, description="where `tanbr build-moe --publish` put the model: trials "
                                     "on other machines fetch it from there; None = the driver builds or loads it "
                                     "into this machine's cache, and trials elsewhere must find it in theirs")
    out: str | None = Field(None, description="results directory; None = results/tune/<name>")
    wandb: WandbSettings = Field(default_factory=WandbSettings)

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; choose from {', '.join(METRICS)} (reported every slot)")
        return v

    @field_validator("search_space")
    @classmethod
    def _reserved(cls, v: dict[str, SearchDist]) -> dict[str, SearchDist]:
        bad = [k for k in v if k.split(".")[0] in RESERVED or k == "seed"]
        if bad:
            raise ValueError(f"search_space: cannot sweep {bad} (set by the sweep itself; use `seeds` for seeds)")
        return v

    # --- resolved views -------------------------------------------------------------------
    def base_path(self, config_dir: Path) -> Path:
        if self.base in EMBEDDED:
            return EMBEDDED[self.base]
        p = Path(self.base).expanduser()
        return p if p.is_absolute() else config_dir / p

    def results_dir(self) -> Path:
        return Path(self.out or f"results/tune/{self.name}")


def override(key: str, value: Any) -> str:
    """A dotted override whose value survives the YAML parse unchanged (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def base_raw(spec: TuneSpec, config_dir: Path, source: str = "tune config") -> dict:
    """The base simulation config as a plain dict with the spec's overrides applied, validated."""
    path = spec.base_path(config_dir)
    try:
        raw = scenario_raw(path)
    except ValueError as exc:
        raise ValueError(f"{source}: base: {exc}") from exc
    raw = apply_overrides(raw, spec.overrides)
    try:
        SimConfig(**raw)
    except ValidationError as exc:
        raise ValueError(f"{source}: base {path} with overrides {spec.overrides}: {exc}") from exc
    return raw


def check_space(spec: TuneSpec, raw: dict, source: str = "tune config") -> None:
    """Every parameter path must exist in SimConfig and every listed value / bound must be valid there."""
    for key, dist in spec.search_space.items():
        for value in dist.extremes():
            try:
                SimConfig(**apply_overrides(raw, [override(key, value)]))
            except ValidationError as exc:
                errs = exc.errors()
                unknown = any(e["type"] == "extra_forbidden" for e in errs)
                what = "unknown parameter (not a simulation config field)" if unknown else f"value {value!r} invalid"
                detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errs)
                raise ValueError(f"{source}: search_space.{key}: {what}: {detail}") from exc
            except ValueError as exc:
                raise ValueError(f"{source}: search_space.{key}: {exc}") from exc


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(sweep overrides, simulation overrides): a key the sweep file has (`num_samples=4`,
    `asha.grace_period=2`) sets the sweep; any other (`slots=10`, `tanbr.tree.nu=0.02`), or one
    prefixed `sim.` (`sim.name=x`), the simulation every trial runs, as `tanbr simulate` takes it."""
    sweep, sim = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("sim."):
            sim.append(item[len("sim."):].lstrip())
        elif key.split(".")[0] in TuneSpec.model_fields:
            sweep.append(item)
        else:
            sim.append(item)
    return sweep, sim


def load_tune_config(path: str | Path, overrides: list[str] | None = None) -> tuple[TuneSpec, dict]:
    """Read and validate a sweep YAML; returns the spec and the resolved base simulation config.
    `overrides` may set the sweep's keys and the simulation's alike (`split_overrides`)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "tune config")
    sweep, sim = split_overrides(list(overrides or []))
    raw = apply_overrides(raw, sweep)
    if sim:
        raw["overrides"] = [*(raw.get("overrides") or []), *sim]
    try:
        spec = TuneSpec(**raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid tune config: {exc}") from exc
    sim_raw = base_raw(spec, path.parent, str(path))
    check_space(spec, sim_raw, str(path))
    if spec.moe_config is not None:
        from tanbr_ray.moe.config import load_config as load_moe_config

        p = Path(spec.moe_config).expanduser()
        spec.moe_config = str((p if p.is_absolute() else path.parent / p).resolve())
        load_moe_config(spec.moe_config)  # fails early, naming the file
    return spec, sim_raw
