"""What ``queue_health`` reports: what is waiting, running and failing."""

from __future__ import annotations

import datetime
from typing import Any

from django.db import connection
from django.db.models import Avg, Count, F, Max
from django.utils import timezone

from djasync import limits, workers
from djasync.models import Attempt, Job, Outcome, PausedQueue, Status

SLOWEST_WINDOW = datetime.timedelta(days=1)


def health() -> dict[str, Any]:
    """Return a JSON-able summary of the queue."""
    now = timezone.now()
    by_status = {status.value: 0 for status in Status}
    by_queue: dict[str, dict[str, int]] = {}
    for queue, status, n in Job.objects.values_list("queue", "status").annotate(n=Count("id")):
        by_status[status] += n
        by_queue.setdefault(queue, {s.value: 0 for s in Status})[status] = n
    due = Job.objects.due().count()
    oldest = Job.objects.due().order_by("run_after").values_list("run_after", flat=True).first()
    hour_ago = now - datetime.timedelta(hours=1)
    recent = Attempt.objects.filter(finished_at__gte=hour_ago)
    outcomes = dict(recent.values_list("outcome").annotate(n=Count("id")))
    errors_by_name = list(
        recent.exclude(outcome=Outcome.SUCCEEDED)
        .values("job__name")
        .annotate(errors=Count("id"))
        .order_by("-errors")[:5]
    )
    slowest = list(
        Attempt.objects.filter(outcome=Outcome.SUCCEEDED, finished_at__gte=now - SLOWEST_WINDOW)
        .values("job__name")
        .annotate(avg_seconds=Avg(F("finished_at") - F("started_at")),
                  max_seconds=Max(F("finished_at") - F("started_at")), runs=Count("id"))
        .order_by("-avg_seconds")[:5]
    )
    succeeded_last_hour = outcomes.get(Outcome.SUCCEEDED, 0)
    rate = succeeded_last_hour / 3600.0
    return {
        "now": now.isoformat(),
        "jobs": by_status,
        "queues": by_queue,
        "due": due,
        "scheduled": by_status[Status.PENDING] - due,
        "running": running_count(),
        "oldest_due_age_seconds": round((now - oldest).total_seconds(), 3) if oldest else None,
        "last_hour": {
            "succeeded": succeeded_last_hour,
            "errors": outcomes.get(Outcome.ERROR, 0),
            "crashed": outcomes.get(Outcome.CRASHED, 0),
            "timed_out": outcomes.get(Outcome.TIMED_OUT, 0),
            "failing_names": [{"name": e["job__name"], "errors": e["errors"]}
                              for e in errors_by_name],
        },
        "slowest_names": [
            {"name": s["job__name"], "runs": s["runs"],
             "avg_seconds": round(s["avg_seconds"].total_seconds(), 3),
             "max_seconds": round(s["max_seconds"].total_seconds(), 3)}
            for s in slowest
        ],
        "estimated_drain_seconds": round(due / rate, 1) if rate else None,
        "workers": workers.summary(),
        "paused_queues": list(PausedQueue.objects.values_list("queue", flat=True)),
        "limits": limits.usage(),
    }


def running_count(probe_limit: int = 10_000) -> int:
    """Count due pending jobs that a worker holds locked right now, i.e. is running, and the
    long jobs (``atomic=False``) running under a live lease (their rows are not locked).

    Row locks are not in ``pg_locks``, so ask the rows: among the first ``probe_limit`` due rows
    in claim order (where running jobs are), count those that cannot be share-locked without
    waiting. ``SKIP LOCKED`` means the probe never waits, and its share locks last only for its
    own short transaction (a worker's claim skips those rows for that moment).
    """
    with connection.cursor() as cursor:
        cursor.execute(
            """
            WITH head AS (
                SELECT id FROM djasync_job
                 WHERE status = 'pending' AND run_after <= now()
                 ORDER BY priority DESC, run_after, id
                 LIMIT %(limit)s)
            SELECT (SELECT count(*) FROM head)
                 - (SELECT count(*) FROM (
                      SELECT 1 FROM djasync_job
                       WHERE id IN (SELECT id FROM head)
                         AND status = 'pending'
                         FOR SHARE SKIP LOCKED) AS free)
                 + (SELECT count(*) FROM djasync_job
                     WHERE status = 'pending' AND lease_expires > clock_timestamp())
            """,
            {"limit": probe_limit},
        )
        (n,) = cursor.fetchone()
    return max(0, int(n))
