"""The registry of worker daemons: who is alive, what they run (for queue_health and admin)."""

from __future__ import annotations

import datetime
from typing import Any

from django.db.models import Q
from django.utils import timezone

from djasync.models import Worker

#: Seconds between heartbeats of a running daemon.
HEARTBEAT_SECONDS = 5.0
#: A daemon not seen for this long is dead (killed, host lost) and is marked stopped.
STALE_AFTER = datetime.timedelta(seconds=HEARTBEAT_SECONDS * 6)


def register(name: str, *, hostname: str, pid: int, concurrency: int,
             queues: list[str]) -> Worker:
    return Worker.objects.create(name=name, hostname=hostname, pid=pid, concurrency=concurrency,
                                 queues=queues)


def heartbeat(name: str, *, running: list[int], jobs_done: int) -> None:
    """Refresh this daemon's row and mark daemons that stopped beating as stopped."""
    now = timezone.now()
    Worker.objects.filter(name=name).update(last_seen=now, running=running, jobs_done=jobs_done,
                                            stopped_at=None)
    Worker.objects.filter(stopped_at__isnull=True, last_seen__lt=now - STALE_AFTER).update(
        stopped_at=now, running=[]
    )


def mark_stopped(name: str, *, jobs_done: int) -> None:
    Worker.objects.filter(name=name).update(stopped_at=timezone.now(), running=[],
                                            jobs_done=jobs_done)


def summary(recent: datetime.timedelta = datetime.timedelta(days=1)) -> list[dict[str, Any]]:
    """Return the daemons alive now or stopped within ``recent``, newest first."""
    now = timezone.now()
    rows = Worker.objects.filter(Q(stopped_at__isnull=True) | Q(stopped_at__gte=now - recent))
    result = []
    for worker in rows[:50]:
        alive = worker.stopped_at is None and worker.last_seen >= now - STALE_AFTER
        result.append({
            "name": worker.name, "hostname": worker.hostname, "pid": worker.pid,
            "concurrency": worker.concurrency, "queues": worker.queues or ["*"],
            "started_at": worker.started_at.isoformat(), "last_seen": worker.last_seen.isoformat(),
            "alive": alive, "running": worker.running if alive else [],
            "jobs_done": worker.jobs_done,
        })
    return result
