"""Where a result came from, recorded with it: code, packages, hardware, precision, date.

Every results and benchmark JSON carries this, so a figure never needs prose to say which machine or
build made it; the model and data hashes sit beside it (`sim.summary.run_identity`)."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("tanbr-ray", "torch", "transformers", "ray", "numpy", "safetensors")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def git_commit() -> str:
    """The checkout's commit (`+dirty` with uncommitted changes), or "unknown" outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu() -> tuple[str, list[str]]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", []
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return name, [f for f in CPU_FLAGS if f in flags]


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (the command's, when called as it writes its results)."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(kib if platform.system() == "Darwin" else kib * 1024)


def provenance(wall_seconds: float | None = None, bf16: bool | None = None) -> dict:
    import torch

    cpu, flags = _cpu()
    return {
        "git_commit": git_commit(),
        "versions": {p: _version(p) for p in PACKAGES} | {"python": platform.python_version()},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu": cpu, "cpu_flags": flags, "cpu_threads": torch.get_num_threads(),
        "bf16": bf16,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": wall_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
    }
