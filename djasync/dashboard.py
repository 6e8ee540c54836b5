"""What the admin dashboard shows: the last hour of the queue, read from the job tables.

Every function here takes ``now`` and returns plain data (dataclasses of numbers and strings), so
it can be tested against real rows at known times. The hour is sampled at 60 points,
``now - 59 min, …, now - 1 min, now`` (:func:`sample_times`); rates and latencies are counted in
the minute that ends at each point, so every bucket is a whole minute.

Cost. Each statement reads only rows that can matter for the last hour, through an index:

- finished jobs by ``(status, finished_at)`` (``djasync_job_finished``), bounded to the hour;
- due pending jobs by the partial index over pending rows (``djasync_job_pending_at``);
- attempts by ``(outcome, finished_at)`` (``djasync_attempt_recent``), bounded to the hour.

So the cost follows the last hour's traffic plus the due backlog, never the history of finished
jobs; rows are aggregated in PostgreSQL and only a few hundred numbers come back.

What the tables cannot tell (and so the dashboard does not pretend to):

- Queue depth at a past time is rebuilt from each job's row: a job counts from
  ``greatest(created_at, run_after)`` until its ``finished_at``. A job stores only its *latest*
  ``run_after``, so a job now waiting for a retry is not counted during the hour before that
  retry is due; a cancelled job counts until it was cancelled (its ``finished_at``). Running
  jobs are pending rows, so depth counts "due and not finished" (waiting or running).
- Pickup latency is ``started_at - greatest(created_at, run_after)`` of jobs that finished in
  the hour (succeeded or failed): only a finished job's row still holds the due time of the
  attempt that started it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from django.db import connection
from django.utils import timezone

from djasync import limits as flow_limits
from djasync.models import Outcome, PausedQueue, Status, Worker, shown_name
from djasync.registry import TASK_RUNNER
from djasync.workers import STALE_AFTER

#: Points sampled over the hour, one a minute; the last one is ``now``.
POINTS = 60
STEP = datetime.timedelta(minutes=1)
#: Rows in the "slowest" and "most failing" tables.
TOP = 5

FAILED_OUTCOMES = (Outcome.ERROR.value, Outcome.CRASHED.value, Outcome.TIMED_OUT.value)
ALL_OUTCOMES = (Outcome.SUCCEEDED.value, *FAILED_OUTCOMES)
FINISHED_JOB_STATUSES = (Status.SUCCEEDED.value, Status.FAILED.value, Status.CANCELLED.value)

#: Index of the first sample point ``t_i >= x`` (``t_i = t0 + i minutes``), clamped to 0..60;
#: a time past the last point, or NULL, gives 60: "never" (``greatest`` ignores NULLs, so the
#: NULL is replaced first).
_POINT_AT_OR_AFTER = """
    least({n}, greatest(0, coalesce(ceil(extract(epoch FROM ({x}) - %(t0)s) / 60), {n})))::int
"""


def _point_at_or_after(x: str) -> str:
    return _POINT_AT_OR_AFTER.format(x=x, n=POINTS)


#: Depth of each queue at each sample point: jobs that were due (``greatest(created_at,
#: run_after) <= t``) and not yet finished (``finished_at > t`` or NULL). Each job is reduced to
#: the span of points it covers, spans are counted in groups, and only then expanded over the
#: points with ``generate_series``: the expansion touches a few hundred groups, not the jobs.
QUEUE_DEPTH = f"""
WITH spans AS (
    SELECT queue, greatest(created_at, run_after) AS entered, NULL::timestamptz AS left_at
      FROM djasync_job
     WHERE status = 'pending' AND run_after <= %(now)s
    UNION ALL
    SELECT queue, greatest(created_at, run_after), finished_at
      FROM djasync_job
     WHERE status = ANY(%(finished_statuses)s) AND finished_at > %(t0)s
), grouped AS (
    SELECT queue, {_point_at_or_after("entered")} AS first_point,
           {_point_at_or_after("left_at")} AS end_point, count(*) AS n
      FROM spans
     WHERE entered <= %(now)s AND (left_at IS NULL OR left_at > entered)
     GROUP BY 1, 2, 3
)
SELECT g.queue, p.i, sum(g.n)::bigint
  FROM grouped g
  JOIN generate_series(0, {POINTS - 1}) AS p(i) ON p.i >= g.first_point AND p.i < g.end_point
 GROUP BY 1, 2
