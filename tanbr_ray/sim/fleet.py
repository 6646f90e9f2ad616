"""Edge fleet: node classes from YAML, scaled to the model being simulated.

Memory budgets are stated relative to the dense (merged) model's size: the default fleet is a scale
model of a large MoE on real edge hardware, where a small board holds ~1.5x the dense model (so the
full MoE does not fit and experts must be swapped in from storage), a gateway ~2.5x, and a
micro-datacenter everything. Compute slowdown is relative to the host running the simulation.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tanbr_ray.fileio import read_yaml_mapping

DEFAULT_FLEET = Path(__file__).parent / "data" / "fleet_default.yaml"
PACKAGED = ("default", "8", "32", "128")  # fleet_<name>.yaml beside the default: the scale benchmark's fleets


def fleet_path(spec: str | Path | None) -> Path:
    """A fleet YAML from a path or a packaged fleet's name (default, 8, 32, 128 nodes)."""
    if spec is None:
        return DEFAULT_FLEET
    if str(spec) in PACKAGED:
        return DEFAULT_FLEET.with_name(f"fleet_{spec}.yaml")
    return Path(spec)


class NodeClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    count: int = Field(ge=1, le=10_000, description="nodes of this class")
    slowdown: float = Field(gt=0.0, le=1000.0, description="compute time relative to this host")
    memory_x_dense: float = Field(gt=0.0, le=1000.0, description="memory budget, in dense-model sizes")
    bandwidth_mbps: float = Field(gt=0.0, description="link bandwidth for weight pushes and payloads")
    rtt_ms: float = Field(ge=0.0, le=10_000.0)
    storage_mbps: float = Field(400.0, gt=0.0, description="read rate for swapping experts in")
    budget: int | None = Field(None, ge=1, description="B: experts with non-zero merging weight; None = all K "
                               "(the router merges and pushes one FFN, so B limits a node only if it merges itself)")
    rate: float = Field(gt=0.0, le=1e6, description="mean requests per second (Poisson)")
    mix: dict[str, float] | None = Field(None, description="the class's task mix (else drawn per node)")
    replica_cpus: float = Field(0.25, gt=0.0, le=256.0, description="Ray CPUs per Serve replica of this class")
    replica_memory_mb: int | None = Field(None, ge=64, description="Ray memory reservation per replica")
    replica_gpus: float = Field(0.0, ge=0.0, le=8.0, description="Ray GPUs per Serve replica of this class "
                                "(fractions allowed); the replica serves on the GPU it is given")

    @field_validator("mix")
    @classmethod
    def _distribution(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if not v or any(p < 0 for p in v.values()) or abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"mix must be a task distribution (non-negative, summing to 1), got {v}")
        return v


class Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: list[NodeClass] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Fleet":
        if sum(c.count for c in self.classes) < 1:
            raise ValueError("classes: the fleet has no nodes")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"classes: duplicate class names in {names}")
        return self

    def nodes(self) -> list[tuple[str, NodeClass]]:
        """(node name, class) for every node, e.g. ('board-0', NodeClass(...))."""
        return [(f"{c.name}-{i}", c) for c in self.classes for i in range(c.count)]

    def check_model(self, num_experts: int, tasks: list[str]) -> None:
        """Budgets and mixes must fit the model being simulated."""
        for c in self.classes:
            if c.budget is not None and c.budget > num_experts:
                raise ValueError(f"fleet: class {c.name!r} has budget {c.budget} > {num_experts} experts")
            unknown = sorted(set(c.mix or {}) - set(tasks))
            if unknown:
                raise ValueError(f"fleet: class {c.name!r} mix names tasks {unknown} the model lacks ({tasks})")


def load_fleet(path: str | Path | None = None) -> Fleet:
    """Read and validate a fleet YAML (a path or a packaged name, `fleet_path`); errors name the file
    and the field."""
    path = fleet_path(path)
    raw = read_yaml_mapping(path, "fleet")
    try:
        return Fleet(**raw)
    except ValidationError as exc:
        raise ValueError(f"fleet {path}: {exc}") from exc
