"""``flashsale inspect``: what the queues hold right now, in tables a person reads.

Partitions with work (queued or in flight), a lease or a wake flag; the ready list; drain
jobs and their heartbeats; rq's queues and workers; dead letters (``flashsale
dead-letters --replay ID`` queues one again). Read-only: safe during a sale.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from flashsale.clock import now_ms, rfc3339
from workers import keys, stats
from workers.planes import HEARTBEAT_MS, Planes, as_planes


@dataclass(frozen=True)
class Partition:
    product_id: int
    queued: int
    inflight: int
    lease_ms: int  # PTTL of the lease: -2 none
    wake_ms: int
    oldest_s: float | None
    ready_at: int | None  # position on the ready list (1 = next)

    @property
    def interesting(self) -> bool:
        return bool(self.queued or self.inflight or self.lease_ms != -2 or self.wake_ms != -2)

    @property
    def state(self) -> str:
        """Who will apply what is queued, in a word."""
        if not (self.queued or self.inflight):
            return "idle"
        if self.lease_ms != -2:
            return "draining"
        if self.ready_at is not None:
            return "ready"
        return "STALLED" if self.wake_ms == -2 else "waking"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r]
                                           for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in rows) and bool(rows) for i in range(len(headers))]
    lines = []
    for row in cells:
        lines.append("  ".join(cell.rjust(w) if num else cell.ljust(w)
                               for cell, w, num in zip(row, widths, numeric, strict=True))
                     .rstrip())
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) or value is None


def partitions(planes: Planes, product_ids: list[int], job_ttl_seconds: int
               ) -> tuple[list[Partition], list[int]]:
    """The state of each partition that holds something, and the ready list."""
    ready = [int(p) for p in planes.control.lrange(keys.READY, 0, -1)  # type: ignore[union-attr]
             if p.isdigit()]
    position: dict[int, int] = {}
    for n, pid in enumerate(ready, 1):
        position.setdefault(pid, n)
    ids = sorted(set(product_ids) | {keys.CATALOG} | set(ready))
    values = _each(planes.data, ids, lambda pipe, pid: (
        pipe.llen(keys.queue(pid)), pipe.llen(keys.inflight(pid)),
        pipe.pttl(keys.lease(pid)), pipe.pttl(keys.wake(pid)),
        pipe.lindex(keys.inflight(pid), 0), pipe.lindex(keys.queue(pid), 0)))
    rows = [values[6 * n:6 * n + 6] for n in range(len(ids))]
    oldest = {pid: job_id for pid, row in zip(ids, rows, strict=True)
              if (job_id := stats.head_job_id(row[4], row[5]))}
    pttls = dict(zip(oldest, _each(planes.data, list(oldest.values()),
                                   lambda pipe, job_id: pipe.pttl(keys.job(job_id))),
                     strict=True))
    found = []
    for pid, (queued, inflight, lease_ms, wake_ms, _, _) in zip(ids, rows, strict=True):
        age = stats.oldest_age_seconds(int(pttls[pid]), job_ttl_seconds) \
            if pid in pttls else None
        part = Partition(pid, queued, inflight, lease_ms, wake_ms, age, position.get(pid))
        if part.interesting:
            found.append(part)
    found.sort(key=lambda p: (-(p.queued + p.inflight), p.product_id))
    return found, ready


def _each(conn: Any, items: list[Any], add: Any) -> list[Any]:
    """One pipeline of ``add(pipe, item)`` for every item."""
    if not items:
        return []
    pipe = conn.pipeline(transaction=False)
    for item in items:
        add(pipe, item)
    return list(pipe.execute())


def render(conn: Planes | redis.Redis, product_ids: list[int], job_ttl_seconds: int,
           dead: list[dict[str, Any]] | None, limit: int = 50) -> str:
    """Every section, as text."""
    planes = as_planes(conn)
    parts, ready = partitions(planes, product_ids, job_ttl_seconds)
    out = [f"QUEUES: {len(parts)} partition(s) with work or a drainer"]
    if parts:
        out.append(table(
            ["product", "queued", "in flight", "oldest", "lease", "wake", "ready #", "state"],
            [["catalog" if p.product_id == keys.CATALOG else p.product_id, p.queued,
              p.inflight, _seconds(p.oldest_s), _ttl(p.lease_ms), _ttl(p.wake_ms),
              p.ready_at, p.state] for p in parts[:limit]]))
        if len(parts) > limit:
            out.append(f"... and {len(parts) - limit} more")
    shown = ", ".join(map(str, ready[:limit])) + (" ..." if len(ready) > limit else "")
    out += ["", f"READY LIST: {len(ready)} waiting for a drainer" + (f": {shown}" if ready
                                                                      else "")]
    out += ["", _drainers(planes.control)]
    out += ["", _rq(planes.control)]
    out += ["", _dead(dead, limit)]
    return "\n".join(out)


def _drainers(conn: redis.Redis) -> str:
    now = int(time.time() * 1000)
    beats: list[tuple[bytes, float]] = conn.zrange(  # type: ignore[assignment]
        keys.DRAINERS, 0, -1, withscores=True)
    rows = [[member.decode(), f"{(now - score) / 1000:.1f} s ago",
             "live" if now - score < HEARTBEAT_MS else "SILENT (gone?)"]
            for member, score in beats]
    head = f"DRAINERS: {sum(1 for r in rows if r[2] == 'live')} live drain job(s)"
    return head + ("\n" + table(["drain job", "heartbeat", ""], rows) if rows else "")


def _rq(conn: redis.Redis) -> str:
    from rq import Queue, Worker

    lines = []
    for name in (keys.MAINTENANCE_QUEUE, keys.DRAIN_QUEUE):
        queue = Queue(name, connection=conn)
        lines.append([name, queue.count, queue.started_job_registry.count,
                      queue.failed_job_registry.count])
    workers = Worker.all(connection=conn)
    rows = [[w.name, w.get_state(), ",".join(w.queue_names()),
             _ago(w.last_heartbeat), w.get_current_job_id() or ""] for w in workers]
    text = "RQ QUEUES\n" + table(["queue", "waiting", "started", "failed"], lines)
    text += f"\n\nRQ WORKERS: {len(rows)}"
    if rows:
        text += "\n" + table(["worker", "state", "queues", "heartbeat", "job"], rows)
    return text


def _dead(dead: list[dict[str, Any]] | None, limit: int) -> str:
    if dead is None:
        return "DEAD LETTERS: unavailable (the database could not be read)"
    head = f"DEAD LETTERS: {len(dead)} not replayed" + (
        " (flashsale dead-letters --replay ID queues one again)" if dead else "")
    if not dead:
        return head
    rows = [[d["id"], rfc3339(d["created_at"]), d["product_id"], d["op"], d["request_id"],
             d["status"], " ".join(str(d["error"]).split())[:60]] for d in dead[:limit]]
    return head + "\n" + table(["id", "at", "product", "op", "request", "status", "error"],
                               rows)


def _ttl(pttl_ms: int) -> str:
    if pttl_ms == -2:
        return "-"
    return "no ttl" if pttl_ms == -1 else f"{pttl_ms / 1000:.1f} s"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _ago(when: Any) -> str:
    if when is None:
        return "-"
    return f"{max(now_ms() / 1000 - when.timestamp(), 0):.1f} s ago"
