"""Calibrated service times: what one batch of b requests (b = 1..max_batch) costs on the serving
path, per serving mode, and the fixed per-request overhead around it (handle or HTTP round trip).

`tanbr bench fidelity` measures both inside a real Serve replica and writes them here
(`calibration-<fp32|bf16>.json` beside the model in its cache); without one the simulator measures
the batch times in-process, through the same code (`moe.serving`), with no overhead term. A
calibration is refused, with the reason, when it is corrupt or comes from another host, model,
precision or batch limit: the simulator then measures its own and leaves the file as it is.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import warnings
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tanbr_ray.fileio import atomic_write_json, read_json

MODES = ("merged", "oracle", "top1", "top2", "soft")
ITEMS_SEED = 1  # the calibration's dev rows; the pool uses seed 0 and the fidelity traces their own
ITEMS_PER_TASK = 32


class CalibrationError(ValueError):
    """A calibration the simulator cannot use (the message says why)."""


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: dict[str, str | int] = Field(description="where it was measured (host_identity)")
    bf16: bool
    model_sha256: str
    max_batch: int = Field(ge=1, le=4096)
    batch_ms: dict[str, list[float]] = Field(description="mode -> p50 ms of one batch of 1..max_batch requests")
    overhead_ms: float = Field(0.0, ge=0.0, description="per request, outside the batch (round trip)")
    spread: list[float] = Field(default_factory=list, description="quantiles (0, 5, …, 100 %) of a served batch's "
                                "time over its size's median; empty = every batch of a size takes its median")
    source: str = Field(description="'serve replica' or 'in-process'")
    threads: int = Field(ge=1, description="torch threads of the process that served the batches")
    runs: int = Field(ge=1)
    date: str = ""

    @model_validator(mode="after")
    def _shape(self) -> "Calibration":
        for mode, ms in self.batch_ms.items():
            if len(ms) != self.max_batch or not all(np.isfinite(ms)) or min(ms) <= 0:
                raise ValueError(f"batch_ms.{mode}: needs {self.max_batch} positive times (batch 1..{self.max_batch})")
        return self


def host_identity() -> dict[str, str | int]:
    """What makes timings comparable: the CPU model and count, the accelerator, torch's version."""
    import torch

    from tanbr_ray.provenance import _cpu

    return {"cpu": _cpu()[0], "cpu_count": os.cpu_count() or 0, "machine": platform.machine(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__}


def calibration_path(model_dir, bf16: bool) -> Path:
    """Where a model's calibration for one precision lives: beside the model in its cache folder."""
    return Path(model_dir) / f"calibration-{'bf16' if bf16 else 'fp32'}.json"


def load_calibration(path, model_sha256: str, bf16: bool, max_batch: int) -> Calibration:
    """A calibration that fits this host, model, precision and batch limit, else CalibrationError."""
    try:
        cal = Calibration(**read_json(path, "calibration"))
    except ValidationError as exc:
        raise CalibrationError(f"calibration {path}: not a calibration ({exc.errors()[0]['loc']}: "
                               f"{exc.errors()[0]['msg']})") from exc
    except ValueError as exc:
        raise CalibrationError(str(exc)) from exc
    here = host_identity()
    if cal.host != here:
        diff = {k: (cal.host.get(k), v) for k, v in here.items() if cal.host.get(k) != v}
        raise CalibrationError(f"calibration {path}: measured on another host ({diff}, theirs → this one)")
    for what, theirs, ours in (("model", cal.model_sha256, model_sha256), ("bf16", cal.bf16, bf16)):
        if theirs != ours:
            raise CalibrationError(f"calibration {path}: {what} {theirs!r}, this run's is {ours!r}")
    if cal.max_batch < max_batch:
        raise CalibrationError(f"calibration {path}: batches up to {cal.max_batch}, the queue's max_batch is {max_batch}")
    missing = set(MODES) - set(cal.batch_ms)
    if missing:
        raise CalibrationError(f"calibration {path}: no times for modes {sorted(missing)}")
    return cal


def calibration_items(tasks, data_dir=None, per_task: int = ITEMS_PER_TASK, seed: int = ITEMS_SEED) -> list:
    """Dev rows of every task as (head, text_a, text_b), heads interleaved as mixed traffic."""
    from tanbr_ray.moe.data import load_task

    splits = [load_task(t, "dev", data_dir).head(per_task, seed=seed) for t in tasks]
    return [(sp.task, sp.text_a[i], None if sp.text_b is None else sp.text_b[i])
            for i in range(per_task) for sp in splits if i < len(sp.text_a)]


def batch_times(servers: dict, items: list, max_batch: int, runs: int = 3, bf16: bool = False) -> dict[str, list[float]]:
    """p50 ms of serving 1..max_batch of `items` with each mode's server (items -> predictions),
    timed round-robin so a load change on the host hits every mode and size alike."""
    from tanbr_ray.moe.infer import interleaved_latency

    def batch(b: int) -> list:
        start = (b * 7) % len(items)  # different rows per size, so no size gets only short texts
        return [items[(start + i) % len(items)] for i in range(b)]

    fns = {(m, b): (lambda s=s, rows=batch(b): s(rows, bf16=bf16)) for m, s in servers.items()
           for b in range(1, max_batch + 1)}
    timed = interleaved_latency(fns, runs=runs, warmup=1)
    return {m: [timed[(m, b)]["p50"] for b in range(1, max_batch + 1)] for m in servers}


def measure_in_process(moe, bf16: bool, max_batch: int, data_dir=None, runs: int = 3) -> Calibration:
    """The batch times of every mode through `moe.serving` in this process (no serving overhead)."""
    import torch

    from tanbr_ray.moe.serving import moe_server
    from tanbr_ray.moe.store import model_identity

    items = calibration_items(moe.tasks, data_dir)
    ms = batch_times({m: moe_server(moe, m) for m in MODES}, items, max_batch, runs=runs, bf16=bf16)
    return Calibration(host=host_identity(), bf16=bf16, model_sha256=model_identity(moe)["weights_sha256"],
                       max_batch=max_batch, batch_ms=ms, source="in-process", threads=torch.get_num_threads(),
                       runs=runs, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def calibration_for(moe, bf16: bool, source: str, max_batch: int, data_dir=None) -> tuple[Calibration, str]:
    """The service model a run uses, and where it came from. `source`: 'auto' (the calibration beside
    the model in its cache, else measure here and store it there), 'measure' (measure here, store
    nothing) or a path."""
    from tanbr_ray.moe.store import model_identity

    ident = model_identity(moe)
    home = getattr(moe, "cache_dir", None)
    if source == "measure" or (source == "auto" and home is None):
        return measure_in_process(moe, bf16, max_batch, data_dir), "measured in-process"
    path = calibration_path(home, bf16) if source == "auto" else Path(source)
    if source == "auto" and not path.exists():
        cal = measure_in_process(moe, bf16, max_batch, data_dir)
        atomic_write_json(path, cal.model_dump())
        return cal, f"measured in-process, stored in {path}"
    try:
        cal = load_calibration(path, ident["weights_sha256"], bf16, max_batch)
        return cal, f"{path} ({cal.source}, {cal.date})"
    except CalibrationError as exc:
        warnings.warn(f"{exc}; measuring this host's own service times instead", stacklevel=2)
        return measure_in_process(moe, bf16, max_batch, data_dir), f"measured in-process ({path} refused)"
