"""A pool of task fine-tunes as the model (`model: path/to/pool.yaml`): a base checkpoint and one
fine-tuned `*ForSequenceClassification` checkpoint of it per task. Validated on load; paths are
relative to the YAML's folder; the error names the file and the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tanbr_ray.fileio import read_yaml_mapping
from tanbr_ray.moe.config import GLUE_TASKS


class TaskData(BaseModel):
    """A task's own rows (a task beyond GLUE): local JSON/JSONL/CSV files, or a `datasets` hub id whose
    splits `train` and `dev` name; `text` (and `text_b` for pairs) and `label` (class indices) name fields."""

    model_config = ConfigDict(extra="forbid")

    train: str = Field(min_length=1)
    dev: str = Field(min_length=1)
    text: str = Field(min_length=1)
    text_b: str | None = None
    label: str = "label"
    hub: str | None = None
    hub_config: str | None = None


class PoolExpert(BaseModel):
    """One fine-tune: the task it was tuned on and its checkpoint (a local folder or a hub id). For a
    native MoE, the task's `*ForSequenceClassification` checkpoint of the MoE (its head is the task's)."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    checkpoint: str = Field(min_length=1)
    data: TaskData | None = Field(None, description="a task beyond GLUE: its rows (GLUE tasks read the GLUE copy)")
    metric: Literal["accuracy", "f1", "matthews"] = Field("accuracy", description="a task beyond GLUE: its score")

    @model_validator(mode="after")
    def _known(self) -> "PoolExpert":
        if self.task in GLUE_TASKS and self.data is not None:
            raise ValueError(f"task {self.task}: a GLUE task reads the GLUE copy; give your own data another name")
        if self.task not in GLUE_TASKS and self.data is None:
            raise ValueError(f"task {self.task!r}: not a GLUE task ({GLUE_TASKS}), so it needs `data:` (its rows)")
        return self


def _native_bf16() -> bool:
    from tanbr_ray.moe.config import resolve_device
    from tanbr_ray.moe.precision import native_bf16

    return native_bf16(resolve_device("auto"))


class PoolBuild(BaseModel):
    """What the pool build computes (no expert training: the experts are the fine-tunes' MLPs)."""

    model_config = ConfigDict(extra="forbid")

    router_examples: int = Field(200, ge=1, description="per task, for the token router (top-k, soft)")
    router_steps: int = Field(600, ge=1)
    router_batch: int = Field(4096, ge=1, description="tokens per router step")
    router_lr: float = Field(1e-2, gt=0, le=1)
    adapt_steps: int = Field(120, ge=0, description="merge-aware adaptation (norms + merged-mode heads under "
                             "random merges); 0 = off")
    adapt_lr: float = Field(5e-4, gt=0, le=1)
    fisher_examples: int = Field(64, ge=1, description="per task")
    regmean_examples: int = Field(256, ge=1, description="per task: Grams of the experts and of the shared part")
    batch_size: int = Field(16, ge=1)
    bf16: bool = Field(default_factory=lambda: _native_bf16(), description="compute the router, statistics and "
                       "adaptation under bfloat16 autocast (Grams stay fp32); default: where the hardware has bf16 units")
    seed: int = 0


class PoolConfig(BaseModel):
    """Everything that determines a built pool; with the checkpoints' and data's content hashes it
    names the cache directory."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["pool", "native"] = Field("pool", description="pool: K fine-tunes of one dense base, their MLPs "
                                            "the experts; native: a MoE checkpoint (Mixtral), its own experts")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field(min_length=1, description="pool: the checkpoint every expert was fine-tuned from; native: the MoE")
    tokenizer: str | None = Field(None, description="a tokenizer folder; default: the base checkpoint's")
    parts: str | None = Field(None, description="a safetensors file of the parts no single fine-tune holds "
                              "(router, dense and adapted heads, adapted norms, statistics), as `tanbr export-pool` "
                              "writes it; the build then computes none of them")
    experts: list[PoolExpert] = Field(min_length=1)
    shared_merge: Literal["regmean", "average"] = Field(
        "regmean", description="how everything but the MLPs (embeddings, attention, norms) is merged once")
    moe_layers: list[int] | None = Field(None, description="layers whose MLP becomes experts; None = all")
    budget: int | None = Field(None, ge=1)
    merge_operator: Literal["linear", "fisher", "regmean"] = "linear"
    regmean_alpha: float = Field(0.9, ge=0, le=1)
    max_len_single: int = Field(64, ge=4, le=4096)
    max_len_pair: int = Field(128, ge=4, le=4096)
    build: PoolBuild = Field(default_factory=PoolBuild)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")

    @model_validator(mode="after")
    def _check(self) -> "PoolConfig":
        tasks = [e.task for e in self.experts]
        if self.kind == "pool" and len(tasks) < 2:
            raise ValueError("experts: a pool needs at least 2 fine-tunes")
        heads = [t.replace("-", "_") for t in tasks]
        dup = sorted({t for t, h in zip(tasks, heads) if heads.count(h) > 1})
        if dup:
            raise ValueError(f"experts: task(s) {dup} listed twice (or equal up to - and _); one fine-tune per task")
        if self.kind == "pool" and self.budget is not None and self.budget > len(tasks):
            raise ValueError(f"budget: {self.budget} exceeds the number of experts {len(tasks)}")
        return self

    @property
    def tasks(self) -> list[str]:
        return [e.task for e in self.experts]


def is_pool_spec(spec: str) -> bool:
    """A `model:` value naming a YAML file (anything else is a built-in preset)."""
    return str(spec).endswith((".yaml", ".yml"))


def _resolve(ref: str, root: Path) -> str:
    """A relative path against the YAML's folder; a hub id (no such folder) is kept as written."""
    p = Path(os.path.expanduser(ref))
    cand = p if p.is_absolute() else root / p
    return str(cand.resolve()) if cand.exists() or ref.startswith((".", "/", "~")) else ref


def load_pool_config(path: str | os.PathLike) -> PoolConfig:
    p = Path(path)
    raw = read_yaml_mapping(p, "pool config")
    if raw.get("kind", "pool") == "native" and "tasks" in raw:  # a native MoE lists its tasks' heads
        raw = {**{k: v for k, v in raw.items() if k != "tasks"}, "experts": raw["tasks"]}
    try:
        cfg = PoolConfig(**raw)
    except ValueError as e:
        raise ValueError(f"{p}: invalid pool config: {e}") from e
    root = p.resolve().parent
    return cfg.model_copy(update={
        "base": _resolve(cfg.base, root),
        "tokenizer": None if cfg.tokenizer is None else _resolve(cfg.tokenizer, root),
        "parts": None if cfg.parts is None else str((root / cfg.parts).resolve()),
        "experts": [e.model_copy(update={"checkpoint": _resolve(e.checkpoint, root), "data": _data_paths(e.data, root)})
                    for e in cfg.experts]})


def _data_paths(data: TaskData | None, root: Path) -> TaskData | None:
    if data is None or data.hub is not None:
        return data
    return data.model_copy(update={k: str((root / Path(getattr(data, k)).expanduser()).resolve())
                                   for k in ("train", "dev")})


def register_tasks(cfg: PoolConfig, num_labels: dict[str, int]) -> None:
    """Make the pool's tasks beyond GLUE known in this process (their label counts: the checkpoints')."""
    from tanbr_ray.moe.data import TaskSource, register_task

    for e in cfg.experts:
        if e.data is not None:
            d = e.data
            register_task(TaskSource(e.task, int(num_labels[e.task]), e.metric, d.train, d.dev, d.text, d.label,
                                     d.text_b, d.hub, d.hub_config))
