"""Who leads: numbered terms claimed by put-if-absent in Ray's GCS key-value store.

Nothing here touches a disk: the GCS is what every machine of a Ray cluster shares, so the decision
actors elect a leader wherever Ray placed them. `claim(term)` stores `<router>/term/<n>` only if it is
absent, which exactly one claimant can do. The newest term names the leader; a leader that sees a
newer term has been replaced and steps down, and `fence` refuses its writes (checkpoints commit only
after it), so two actors never both act for one router. The GCS outlives a dead head node only with
Ray's GCS fault tolerance (an external Redis; see docs/cluster.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

KV_NAMESPACE = "tanbr"
KEEP = 16


class NotLeader(RuntimeError):
    """Raised by a decision actor asked to act while it is not the leader: the caller tries the other."""


@dataclass(frozen=True)
class Term:
    term: int
    leader: str
    at: float = field(default=0.0, compare=False)


class RayKV:
    """Ray's internal key-value store (in the GCS), the only state every node of a cluster shares."""

    def put_if_absent(self, key: str, value: bytes) -> bool:
        from ray.experimental.internal_kv import _internal_kv_put

        return not _internal_kv_put(key, value, overwrite=False, namespace=KV_NAMESPACE)  # True: existed

    def get(self, key: str) -> bytes | None:
        from ray.experimental.internal_kv import _internal_kv_get

        return _internal_kv_get(key, namespace=KV_NAMESPACE)

    def keys(self, prefix: str) -> list[str]:
        from ray.experimental.internal_kv import _internal_kv_list

        return [k.decode() for k in _internal_kv_list(prefix, namespace=KV_NAMESPACE)]

    def delete(self, key: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(key, namespace=KV_NAMESPACE)


class Election:
    def __init__(self, router_name: str, kv: RayKV | None = None):
        self.prefix = f"{router_name}/term/"
        self.kv = kv or RayKV()

    def _numbers(self) -> list[int]:
        return sorted((int(k[len(self.prefix):]) for k in self.kv.keys(self.prefix)
                       if k[len(self.prefix):].isdigit()), reverse=True)

    def current(self) -> Term | None:
        """The newest term, or None before any actor of this router ever led."""
        for n in self._numbers():
            raw = self.kv.get(f"{self.prefix}{n:012d}")
            if raw is not None:
                rec = json.loads(raw)
                return Term(n, rec["leader"], rec["at"])
        return None

    def claim(self, term: int, who: str) -> bool:
        """Take `term` for `who`; False when another actor took it first."""
        rec = json.dumps({"term": term, "leader": who, "at": time.time()}).encode()
        if not self.kv.put_if_absent(f"{self.prefix}{term:012d}", rec):
            return False
        for old in self._numbers()[KEEP:]:
            self.kv.delete(f"{self.prefix}{old:012d}")
        return True

    def fence(self, term: int | None) -> None:
        """Raise NotLeader unless `term` is the newest: a replaced leader's writes are refused."""
        cur = self.current()
        if term is None or cur is None or cur.term != term:
            raise NotLeader(f"term {term} is not the newest ({cur.term if cur else None})")

    def forget(self) -> None:
        """Drop every term of this router (its app was deleted: the next deployment starts afresh)."""
        for n in self._numbers():
            self.kv.delete(f"{self.prefix}{n:012d}")
