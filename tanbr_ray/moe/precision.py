"""The two precision contexts every layer uses: bf16 autocast (build, opt-in serving) and fp32 where
autocast must not reach (merges, Grams)."""

from __future__ import annotations

import torch


def bf16(device: torch.device | str, enabled: bool = True, cache: bool = True):
    """bfloat16 autocast on `device`'s type. `cache=False` for training: within one region the cast
    cache keeps the first bf16 copy of each trainable leaf parameter, so updates would go unseen."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache)


def fp32(device: torch.device | str):
    """Autocast off: merges and statistics stay fp32 whoever calls them (a build stage, bf16 scoring)."""
    return torch.autocast(torch.device(device).type, enabled=False)
