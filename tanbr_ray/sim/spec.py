"""What a node serves in a slot: one model, named by its serving mode and, for a merge, its x."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("merged", "static", "oracle", "top1", "top2", "soft")


@dataclass(frozen=True)
class Spec:
    """One served model (hashable: predictions and merged weights are cached by it).

    kind: `merged` (x over the experts, held as float64 bytes so equal x are equal specs), `static`
    (one merge of every expert by `operator`), `oracle` (each request on its task's expert), or a
    token-routed full MoE (`top1`, `top2`, `soft`)."""

    kind: str
    x_bytes: bytes = b""
    operator: str = ""

    def __post_init__(self):
        if self.kind not in MODES:
            raise ValueError(f"spec: unknown serving mode {self.kind!r}; choose from {', '.join(MODES)}")

    @classmethod
    def merged(cls, x: np.ndarray) -> "Spec":
        return cls("merged", x_bytes=np.asarray(x, dtype=np.float64).tobytes())

    @classmethod
    def of(cls, serving: tuple[str, ...]) -> "Spec":
        """From a fixed policy's serving mode in the registry: ("top1",), ("static", "regmean")."""
        return cls(serving[0], operator=serving[1] if len(serving) > 1 else "")

    @property
    def x(self) -> np.ndarray | None:
        return np.frombuffer(self.x_bytes, dtype=np.float64).copy() if self.kind == "merged" else None

    @property
    def mode(self) -> str:
        """The MoE forward mode it runs in (a static merge is a merged model)."""
        return "merged" if self.kind in ("merged", "static") else self.kind

    def parts(self) -> tuple:
        """Its identity as the prediction memo keys it: (kind[, x bytes | operator])."""
        if self.kind == "merged":
            return (self.kind, self.x_bytes)
        return (self.kind, self.operator) if self.kind == "static" else (self.kind,)
