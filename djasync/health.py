"""What ``queue_health`` reports: what is waiting, running and failing."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from django.db import connection
from django.db.models import Count, F, Max, Sum
from django.utils import timezone

from djasync import limits, sql, workers
from djasync.models import Attempt, Job, Outcome, PausedQueue, Status, shown_name, task_path

#: Succeeded attempts of this last span give the run times: the slowest functions, and the
#: estimate of the time to drain the due jobs.
SLOWEST_WINDOW = datetime.timedelta(days=1)
#: Rows in the "slowest" list.
TOP = 5


def health() -> dict[str, Any]:
    """Return a JSON-able summary of the queue.

    Functions are named as the admin and the dashboard name them: a Task job by its Task's
    path (see :func:`djasync.models.shown_name`).
    """
    now = timezone.now()
    by_status = {status.value: 0 for status in Status}
    by_queue: dict[str, dict[str, int]] = {}
    by_function: dict[str, dict[str, int]] = {}
    for queue, status, name, task, n in (
            Job.objects.annotate(task=task_path())
            .values_list("queue", "status", "name", "task").annotate(n=Count("id"))):
        by_status[status] += n
        by_queue.setdefault(queue, {s.value: 0 for s in Status})[status] += n
        by_function.setdefault(shown_name(name, task), {s.value: 0 for s in Status})[status] += n
    due_by_function: dict[str, int] = {}
    for name, task, n in (Job.objects.due().annotate(task=task_path())
                          .values_list("name", "task").annotate(n=Count("id"))):
        shown = shown_name(name, task)
        due_by_function[shown] = due_by_function.get(shown, 0) + n
    due = sum(due_by_function.values())
    oldest = Job.objects.due().order_by("run_after").values_list("run_after", flat=True).first()
    hour_ago = now - datetime.timedelta(hours=1)
    recent = Attempt.objects.filter(finished_at__gte=hour_ago)
    outcomes = dict(recent.values_list("outcome").annotate(n=Count("id")))
    failing: dict[str, int] = {}
    for name, task, errors in (recent.exclude(outcome=Outcome.SUCCEEDED)
                               .annotate(task=task_path("job__"))
                               .values_list("job__name", "task").annotate(errors=Count("id"))):
        shown = shown_name(name, task)
        failing[shown] = failing.get(shown, 0) + errors
    run_times = _run_times(now)
    slowest = sorted(run_times.items(), key=lambda item: (-item[1].avg, item[0]))[:TOP]
    workers_now = workers.summary()
    processes = sum(w["concurrency"] for w in workers_now if w["alive"])
    estimate = _estimate(due_by_function, run_times, processes)
    return {
        "now": now.isoformat(),
        "jobs": by_status,
        "queues": by_queue,
        "functions": dict(sorted(by_function.items())),
        "due": due,
        "scheduled": by_status[Status.PENDING] - due,
        "running": running_count(),
        "oldest_due_age_seconds": round((now - oldest).total_seconds(), 3) if oldest else None,
        "last_hour": {
            "succeeded": outcomes.get(Outcome.SUCCEEDED, 0),
            "errors": outcomes.get(Outcome.ERROR, 0),
            "crashed": outcomes.get(Outcome.CRASHED, 0),
            "timed_out": outcomes.get(Outcome.TIMED_OUT, 0),
            "failing_names": [{"name": name, "errors": errors} for name, errors in
                              sorted(failing.items(), key=lambda i: (-i[1], i[0]))[:TOP]],
        },
        "slowest_names": [
            {"name": name, "runs": times.runs, "avg_seconds": round(times.avg, 3),
             "max_seconds": round(times.max, 3)}
            for name, times in slowest
        ],
        "estimate": estimate,
        "estimated_drain_seconds": estimate["drain_seconds"],
        "workers": workers_now,
        "paused_queues": list(PausedQueue.objects.values_list("queue", flat=True)),
        "limits": limits.usage(),
    }


@dataclass
class RunTimes:
    """Succeeded attempts of one function in :data:`SLOWEST_WINDOW`."""

    runs: int
    total: float
    max: float

    @property
    def avg(self) -> float:
        return self.total / self.runs


def _run_times(now: datetime.datetime) -> dict[str, RunTimes]:
    """Run times of every function that succeeded in :data:`SLOWEST_WINDOW`, by shown name."""
    seconds = F("finished_at") - F("started_at")
    times: dict[str, RunTimes] = {}
    for name, task, runs, total, longest in (
            Attempt.objects.filter(outcome=Outcome.SUCCEEDED,
                                   finished_at__gte=now - SLOWEST_WINDOW)
            .annotate(task=task_path("job__"))
            .values_list("job__name", "task")
            .annotate(runs=Count("id"), total=Sum(seconds), longest=Max(seconds))):
        shown = shown_name(name, task)
        found = times.setdefault(shown, RunTimes(0, 0.0, 0.0))
        found.runs += runs
        found.total += total.total_seconds()
        found.max = max(found.max, longest.total_seconds())
    return times


def _estimate(due: dict[str, int], run_times: dict[str, RunTimes],
              processes: int) -> dict[str, Any]:
    """Estimate the seconds the due jobs need, from their functions' run times.

    Each due job counts its function's average run time in :data:`SLOWEST_WINDOW`; a function
    with no run there counts the average of every function's runs (so one finished job is
    enough for an estimate). The work is shared by the worker processes alive now (one if
    none is: ``flush_queue``). It leaves out the time of claiming and committing, which
    matters for jobs of a millisecond or less: a lower bound, then.
    """
    runs = sum(t.runs for t in run_times.values())
    overall = sum(t.total for t in run_times.values()) / runs if runs else None
    work = 0.0
    guessed = []
    for name, n in due.items():
        times = run_times.get(name)
        if times is not None:
            work += n * times.avg
        elif overall is not None:
            work += n * overall
            guessed.append(name)
        else:  # nothing ran in the window: no basis for an estimate
            return {"work_seconds": None, "worker_processes": processes,
                    "drain_seconds": None, "functions_without_runs": sorted(due)}
    return {"work_seconds": round(work, 3), "worker_processes": processes,
            "drain_seconds": round(work / max(processes, 1), 1),
            "functions_without_runs": sorted(guessed)}


#: The due jobs (the first ``limit`` in claim order, where running jobs are) whose row a
#: transaction in progress holds (:data:`sql.LOCKER_IN_PROGRESS`: read, never locked; an
#: earlier version share-locked these rows for the statement's moment), and the long jobs
#: running under a live lease.
RUNNING = f"""
WITH head AS (
    SELECT xmax FROM djasync_job
     WHERE status = 'pending' AND run_after <= now()
     ORDER BY priority DESC, run_after, id
     LIMIT %(limit)s)
SELECT (SELECT count(*) FROM head WHERE {sql.LOCKER_IN_PROGRESS})
     + (SELECT count(*) FROM djasync_job
         WHERE status = 'pending' AND lease_expires > clock_timestamp())
"""


def running_count(probe_limit: int = 10_000) -> int:
    """Count due pending jobs that a worker holds locked right now, i.e. is running, and the
    long jobs (``atomic=False``) running under a live lease (their rows are not locked).

    Row locks are not in ``pg_locks``, but their lockers are: among the first ``probe_limit``
    due rows in claim order, count those whose locker (``xmax``) is a transaction in progress
    (:data:`RUNNING`). Nothing is locked, so no worker's claim is disturbed. A row locked by
    several transactions at once (a multixact: a worker's claim and another session's key-share
    lock, say) is not counted, and a multixact's number that happens to equal a transaction id
    in progress counts a row that is not running: both rare, and this is a report.
    """
    with connection.cursor() as cursor:
        cursor.execute(RUNNING, {"limit": probe_limit})
        (n,) = cursor.fetchone()
    return max(0, int(n))
