"""Task monitor: estimate the task mix psi_t from the recent request stream.

Requests carry no routing tags, only an observable key (an app id, an endpoint, the output head
they ask for); a key map says which task type a key belongs to. Two estimators:

* ``cms``: a Count-Min Sketch per slot (conservative update) over request keys, kept for a sliding
  window of the last ``window`` slots. Memory is fixed (depth x width counters per slot) however
  many distinct keys arrive; each estimate over-counts by at most e/width * N with probability
  1 - exp(-depth) and never under-counts.
* ``ema``: an exponential moving average of per-slot task histograms (exact counts, no window).
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["cms", "ema"] = "cms"
    width: int = Field(256, ge=8, le=1 << 20, description="CMS counters per row")
    depth: int = Field(4, ge=1, le=16, description="CMS rows (independent hashes)")
    window: int = Field(4, ge=1, le=1024, description="slots kept in the sliding window")
    ema_alpha: float = Field(0.5, gt=0.0, le=1.0, description="EMA weight of the newest slot")
    seed: int = 0


class CountMinSketch:
    """Count-Min Sketch with conservative update over string keys."""

    def __init__(self, width: int, depth: int, seed: int = 0):
        self.width, self.depth, self.seed = width, depth, seed
        self.table = np.zeros((depth, width), dtype=np.int64)
        self.total = 0

    def _cells(self, key: str) -> np.ndarray:
        # blake2b is stable across processes (Python's hash() is salted per process).
        digest = hashlib.blake2b(key.encode(), digest_size=8 * self.depth,
                                 salt=self.seed.to_bytes(8, "little", signed=True)).digest()
        return np.frombuffer(digest, dtype=np.uint64) % np.uint64(self.width)

    def add(self, key: str, count: int = 1) -> None:
        """Conservative update: raise only the counters that sit at the current minimum."""
        cols = self._cells(key).astype(np.int64)
        rows = np.arange(self.depth)
        current = self.table[rows, cols]
        target = current.min() + count
        self.table[rows, cols] = np.maximum(current, target)
        self.total += count

    def estimate(self, key: str) -> int:
        cols = self._cells(key).astype(np.int64)
        return int(self.table[np.arange(self.depth), cols].min())

    def error_bound(self) -> float:
        """Additive over-count bound e/width * N (holds with probability 1 - exp(-depth))."""
        return float(np.e / self.width * self.total)


class TaskMonitor:
    """psi_t over `tasks` from observed request keys; call `end_slot()` once per time slot."""

    def __init__(self, tasks: Sequence[str], config: MonitorConfig | None = None,
                 key_to_task: Mapping[str, str] | None = None):
        if not tasks:
            raise ValueError("tasks: need at least one task type")
        self.tasks = list(tasks)
        self.config = config or MonitorConfig()
        self.key_to_task = dict(key_to_task) if key_to_task is not None else {t: t for t in tasks}
        unknown = set(self.key_to_task.values()) - set(self.tasks)
        if unknown:
            raise ValueError(f"key_to_task: maps to unknown tasks {sorted(unknown)}")
        self._keys_of_task = {t: [k for k, v in self.key_to_task.items() if v == t] for t in self.tasks}
        self._slots: deque[CountMinSketch] = deque(maxlen=self.config.window)
        self._current = self._new_sketch()
        self._slot_counts = np.zeros(len(self.tasks))
        self._ema: np.ndarray | None = None
        self.unknown_keys = 0

    def _new_sketch(self) -> CountMinSketch:
        return CountMinSketch(self.config.width, self.config.depth, self.config.seed)

    def observe(self, key: str, count: int = 1) -> None:
        """Record `count` requests with this key in the current slot; unmapped keys are counted apart."""
        task = self.key_to_task.get(key)
        if task is None:
            self.unknown_keys += count
            return
        if self.config.kind == "cms":
            self._current.add(key, count)
        else:
            self._slot_counts[self.tasks.index(task)] += count

    def observe_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.observe(key)

    def end_slot(self) -> None:
        """Close the slot: it joins the window (CMS) or the moving average (EMA)."""
        if self.config.kind == "cms":
            self._slots.append(self._current)
            self._current = self._new_sketch()
        else:
            if self._slot_counts.sum() > 0:
                hist = self._slot_counts / self._slot_counts.sum()
                a = self.config.ema_alpha
                self._ema = hist if self._ema is None else (1 - a) * self._ema + a * hist
            self._slot_counts = np.zeros(len(self.tasks))

    def counts(self) -> np.ndarray:
        """Estimated request count per task over the window of closed slots (CMS) or EMA mass."""
        if self.config.kind == "ema":
            return np.zeros(len(self.tasks)) if self._ema is None else self._ema.copy()
        out = np.zeros(len(self.tasks))
        for i, task in enumerate(self.tasks):
            out[i] = sum(s.estimate(k) for s in self._slots for k in self._keys_of_task[task])
        return out

    def psi(self) -> np.ndarray:
        """Normalised task distribution; uniform before any request has been seen."""
        c = self.counts()
        total = c.sum()
        return np.full(len(self.tasks), 1.0 / len(self.tasks)) if total <= 0 else c / total

    def error_bound(self) -> float:
        """Worst-case additive over-count per key summed over the window (CMS only; 0 for EMA)."""
        if self.config.kind == "ema":
            return 0.0
        return float(sum(s.error_bound() for s in self._slots))

    def estimation_error(self, true_psi) -> float:
        """Total-variation distance between the estimate and a known task mix."""
        true_psi = np.asarray(true_psi, dtype=np.float64)
        return float(0.5 * np.abs(self.psi() - true_psi).sum())

    def state_dict(self) -> dict:
        """JSON-serialisable state (for router checkpoints)."""
        return {
            "config": self.config.model_dump(),
            "tasks": self.tasks,
            "key_to_task": self.key_to_task,
            "slots": [s.table.tolist() for s in self._slots],
            "slot_totals": [s.total for s in self._slots],
            "current": self._current.table.tolist(),
            "current_total": self._current.total,
            "slot_counts": self._slot_counts.tolist(),
            "ema": None if self._ema is None else self._ema.tolist(),
            "unknown_keys": self.unknown_keys,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "TaskMonitor":
        mon = cls(state["tasks"], MonitorConfig(**state["config"]), state["key_to_task"])
        for table, total in zip(state["slots"], state["slot_totals"]):
            sk = mon._new_sketch()
            sk.table, sk.total = np.asarray(table, dtype=np.int64), int(total)
            mon._slots.append(sk)
        mon._current.table = np.asarray(state["current"], dtype=np.int64)
        mon._current.total = int(state["current_total"])
        mon._slot_counts = np.asarray(state["slot_counts"], dtype=np.float64)
        mon._ema = None if state["ema"] is None else np.asarray(state["ema"], dtype=np.float64)
        mon.unknown_keys = int(state["unknown_keys"])
        return mon
