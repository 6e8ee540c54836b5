"""The supervisor's database work, in a process of its own, so that its loop never waits on it.

The supervisor enforces deadlines (a job past its timeout is killed, a stop past
``--shutdown-timeout`` is forced) from the local clock. A database call in its loop would stop
that clock for as long as the call waits: a heartbeat waiting on a lock someone holds on the
worker's row, or any statement sent into a network partition, which TCP retries for seconds.
So every statement the supervisor needs (heartbeat, lost attempts, leases of dead children,
the next ``run_after``, periodic slots, the burst check, the queue depth for metrics) is sent
to this *agent*, a process forked once at start, which runs them one after the other on its own
connection and answers over a pipe; the loop picks the answers up like any other event.

A process, not a thread: the supervisor forks its children, and a thread alive at a fork can
leave a lock (logging's, psycopg's) held forever in the child. Each request runs in a
transaction with ``SET LOCAL`` lock and statement timeouts (nothing session-level, which a
connection pooler would hand to other clients), so one stuck statement delays the next ones by
seconds, not for ever. If the agent dies, the supervisor starts another.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from djasync import attempts, leases, limits, periodic, sql, workers
from djasync.conf import NOTIFY_CHANNEL
from djasync.connections import lost_connection, one_line
from djasync.models import Job, Outcome
from djasync.registry import display_name

logger = logging.getLogger(__name__)

#: How long one of the agent's statements may wait for a lock, and run, before it gives up (ms).
LOCK_TIMEOUT_MS = 2_000
STATEMENT_TIMEOUT_MS = 10_000
#: How long to wait for PostgreSQL to end a dead child's session before waking the workers
#: anyway, and how often to look meanwhile (it takes about a millisecond).
SESSION_END_WAIT_SECONDS = 2.0
SESSION_END_LOOK_SECONDS = 0.002


class Agent:
    """The supervisor's end: send requests, never wait; :meth:`receive` takes the answers."""

    def __init__(self, context: Any, periodic_entries: tuple[periodic.Periodic, ...]) -> None:
        self.context = context
        self.periodic_entries = periodic_entries
        self.process: Any = None
        self.pipe: Connection | None = None
        self.ids = itertools.count(1)
        #: Requests sent and not answered yet: id -> (kind, callback).
        self.waiting: dict[int, tuple[str, Callable[[bool, Any], None]]] = {}

    def start(self, inherited_fds: list[int]) -> None:
        """Fork the agent (Django's connections must be closed: see the supervisor's _spawn)."""
        parent_end, child_end = self.context.Pipe(duplex=True)
        # Our end must not live on in the agent: it stops when its pipe reads end-of-file.
        inherited = [*inherited_fds, parent_end.fileno()]
        self.process = self.context.Process(
            target=agent_main, args=(child_end, os.getpid(), inherited, self.periodic_entries),
            name="djasync-agent", daemon=False)
        self.process.start()
        child_end.close()
        self.pipe = parent_end
        logger.debug("database agent started pid=%s", self.process.pid)

    def busy(self, kind: str) -> bool:
        """Whether a request of this kind is on its way (then another would only queue up)."""
        return any(k == kind for k, _ in self.waiting.values())

    def submit(self, kind: str, *args: Any,
               on_done: Callable[[bool, Any], None] | None = None) -> None:
        """Send a request; ``on_done(ok, value)`` runs in the supervisor's loop when answered
        (``ok`` false: ``value`` is the error's text, logged by the agent already)."""
        assert self.pipe is not None
        request_id = next(self.ids)
        self.waiting[request_id] = (kind, on_done or _ignore)
        with contextlib.suppress(OSError):  # the agent died: failed when it is restarted
            self.pipe.send((request_id, kind, args))

    def fileno(self) -> int:
        assert self.pipe is not None
        return self.pipe.fileno()

    @property
    def sentinel(self) -> int:
        return int(self.process.sentinel)

    def receive(self) -> None:
        """Run the callbacks of the answers that arrived."""
        assert self.pipe is not None
        while True:
            try:
                if not self.pipe.poll():
                    return
                request_id, ok, value = self.pipe.recv()
            except (EOFError, OSError):
                return
            _, callback = self.waiting.pop(request_id, ("", _ignore))
            callback(ok, value)

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def restart(self, inherited_fds: list[int]) -> None:
        """The agent died (killed, out of memory): fail what it had, start another."""
        self.receive()  # answers it sent before dying
        self.process.join(timeout=1)
        logger.error("database agent died (exit code %s); starting another",
                     self.process.exitcode)
        self.close()
        waiting, self.waiting = self.waiting, {}
        for _, callback in waiting.values():
            callback(False, "the database agent died")
        self.start(inherited_fds)

    def close(self) -> None:
        """Stop the agent: it finishes the request it runs (bounded by its timeouts)."""
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None

    def join(self, timeout: float) -> None:
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                logger.warning("database agent still busy after %.0f s: killing it", timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.join(5)


def _ignore(ok: bool, value: Any) -> None:
    pass


# -- the agent process --------------------------------------------------------------------------


def agent_main(pipe: Connection, parent_pid: int, inherited_fds: list[int],
               periodic_entries: tuple[periodic.Periodic, ...]) -> None:
    """Entry point of the agent process (after fork): answer requests until the pipe closes."""
    from djasync_worker.child import _die_with_parent

    for fd in inherited_fds:  # other children's sockets: their sessions must not live on here
        with contextlib.suppress(OSError):
            os.close(fd)
    _die_with_parent()
    # Signals are for the supervisor: it closes our pipe when it is done with us, after its
    # last requests (marking the worker stopped) are answered.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.getppid() != parent_pid:
        raise SystemExit(1)
    tasks = Tasks(periodic_entries)
    lost_at: float | None = None  # when our connection was found lost (monotonic)
    while True:
        try:
            request_id, kind, args = pipe.recv()
        except (EOFError, OSError):
            break
        try:
            answer = (request_id, True, getattr(tasks, kind)(*args))
            if lost_at is not None:
                logger.info("database connection back after %.1f s task=%s",
                            time.monotonic() - lost_at, kind)
                lost_at = None
        except Exception as exc:
            # A lost connection is one line per outage (each request fails meanwhile: a
            # heartbeat, a lost attempt tried again every few tenths of a second).
            reason = lost_connection(exc)
            if reason is None:
                logger.warning("database work failed task=%s error=%s", kind, one_line(exc))
            elif lost_at is None:
                lost_at = time.monotonic()
                logger.warning("database connection lost, reconnecting task=%s error=%s", kind,
                               reason)
            else:
                logger.debug("database connection still lost task=%s error=%s", kind, reason)
            with contextlib.suppress(Exception):
                connection.close()  # a fresh connection for the next request
            answer = (request_id, False, str(exc))
        try:
            pipe.send(answer)
        except OSError:
            break
    with contextlib.suppress(Exception):
        connection.close()
    raise SystemExit(0)


@contextlib.contextmanager
def bounded() -> Iterator[None]:
    """A transaction whose statements give up after the agent's lock and statement timeouts."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT set_config('lock_timeout', %s, true),"
                       " set_config('statement_timeout', %s, true)",
                       [str(LOCK_TIMEOUT_MS), str(STATEMENT_TIMEOUT_MS)])
        yield


class Tasks:
    """What the supervisor may ask for, one method per request kind."""

    def __init__(self, periodic_entries: tuple[periodic.Periodic, ...]) -> None:
        self.scheduler = periodic.Scheduler(periodic_entries) if periodic_entries else None
        self.periodic_started = False

    def heartbeat(self, name: str, running: list[int], jobs_done: int,
                  again: dict[str, Any] | None = None) -> None:
        with bounded():
            workers.heartbeat(name, running=running, jobs_done=jobs_done, again=again)

    def record_lost(self, job_id: int, outcome: str, started: datetime.datetime, worker: str,
                    reason: str, late: bool) -> tuple[int | None, tuple[str, str] | None]:
        """Write a lost attempt; return its id and the job's (queue, name), for metrics."""
        with bounded():
            attempt_id = attempts.record_lost(
                job_id, outcome=Outcome(outcome), started=started, worker=worker,
                reason=reason, late=late, holder=worker)
            row = Job.objects.filter(pk=job_id).values_list("queue", "name", "args").first()
        labels = (row[0], display_name(row[1], row[2])) if row is not None else None
        return attempt_id, labels

    def wake_after_session(self, backend_pid: int) -> bool:
        """Notify the workers once PostgreSQL has ended this server process's session (a dead
        child's: its flow-control slots are given back then); return whether it had ended
        within ``SESSION_END_WAIT_SECONDS``. Each look is a transaction of its own: one
        transaction sees one snapshot of the server's sessions."""
        begun = time.monotonic()
        deadline = begun + SESSION_END_WAIT_SECONDS
        while True:
            with bounded(), connection.cursor() as cursor:
                cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s)",
                               [backend_pid])
                ended = not cursor.fetchone()[0]
            if ended or time.monotonic() > deadline:
                break
            time.sleep(SESSION_END_LOOK_SECONDS)
        with bounded(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '*')", [NOTIFY_CHANNEL])
        logger.info("a dead child's session %s, its slots are free: workers woken "
                    "backend_pid=%s waited_ms=%.1f",
                    "ended" if ended else "did not end in time", backend_pid,
                    (time.monotonic() - begun) * 1000)
        return ended

    def mark_lost_late(self, attempt_id: int) -> None:
        with bounded():
            attempts.mark_lost_late(attempt_id)

    def release_leases(self, worker: str, running: int | None) -> None:
        with bounded():
            leases.free_leases_of_dead(worker, charged=running)

    def next_run_after(self, queues: list[str]) -> float | None:
        """Seconds until the earliest future ``run_after`` of the served queues (None: none)."""
        with bounded():
            pending = Job.objects.scheduled()
            if queues:
                pending = pending.filter(queue__in=queues)
            when = pending.order_by("run_after").values_list("run_after", flat=True).first()
        if when is None:
            return None
        return max(0.0, (when - timezone.now()).total_seconds())

    def periodic(self) -> float | None:
        """Enqueue the periodic slots that came due; return seconds until the next one."""
        assert self.scheduler is not None
        before = dict(self.scheduler.next)
        try:
            with bounded():
                if not self.periodic_started:
                    self.scheduler.start(timezone.now())
                wait = self.scheduler.tick(timezone.now())
        except Exception:
            self.scheduler.next = before  # rolled back: those slots are still to enqueue
            raise
        self.periodic_started = True
        return wait

    def due_jobs(self, queues: list[str]) -> bool:
        with bounded():
            # Jobs of a paused queue are not due for anyone (a burst worker stops).
            paused = limits.paused_queues()
            served = [q for q in queues if q not in paused]
            if queues and not served:
                return False
            query = sql.claim(by_queue=bool(served), by_name_prefix=False, exists=True,
                              paused=bool(paused) and not served)
            with connection.cursor() as cursor:
                cursor.execute(query, {"queues": served, "now": None, "paused": paused})
                return bool(cursor.fetchone()[0])

    def queue_depth(self) -> list[tuple[str, int, int, float]] | None:
        from djasync_worker.metrics import read_queue_depth

        return read_queue_depth()

    def mark_stopped(self, name: str, jobs_done: int) -> None:
        with bounded():
            workers.mark_stopped(name, jobs_done=jobs_done)