"""

#: Attempts that finished in each minute ``(t_i - 1 min, t_i]``, succeeded or not.
THROUGHPUT = f"""
SELECT {_point_at_or_after("finished_at")} AS i, outcome = 'succeeded' AS ok, count(*)
  FROM djasync_attempt
 WHERE outcome = ANY(%(outcomes)s) AND finished_at > %(start)s AND finished_at <= %(now)s
 GROUP BY 1, 2
"""

#: Pickup latency (seconds from due to started) of the jobs started in each minute, p50 and p95,
#: and over the whole hour (the grouping set ``()``, where ``i`` is NULL).
PICKUP_LATENCY = f"""
SELECT i, count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency)
  FROM (SELECT {_point_at_or_after("started_at")} AS i,
               extract(epoch FROM started_at - greatest(created_at, run_after))::float8 AS latency
          FROM djasync_job
         WHERE status = ANY(%(statuses)s) AND finished_at > %(start)s
           AND started_at > %(start)s AND started_at <= %(now)s
           AND started_at >= greatest(created_at, run_after)) AS started
 GROUP BY GROUPING SETS ((i), ())
"""

#: A Task job's Task path (its first argument), NULL for a plain job: functions are grouped by
#: name and this, and shown by :func:`djasync.models.shown_name` (a Task by its path).
_TASK_PATH = "CASE WHEN j.name = %(task_runner)s THEN j.args ->> 0 END"

#: Function names whose successful runs in the hour took longest, on average.
SLOWEST_NAMES = f"""
SELECT j.name, {_TASK_PATH}, count(*), avg(a.seconds)::float8,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY a.seconds), max(a.seconds)::float8
  FROM (SELECT job_id, extract(epoch FROM finished_at - started_at)::float8 AS seconds
          FROM djasync_attempt
         WHERE outcome = 'succeeded' AND finished_at > %(start)s AND finished_at <= %(now)s) AS a
  JOIN djasync_job j ON j.id = a.job_id
 GROUP BY 1, 2
 ORDER BY 4 DESC, 1, 2
 LIMIT {TOP}
"""

#: Function names with the most failed attempts (error, crashed, timed out) in the hour.
FAILING_NAMES = f"""
SELECT j.name, {_TASK_PATH},
       count(*) FILTER (WHERE a.outcome <> 'succeeded') AS failures, count(*),
       count(*) FILTER (WHERE a.outcome = 'error'),
       count(*) FILTER (WHERE a.outcome = 'crashed'),
       count(*) FILTER (WHERE a.outcome = 'timed_out')
  FROM djasync_attempt a
  JOIN djasync_job j ON j.id = a.job_id
 WHERE a.outcome = ANY(%(outcomes)s) AND a.finished_at > %(start)s AND a.finished_at <= %(now)s
 GROUP BY 1, 2
HAVING count(*) FILTER (WHERE a.outcome <> 'succeeded') > 0
 ORDER BY 3 DESC, 1, 2
 LIMIT {TOP}
"""


def sample_times(now: datetime.datetime) -> list[datetime.datetime]:
    """The hour's sample points, oldest first; the last is ``now``."""
    return [now - (POINTS - 1 - i) * STEP for i in range(POINTS)]


def _params(now: datetime.datetime) -> dict[str, Any]:
    t0 = now - (POINTS - 1) * STEP
    return {"now": now, "t0": t0, "start": t0 - STEP, "outcomes": list(ALL_OUTCOMES),
            "finished_statuses": list(FINISHED_JOB_STATUSES),
            "statuses": [Status.SUCCEEDED.value, Status.FAILED.value],
            "task_runner": TASK_RUNNER}


def _fetch(sql: str, now: datetime.datetime) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, _params(now))
        return cursor.fetchall()


def queue_depth(now: datetime.datetime) -> dict[str, list[int]]:
    """Return ``{queue: [depth at each sample point]}`` for queues with a job in the hour."""
    depth: dict[str, list[int]] = {}
    for queue, i, n in _fetch(QUEUE_DEPTH, now):
        depth.setdefault(queue, [0] * POINTS)[i] = int(n)
    return dict(sorted(depth.items()))


