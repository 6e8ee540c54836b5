"""The registry of worker daemons: who is alive, what they run (for queue_health and admin)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import uuid
from types import TracebackType
from typing import Any

import psycopg
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone
from psycopg.types.json import Jsonb

from djasync import attempts, leases
from djasync.models import Outcome, Worker

logger = logging.getLogger(__name__)

#: Seconds between heartbeats of a running daemon.
HEARTBEAT_SECONDS = 5.0
#: A daemon not seen for this long is dead (killed, host lost) and is marked stopped.
STALE_AFTER = datetime.timedelta(seconds=HEARTBEAT_SECONDS * 6)


#: Rows of daemons and ``flush_queue`` runs that stopped longer ago than this are deleted when
#: a daemon starts (``prune_jobs`` deletes them after its own ``--older-than``, too).
STOPPED_KEPT = datetime.timedelta(days=7)
#: A row never marked stopped (its daemon was killed, and no other daemon's heartbeat swept it)
#: is deleted only once it has not been seen for this long, whatever the retention asked for:
#: a daemon frozen for a while (a paused VM) must find its row when it wakes up.
SILENT_KEPT = datetime.timedelta(days=1)


def register(name: str, *, hostname: str, pid: int, concurrency: int,
             queues: list[str]) -> Worker:
    """Add this daemon's row; delete the rows of daemons stopped over :data:`STOPPED_KEPT`
    ago (each start adds a row: without this the table would only grow)."""
    prune_stopped(STOPPED_KEPT)
    return Worker.objects.create(name=name, hostname=hostname, pid=pid, concurrency=concurrency,
                                 queues=queues)


def prune_stopped(older_than: datetime.timedelta) -> int:
    """Delete the rows of daemons and ``flush_queue`` runs that stopped before ``now -
    older_than``, and of daemons not seen since then (and for :data:`SILENT_KEPT` at least);
    return how many.

    No other table references a worker row (attempts and jobs hold the worker's name as
    text), so their history keeps its names. A ``flush_queue`` run that died unmarked is left
    for :func:`charge_dead_in_process_runs`, which charges its job and marks it stopped.
    """
    now = timezone.now()
    silent_cutoff = now - max(older_than, SILENT_KEPT)
    deleted, _ = Worker.objects.filter(
        Q(stopped_at__lt=now - older_than)
        | (Q(stopped_at__isnull=True, last_seen__lt=silent_cutoff)
           & ~Q(name__startswith=IN_PROCESS_PREFIX))
    ).delete()
    if deleted:
        logger.info("deleted the rows of %s stopped workers", deleted)
    return deleted


def heartbeat(name: str, *, running: list[int], jobs_done: int,
              again: dict[str, Any] | None = None) -> None:
    """Refresh this daemon's row and mark daemons that stopped beating as stopped.

    ``again``: the daemon's row as :func:`register` wrote it (hostname, pid, concurrency,
    queues, started_at), to write it again if it is gone (deleted by hand, or by a prune that
    took the daemon for dead): a running daemon keeps its row."""
    now = timezone.now()
    updated = Worker.objects.filter(name=name).update(
        last_seen=now, running=running, jobs_done=jobs_done, stopped_at=None)
    if not updated and again is not None:
        Worker.objects.create(name=name, last_seen=now, running=running, jobs_done=jobs_done,
                              **again)
        logger.warning("this worker's row was gone (deleted by hand or by a prune); "
                       "registered again name=%s", name)
    Worker.objects.filter(stopped_at__isnull=True, last_seen__lt=now - STALE_AFTER).exclude(
        name__startswith=IN_PROCESS_PREFIX  # alive while their session is: see below
    ).update(stopped_at=now, running=[])
    charge_dead_in_process_runs()


#: Names of the worker rows of ``flush_queue`` runs (see :class:`InProcessWatch`).
IN_PROCESS_PREFIX = "flush_queue@"

#: Registrations of ``flush_queue`` runs whose process is gone (no session of that name left)
#: while they said they ran jobs. One statement takes each: two sweepers never charge twice.
TAKE_DEAD_IN_PROCESS = """
WITH dead AS (
    SELECT w.id, w.name, w.running, w.last_seen FROM djasync_worker w
     WHERE w.stopped_at IS NULL AND starts_with(w.name, %(prefix)s)
       AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.application_name = w.name)
       FOR UPDATE SKIP LOCKED
)
UPDATE djasync_worker w SET stopped_at = now(), running = '[]'::jsonb
  FROM dead WHERE w.id = dead.id
