"""One child process: wait to be woken, claim and run jobs through the executor, repeat.

The child owns one database connection, used only for job transactions. It never listens for
notifications itself: the supervisor does, and wakes idle children over their pipes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import psycopg
from django.db import DatabaseError, connection
from django.db.backends.signals import connection_created

from djasync import conf, executor, leases, limits
from djasync.connections import lost_connection, one_line
from djasync.executor import ClaimedJob, Finished

if TYPE_CHECKING:
    from djasync_worker.metrics import Exporter

logger = logging.getLogger(__name__)

#: Seconds to wait before retrying after the database went away, doubling up to the maximum.
RECONNECT_DELAY_SECONDS = 0.05
RECONNECT_DELAY_MAX_SECONDS = 2.0


#: Layout of the array a child shares with its supervisor (written by the child only).
#: The job id is written last when a job starts and cleared first when it ends, so a reader
#: that sees an id sees that job's start and timeout.
#: IN_TRANSACTION is IN_TRANSACTION_ATOMIC while the job runs inside the transaction of the
#: child's connection (an atomic job), IN_SESSION_SLOTS while a long job (``atomic=False``,
#: under a lease) runs holding its flow-control slots on that connection's session (behind a
#: pooler: on a connection of their own, whose socket the child sends too), else 0:
#: while it is not 0, that session's end means the job's claim or its slots are gone (see the
#: supervisor's fence).
#: BACKEND_PID: the server process of the child's connection (the pooler's key behind one),
#: so that the supervisor can tell when PostgreSQL has ended a dead child's session.
(JOB_ID, STARTED_MONOTONIC, TIMEOUT, STARTED_EPOCH, JOBS_DONE, IN_TRANSACTION,
 BACKEND_PID) = range(7)
SHARED_SIZE = 7
IN_TRANSACTION_ATOMIC = 1.0
IN_SESSION_SLOTS = 2.0
NO_TIMEOUT = -1.0


@dataclass(frozen=True)
class ChildOptions:
    queues: tuple[str, ...]
    batch_size: int
    max_jobs: int | None
    #: Prometheus metrics (``--metrics-port``), or None: then nothing is counted.
    metrics: Exporter | None = None


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process if the supervisor dies (kill -9 of the supervisor).

    The child's transaction then rolls back and its job is claimable again at once, instead
    of an orphan running on with nobody to enforce its timeout.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe's EOF stops the child instead
        pass


class _Stopping(Exception):
    """Raised to leave a claim untouched because the worker is stopping."""


class Child:
    def __init__(self, pipe: Connection, shared: Any, options: ChildOptions,
                 parent_pid: int) -> None:
        self.pipe = pipe
        self.shared = shared
        self.options = options
        self.parent_pid = parent_pid
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = False
        self.jobs_done = 0
        self.recycle = False  # ran --max-jobs-per-child jobs: exit, to be replaced
        self.idle = True
        self.metrics = options.metrics
        #: When the database connection was found lost (monotonic), until a claim goes through.
        self.lost_at: float | None = None
        self._signals, signal_writer = socket.socketpair()
        signal_writer.setblocking(False)
        self._signal_writer = signal_writer

    def run(self) -> int:
        _die_with_parent()
        if os.getppid() != self.parent_pid:
            return 1  # the supervisor died before we could ask to die with it
        # Ctrl-C reaches every process of the terminal's group: the supervisor handles it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.set_wakeup_fd(self._signal_writer.fileno())
        connection_created.connect(self._share_socket)
        # A session we end ourselves is no lost session: the fence must not kill us for it.
        executor.BEFORE_DELIBERATE_CLOSE.append(self._leaving_the_session)
        # Behind a pooler a long job's slots are held by a connection of their own: the
        # supervisor's fence watches that one while the job runs.
        limits.ON_SLOT_CONNECTION.append(self._share_slot_socket)
        delay = RECONNECT_DELAY_SECONDS
        claim = True  # a new child looks for work at once
        self.idle = True  # as far as the supervisor knows
        while not self.stopping and not self.recycle:
            if not claim:
                claim = self._wait_for_wake()
                continue
            try:
                executor.run_batches(
                    self.options.batch_size,
                    self._batch_done,
                    queues=self.options.queues or None,
                    worker=self.name,
                    before_each=self._started,
                )
            except _Stopping:
                self.shared[JOB_ID] = 0
                break  # the claim rolled back: the job was never started and stays queued
            except Exception as exc:
                self.shared[JOB_ID] = 0
                if _serialization_failure(exc) and connection.is_usable():
                    # REPEATABLE READ or SERIALIZABLE: another worker's commit met our
                    # snapshot. The transaction rolled back whole (a job of it had not
                    # committed: it runs again, uncharged); claim again at once, as
                    # PostgreSQL's hint says. Normal at these levels, so not an error.
                    logger.debug("claiming again after a serialization failure error=%s", exc)
                    continue
                self._after_error(exc)
                if self._sleep(delay):
                    break
                delay = min(delay * 2, RECONNECT_DELAY_MAX_SECONDS)
                continue
            # Anything else (KeyboardInterrupt raised by a job's code) ends this process with
            # the job still published, so that the supervisor charges the job with the crash.
            self.shared[JOB_ID] = 0
            delay = RECONNECT_DELAY_SECONDS
            self._connection_back()
            if not self.stopping and not self.recycle:  # nothing is due
                self._send(("idle",))
                self.idle, claim = True, False
        connection.close()
        return 0

    def _batch_done(self, batch: list[Finished]) -> bool:
        """After each committed batch (the next one may be claimed already): count it, and
        say whether to go on. Uses no database (see ``executor.run_batches``)."""
        self.shared[JOB_ID] = 0
        self._connection_back()
        if self.metrics is not None:
            self.metrics.jobs_finished(batch)
        self.jobs_done += len(batch)
        self.shared[JOBS_DONE] = self.jobs_done
        if self.idle:  # found work: the supervisor may wake another idle child
            self._send(("busy",))
            self.idle = False
        if self.options.max_jobs and self.jobs_done >= self.options.max_jobs:
            logger.info("child recycling jobs_done=%s", self.jobs_done)
            self.recycle = True
        return not (self.stopping or self.recycle)

    def _connection_back(self) -> None:
        """A claim or a batch went through: if the connection had been lost, say so, once."""
        if self.lost_at is not None:
            logger.info("database connection back after %.1f s",
                        time.monotonic() - self.lost_at)
            self.lost_at = None

    def _leaving_the_session(self) -> None:
        self.shared[IN_TRANSACTION] = 0.0

    def _share_socket(self, sender: Any, connection: Any, **kwargs: Any) -> None:
        """Give the supervisor a duplicate of our database socket, before any claim.

        If this process dies mid-job, the supervisor's copy keeps the session (and so the
        job's row lock) alive until it has recorded the crash; only then does it close the
        copy and let PostgreSQL roll the transaction back. So a job that kills its process
        cannot be re-claimed before the crash is counted, and poison jobs stop at
        ``max_attempts`` exactly.
        """
        if connection.alias != "default":
            return
        if threading.current_thread() is not threading.main_thread():
            return  # a lease-renewal thread's connection holds no job transaction
        self.shared[BACKEND_PID] = connection.connection.info.backend_pid
        self._send(("conn",))
        try:
            reduction.send_handle(self.pipe, connection.connection.fileno(), self.parent_pid)
        except OSError:
            os._exit(1)
        executor.set_session_timeouts_if_direct()

    def _share_slot_socket(self, fd: int | None) -> None:
        """Give the supervisor a duplicate of the socket of the connection holding a long
        job's flow-control slots (behind a pooler: see ``limits``), or say it is closed (just
        before it is): while the job runs, that session's end frees its slots."""
        if fd is None:
            self._send(("slots_closed",))
            return
        self._send(("slots_conn",))
        try:
            reduction.send_handle(self.pipe, fd, self.parent_pid)
        except OSError:
            os._exit(1)

    def _started(self, job: ClaimedJob) -> None:
        """Publish the job we start in shared memory: no message, no system call per job.

        If a stop was asked for while we claimed it, don't start it: raising here rolls the
        claim back, so the job stays queued for another worker.
        """
        if self.stopping:
            raise _Stopping
        meta = job.meta if isinstance(job.meta, dict) else {}
        timeout = meta.get("timeout", conf.get().TIMEOUT)
        self.shared[STARTED_MONOTONIC] = time.monotonic()
        self.shared[TIMEOUT] = NO_TIMEOUT if timeout is None else float(timeout)
        self.shared[STARTED_EPOCH] = time.time()
        # The session holds the job's claim: its transaction (an atomic job), or the slots of
        # a long job's flow-control keys (taken at session level just before this): its end
        # frees the job or the slots, so the supervisor's fence must stop the job then.
        if not leases.is_leased(meta):
            self.shared[IN_TRANSACTION] = IN_TRANSACTION_ATOMIC
        elif limits.holds_session_slots():
            self.shared[IN_TRANSACTION] = IN_SESSION_SLOTS
        else:
            self.shared[IN_TRANSACTION] = 0.0
        self.shared[JOB_ID] = job.id
        if self.metrics is not None:
            self.metrics.job_started(job)

    def _send(self, message: tuple) -> None:
        try:
            self.pipe.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            # The supervisor is gone; nobody watches this process any more.
            os._exit(1)

    def _wait_for_wake(self) -> bool:
        """Block until the supervisor wakes or stops us; return whether to claim."""
        ready = wait([self.pipe, self._signals])
        if self._signals in ready:
            self._drain_signals()
        if self.pipe in ready:
            try:
                message = self.pipe.recv()
            except (EOFError, ConnectionResetError):
                self.stopping = True
                return False
            if message[0] == "stop":
                self.stopping = True
                return False
            return True
        return False

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` unless told to stop; return whether we must stop."""
        ready = wait([self.pipe, self._signals], timeout=seconds)
        if self._signals in ready:
            self._drain_signals()
        if self.pipe in ready:
            try:
                if self.pipe.recv()[0] == "stop":
                    self.stopping = True
            except (EOFError, ConnectionResetError):
                self.stopping = True
        return self.stopping

    def _drain_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._signals.recv(4096)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        # systemd (KillMode=control-group) sends SIGTERM to every process: finish the current
        # job, then exit, exactly as when the supervisor asks.
        self.stopping = True

    def _after_error(self, exc: Exception) -> None:
        """Log a lost connection as one line, once per outage (the reconnection is logged
        with its time by :meth:`_connection_back`); any other error with its traceback.

        Decided by the exception first (``connections.lost_connection``): by the time it
        reaches us, Django's ``atomic`` may have replaced a broken connection with a new one.
        Else by the connection's state: psycopg reports some server-side ends of a session as
        other classes, and a closed or broken connection says it all.
        """
        reason = lost_connection(exc)
        if reason is None:
            raw = connection.connection
            gone = raw is None or raw.closed or getattr(raw, "broken", False)
            if gone or not connection.is_usable():
                reason = one_line(exc)
        if reason is None:
            logger.exception("claiming or recording a job failed; retrying")
        elif self.lost_at is None:
            self.lost_at = time.monotonic()
            logger.warning("database connection lost, reconnecting error=%s", reason)
        else:
            logger.debug("database connection still lost error=%s", reason)
        try:
            connection.close()
        except Exception:  # closing a dead connection may itself fail; it is gone either way
            logger.debug("closing the dead connection failed", exc_info=True)
        # The supervisor's copy of the socket must not keep a half-dead session alive.
        self._send(("conn_closed",))


def _serialization_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (Django's wrapper, or psycopg's error) is PostgreSQL's "could not
    serialize access" (SQLSTATE 40001)."""
    cause = exc.__cause__ if isinstance(exc, DatabaseError) else exc
    return isinstance(cause, psycopg.errors.SerializationFailure)


def child_main(pipe: Connection, shared: Any, options: ChildOptions, parent_pid: int,
               inherited_sockets: list[int]) -> None:
    """Entry point of a child process (runs after fork)."""
    for fd in inherited_sockets:
        with contextlib.suppress(OSError):
            os.close(fd)
    code = Child(pipe, shared, options, parent_pid).run()
    raise SystemExit(code)