@dataclass(frozen=True)
class Throughput:
    #: Attempts that succeeded in each minute.
    succeeded: list[int]
    #: Attempts that failed (error, crashed, timed out) in each minute.
    failed: list[int]


def throughput(now: datetime.datetime) -> Throughput:
    succeeded, failed = [0] * POINTS, [0] * POINTS
    for i, ok, n in _fetch(THROUGHPUT, now):
        (succeeded if ok else failed)[i] = int(n)
    return Throughput(succeeded, failed)


@dataclass(frozen=True)
class Latency:
    #: Jobs started in each minute (those whose latency is known), and their p50 and p95 latency
    #: in seconds (None for a minute in which none started).
    started: list[int]
    p50: list[float | None]
    p95: list[float | None]
    #: Over the whole hour.
    hour_started: int = 0
    hour_p50: float | None = None
    hour_p95: float | None = None


def pickup_latency(now: datetime.datetime) -> Latency:
    started, p50, p95 = [0] * POINTS, [None] * POINTS, [None] * POINTS
    hour: tuple[int, float | None, float | None] = (0, None, None)
    for i, n, median, high in _fetch(PICKUP_LATENCY, now):
        if i is None:
            hour = (int(n), median, high)
        else:
            started[i], p50[i], p95[i] = int(n), median, high
    return Latency(started, p50, p95, *hour)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SlowName:
    name: str
    runs: int
    avg_seconds: float
    p95_seconds: float
    max_seconds: float


def slowest_names(now: datetime.datetime) -> list[SlowName]:
    return [SlowName(shown_name(name, task), int(runs), avg, p95, high)
            for name, task, runs, avg, p95, high in _fetch(SLOWEST_NAMES, now)]


@dataclass(frozen=True)
class FailingName:
    name: str
    failures: int
    attempts: int
    errors: int
    crashed: int
    timed_out: int


def failing_names(now: datetime.datetime) -> list[FailingName]:
    return [FailingName(shown_name(name, task), *counts)
            for name, task, *counts in _fetch(FAILING_NAMES, now)]


@dataclass(frozen=True)
class AliveWorker:
    name: str
    hostname: str
    pid: int
    concurrency: int
    queues: list[str]
    running: int
    jobs_done: int
    started_at: datetime.datetime
    seen_seconds_ago: float


def workers_alive(now: datetime.datetime) -> list[AliveWorker]:
    """Daemons whose heartbeat is fresh (seen within ``workers.STALE_AFTER``), by name."""
    rows = Worker.objects.filter(stopped_at__isnull=True,
                                 last_seen__gte=now - STALE_AFTER).order_by("name")
    return [AliveWorker(w.name, w.hostname, w.pid, w.concurrency, w.queues or ["*"],
                        len(w.running or []), w.jobs_done, w.started_at,
                        max(0.0, (now - w.last_seen).total_seconds()))
            for w in rows[:100]]


@dataclass(frozen=True)
class Dashboard:
    now: datetime.datetime
    times: list[datetime.datetime]
    depth: dict[str, list[int]]
    throughput: Throughput
    latency: Latency
    slowest: list[SlowName]
    failing: list[FailingName]
    workers: list[AliveWorker]
    totals: dict[str, int] = field(default_factory=dict)
    #: Flow control now: paused queues, and each limit's use (djasync.limits.usage).
    paused: list[str] = field(default_factory=list)
    limits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Whether no job was due, ran or finished in the hour."""
        return not self.depth and not any(self.throughput.succeeded) and not any(
            self.throughput.failed) and not self.latency.hour_started


def collect(now: datetime.datetime | None = None) -> Dashboard:
    """Gather everything the dashboard shows, for the hour ending at ``now``."""
    now = now or timezone.now()
    flow = throughput(now)
    depth = queue_depth(now)
    return Dashboard(
        now=now, times=sample_times(now), depth=depth, throughput=flow,
        latency=pickup_latency(now), slowest=slowest_names(now), failing=failing_names(now),
        workers=workers_alive(now),
        totals={"depth_now": sum(series[-1] for series in depth.values()),
                "succeeded": sum(flow.succeeded), "failed": sum(flow.failed)},
        paused=list(PausedQueue.objects.values_list("queue", flat=True)),
        limits=flow_limits.usage(),
    )