RETURNING dead.name, dead.running, dead.last_seen
"""


def charge_dead_in_process_runs() -> int:
    """Record a crashed attempt for each job a ``flush_queue`` process was running when it
    died (kill -9, a segfault, a job that killed it); return how many were charged.

    ``flush_queue`` has no supervisor to see its process die, and the job's own transaction,
    which PostgreSQL rolled back, held the only trace of the run. So it registers on a side
    connection named after it, which ends with the process: a registration whose session is
    gone and which still names a running job marks that job's crash (see :class:`InProcessWatch`).
    """
    charged = 0
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(TAKE_DEAD_IN_PROCESS, {"prefix": IN_PROCESS_PREFIX})
        for name, running_json, last_seen in cursor.fetchall():
            # Django's psycopg setup reads jsonb as text.
            running = [int(job_id) for job_id in (
                json.loads(running_json) if isinstance(running_json, str) else running_json)]
            for job_id in running:
                if attempts.record_lost(job_id, outcome=Outcome.CRASHED,
                                        started=last_seen, worker=name,
                                        reason="the flush_queue process running it died"):
                    charged += 1
                    logger.warning("crash of an in-process run recorded id=%s worker=%s",
                                   job_id, name)
            # A long job it ran holds a lease owned by "<name>/<token>": free it now.
            leases.free_leases_of_dead(name, charged=running[0] if running else None)
    return charged


#: Whether this session is seen under the name it just took (not so behind a pooler that
#: hands each statement to another server session).
SESSION_NAMED = """
SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = pg_backend_pid()
                                                AND application_name = %s)
"""


class InProcessWatch:
    """Make a crash of this process mid-job countable, as the daemon's supervisor does for its
    children: ``flush_queue``'s stand-in for a supervisor.

    On a side connection (autocommit) whose ``application_name`` is this run's worker name, the
    run registers, says before each job which one it is on, and clears it once the job's
    transaction has ended. If the process dies, the side session ends with it, and the next
    :func:`charge_dead_in_process_runs` (every ``flush_queue`` start, every daemon heartbeat)
    charges the job. Two round trips per job on the side connection: not for the daemon's
    hot path, fine for a command run by hand or by cron. A death in the few microseconds
    between a job's COMMIT and the clearing charges a job that retries a crash it did not
    have (a succeeded job is never charged: lost attempts are written for pending jobs only).
    """

    def __init__(self, queues: list[str] | None) -> None:
        self.queues = queues or []
        host = socket.gethostname()[:30]
        # application_name holds at most 63 bytes.
        self.name = f"{IN_PROCESS_PREFIX}{host}:{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.side: psycopg.Connection[Any] | None = None
        self.jobs_done = 0

    def __enter__(self) -> InProcessWatch:
        charge_dead_in_process_runs()
        side = connection.get_new_connection(connection.get_connection_params())
        side.autocommit = True
        self.side = side
        # Named before it registers, so that no sweeper ever sees the row without its session.
        side.execute("SELECT set_config('application_name', %s, false)", [self.name])
        if not side.execute(SESSION_NAMED, [self.name]).fetchone()[0]:
            # Behind a pooler in transaction mode the name lands on whichever server session
            # served that statement, so a sweep could take us for dead while we run: no watch.
            logger.warning("crash accounting of flush_queue is off: this connection's session "
                           "does not keep its name (a connection pooler?)")
            side.close()
            self.side = None
            return self
        side.execute(
            "INSERT INTO djasync_worker (name, hostname, pid, concurrency, queues, started_at,"
            " last_seen, running, jobs_done) VALUES (%s, %s, %s, 1, %s::jsonb, now(), now(),"
            " '[]'::jsonb, 0)",
            [self.name, socket.gethostname()[:255], os.getpid(),
             Jsonb(self.queues)])
        return self

    def running(self, job_id: int) -> None:
        """Say which job this process is about to run (committed before the job starts)."""
        if self.side is None:  # no watch (see __enter__)
            return
        self.side.execute(
            "UPDATE djasync_worker SET running = %s::jsonb, last_seen = now() WHERE name = %s",
            [Jsonb([job_id]), self.name])

    def finished(self, jobs: int) -> None:
        """The jobs' transaction has ended (committed or rolled back)."""
        self.jobs_done += jobs
        if self.side is None:
            return
        self.side.execute(
            "UPDATE djasync_worker SET running = '[]'::jsonb, last_seen = now(), jobs_done = %s"
            " WHERE name = %s", [self.jobs_done, self.name])

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop the registration. After an exception (Ctrl-C) the job's transaction was rolled
        back by this process, not by a crash: nothing is charged."""
        if self.side is None:
            return
        try:
            self.side.execute(
                "UPDATE djasync_worker SET running = '[]'::jsonb, stopped_at = now(),"
                " jobs_done = %s WHERE name = %s", [self.jobs_done, self.name])
        except psycopg.Error as error:  # the database went away: the sweep will find us
            logger.warning("cannot mark the flush_queue run stopped error=%s", error)
        finally:
            self.side.close()


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
