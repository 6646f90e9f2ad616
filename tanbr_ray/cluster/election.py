"""Who leads: numbered terms claimed by atomic file creation next to the checkpoints (Ray-free).

The decision actors share the checkpoint directory (the standby restores from it), so the same place
arbitrates leadership: `claim(term)` creates `leader/term-<n>.json` with O_CREAT|O_EXCL, which exactly
one claimant can do. The newest term names the leader; a leader that sees a newer term has been
replaced and steps down (fencing), so two actors never both act for the same term.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "term-"
KEEP = 16


class NotLeader(RuntimeError):
    """Raised by a decision actor asked to act while it is not the leader: the caller tries the other."""


@dataclass(frozen=True)
class Term:
    term: int
    leader: str | None  # None: the file is still being written (its claimant holds the term)
    mtime: float = field(default=0.0, compare=False)


class Election:
    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.dir = Path(checkpoint_dir) / "leader"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _terms(self) -> list[Path]:
        return sorted(self.dir.glob(f"{PREFIX}*.json"), reverse=True)

    def current(self) -> Term | None:
        """The newest term, or None before any actor ever led here."""
        for p in self._terms():
            try:
                n = int(p.stem[len(PREFIX):])
            except ValueError:
                continue
            try:
                mtime = p.stat().st_mtime
                leader = json.loads(p.read_text())["leader"]
            except (OSError, ValueError, KeyError):
                leader = None
            return Term(n, leader, mtime)
        return None

    def claim(self, term: int, who: str) -> bool:
        """Take `term` for `who`; False when another actor took it first."""
        path = self.dir / f"{PREFIX}{term:08d}.json"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps({"term": term, "leader": who, "at": time.time()}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in self._terms()[KEEP:]:
            old.unlink(missing_ok=True)
        return True
