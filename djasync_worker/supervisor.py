"""The supervisor: N child processes, wake-ups, crash and timeout accounting, shutdown.

It forks the children (Django is set up once, connections closed before each fork), listens
for NOTIFY on its own connection and wakes idle children over their pipes. It knows which job
each child is running, so when a child dies (kill -9, segfault, OOM, ``os._exit``) it charges
that job alone with a ``crashed`` attempt, and when a job overruns its timeout it kills the
child and records ``timed out``. The dead child's transaction has rolled back, so the job is
claimable again at once. The supervisor itself never runs a job.

Its loop never waits on the database, so that those deadlines hold whatever PostgreSQL or the
network does: every statement it needs goes to its database agent (:mod:`.agent`), a process
of its own, and the answer comes back as an event. And it fences a child whose database
session is gone: while an atomic job runs, the child's transaction is its claim on the job, so
when PostgreSQL ends that session (``pg_terminate_backend``, an idle timeout, a partition
seen by keepalives) the job is free for another worker, and the child is killed at once rather
than left running the job as if it still held it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import multiprocessing
import os
import select
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from django.db import connection, connections

from djasync import budget, conf, limits, workers
from djasync.connections import configure_worker_connections, listen_conninfo
from djasync.models import Outcome
from djasync_worker import child as shared_layout
from djasync_worker.agent import Agent
from djasync_worker.child import ChildOptions, child_main
from djasync_worker.listener import Listener
from djasync_worker.systemd import Notifier

if TYPE_CHECKING:
    from djasync_worker.metrics import Exporter

logger = logging.getLogger(__name__)

#: Seconds a job may overrun its timeout (which its SQL already obeys) before it is killed.
KILL_GRACE_SECONDS = 1.0
#: While a child is busy, how often to look for jobs past their deadline.
DEADLINE_CHECK_SECONDS = 0.1
#: In --burst, how soon to look again when due jobs exist but are locked.
BURST_RECHECK_SECONDS = 0.05
#: Shortest pause before replacing a child that died, so a crash loop cannot spin.
RESPAWN_DELAY_SECONDS = 0.05
#: How often to try again to write a lost attempt while the database is away (a restart).
LOST_RETRY_SECONDS = 0.2
#: At the end, how long to wait for the database agent to write what is left (lost attempts,
#: the worker's row) before leaving it unwritten.
FINISH_DATABASE_SECONDS = 5.0
#: How long a scrape waits for the agent to read the queue depth (metrics), and the age past
#: which a depth read before is not reported.
QUEUE_DEPTH_WAIT_SECONDS = 0.5
QUEUE_DEPTH_MAX_AGE_SECONDS = 10.0


@dataclass
class Options:
    concurrency: int
    queues: tuple[str, ...] = ()
    burst: bool = False
    max_jobs_per_child: int | None = None
    shutdown_timeout: float = 30.0
    poll_interval: float = 5.0
    batch_size: int = 1


@dataclass
class ChildState:
    slot: int
    process: Any
    pipe: Connection
    #: The array the child publishes its current job in (see ``child.JOB_ID`` and friends).
    shared: Any
    idle: bool = False
    reported: bool = False
    killed_for_timeout: bool = False
    #: Killed because its database session ended while it ran an atomic job (the fence).
    killed_for_lost_session: bool = False
    #: Our duplicate of the child's database socket (see ``Child._share_socket``).
    db_socket: int | None = None
    #: Behind a pooler, our duplicate of the socket of the connection holding the flow-control
    #: slots of the long job the child runs (``Child._share_slot_socket``), else None.
    slot_socket: int | None = None
    #: Why it was last woken ("poll" matters: a poll that finds work hints LISTEN is broken).
    woken_by: str = ""


def running_job(child: ChildState) -> tuple[int, float, float | None, float] | None:
    """Read (job id, started monotonic, timeout, started epoch) of the child's job, if any."""
    shared = child.shared
    for _ in range(3):  # the child may be writing; a consistent read sees the same id twice
        job_id = int(shared[shared_layout.JOB_ID])
        if not job_id:
            return None
        started, timeout, epoch = (shared[shared_layout.STARTED_MONOTONIC],
                                   shared[shared_layout.TIMEOUT],
                                   shared[shared_layout.STARTED_EPOCH])
        if int(shared[shared_layout.JOB_ID]) == job_id:
            return job_id, started, None if timeout < 0 else timeout, epoch
    return None


def watched_socket(child: ChildState) -> int | None:
    """The socket whose end frees the claim of the child's job: the child's own, or behind a
    pooler, while a long job runs, the one holding its flow-control slots."""
    if (child.slot_socket is not None
            and child.shared[shared_layout.IN_TRANSACTION] == shared_layout.IN_SESSION_SLOTS):
        return child.slot_socket
    return child.db_socket


def running_in_session(child: ChildState) -> int | None:
    """The id of the job whose claim the child's session holds: an atomic job (run inside the
    session's transaction), or a long job holding its flow-control slots on the session."""
    shared = child.shared
    job_id = int(shared[shared_layout.JOB_ID])
    if not job_id or not shared[shared_layout.IN_TRANSACTION]:
        return None
    return job_id if int(shared[shared_layout.JOB_ID]) == job_id else None


@dataclass
class LostAttempt:
    job_id: int
    outcome: Outcome
    started: datetime.datetime
    reason: str
    worker: str
    #: Our copy of the dead child's database socket, closed once the attempt is written.
    db_socket: int | None = None
    #: The server process of that session (``child.BACKEND_PID``; 0: unknown).
    backend_pid: int = 0


@dataclass
class Supervisor:
    options: Options
    notifier: Notifier = field(default_factory=Notifier)
    #: Prometheus metrics (``--metrics-port``), or None: then nothing is counted.
    metrics: Exporter | None = None

    def __post_init__(self) -> None:
        configure_worker_connections()  # keepalives etc. for every connection opened from here
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.children: dict[int, ChildState] = {}
        self.context = multiprocessing.get_context("fork")
        self.stopping = False
        self.forced = False
        self.stop_deadline: float | None = None
        self.jobs_done_by_exited = 0
        self.lost: list[LostAttempt] = []
        self.next_lost_retry = 0.0
        self.ready_sent = False
        self.respawn_at: dict[int, float] = {}
        self.next_poll = 0.0
        self.next_timer_check = 0.0
        self.next_run_after: float | None = None
        self.next_heartbeat = 0.0
        self.next_watchdog = 0.0
        self.next_burst_check = 0.0
        self.signal_reader, self.signal_writer = socket.socketpair()
        self.signal_writer.setblocking(False)
        self.signal_reader.setblocking(False)
        self.pending_signals: list[int] = []
        self.listener = Listener(_conninfo())
        entries = conf.get().PERIODIC
        self.periodic = bool(entries)
        self.next_periodic = 0.0
        self.agent = Agent(self.context, entries or ())
        #: Ask for the next run_after again when the answer in flight comes (it may be stale).
        self.timer_again = False
        self.queue_depth_rows: list[tuple[str, int, int, float]] | None = None
        self.registration: dict[str, Any] | None = None
        self.queue_depth_at = 0.0

    # -- life cycle -------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        row = workers.register(self.name, hostname=socket.gethostname(), pid=os.getpid(),
                               concurrency=self.options.concurrency,
                               queues=list(self.options.queues))
        #: What the heartbeat writes again if our row is gone (deleted while we run).
        self.registration = {"hostname": row.hostname, "pid": row.pid,
                             "concurrency": row.concurrency, "queues": row.queues,
                             "started_at": row.started_at}
        logger.info("worker starting name=%s concurrency=%s queues=%s burst=%s", self.name,
                    self.options.concurrency, ",".join(self.options.queues) or "*",
                    self.options.burst)
        budget.check_at_start(self.name, self.options.concurrency)
        connections.close_all()  # the agent must not inherit our connection
        self.agent.start(self._socket_copies())
        self.listener.ensure()
        if self.metrics is not None:
            self.metrics.watch(self)
        for slot in range(self.options.concurrency):
            self._spawn(slot)
        while self.children or not self.stopping:
            self._loop_once()
        self._finish()
        return 0

    def _loop_once(self) -> None:
        now = time.monotonic()
        if not self.stopping and self.listener.ensure():
            self._wake(1)  # notifications may have been missed while disconnected
        waitables: list[Any] = [self.signal_reader]
        listen_fd = self.listener.fileno()
        if listen_fd is not None:
            waitables.append(listen_fd)
        if self.metrics is not None:
            waitables.append(self.metrics)
        if self.agent.pipe is not None:
            waitables.extend([self.agent.pipe, self.agent.sentinel])
        for child in self.children.values():
            waitables.extend([child.pipe, child.process.sentinel])
        ready = _wait(waitables, self._fenced_sockets(), timeout=self._timeout(now))
        if self.agent.pipe is not None and self.agent.pipe in ready:
            self.agent.receive()
        if self.agent.pipe is not None and not self.agent.alive():
            self.agent.restart(self._socket_copies())
        if self.signal_reader in ready:
            self._handle_signals()
        for child in list(self.children.values()):
            if child.pipe in ready:
                self._read_messages(child)
        for child in list(self.children.values()):
            if child.process.sentinel in ready or not child.process.is_alive():
                self._reap(child)
        if listen_fd is not None and listen_fd in ready:
            self._on_notifications(self.listener.receive())
        if self.metrics is not None and self.metrics in ready:
            self.metrics.serve()
        self._tick(time.monotonic())

    def _timeout(self, now: float) -> float:
        moments = [self.next_poll, self.next_heartbeat, self.listener.next_deadline()]
        if self.next_run_after is not None:
            moments.append(self.next_run_after)
        if self.stop_deadline is not None:
            moments.append(self.stop_deadline)
        if any(not c.idle for c in self.children.values()):
            moments.append(now + DEADLINE_CHECK_SECONDS)  # jobs start without telling us
        moments.extend(self.respawn_at.values())
        # (Not while the agent works on it: the moment is past, and we would spin.)
        if self.lost and not self.agent.busy("record_lost"):
            moments.append(self.next_lost_retry)
        if self.notifier.watchdog_interval:
            moments.append(self.next_watchdog)
        if (self.options.burst and self._all_idle()  # else it would spin while they work
                and not self.agent.busy("due_jobs")):
            moments.append(self.next_burst_check)
        if self.periodic and not self.agent.busy("periodic"):
            moments.append(self.next_periodic)
        return max(0.0, min(moments) - now)

    def _tick(self, now: float) -> None:
        if self.lost and now >= self.next_lost_retry:  # not written yet: the database was away
            self._record_lost()
        for slot, when in list(self.respawn_at.items()):
            if when <= now and not self.stopping:
                del self.respawn_at[slot]
                self._spawn(slot)
        for child in self.children.values():
            running = running_job(child)
            if running is None or child.killed_for_timeout:
                continue
            job_id, started, timeout, _ = running
            if timeout is not None and now >= started + timeout + KILL_GRACE_SECONDS:
                logger.warning("job timed out, killing its child id=%s pid=%s", job_id,
                               child.process.pid)
                child.killed_for_timeout = True
                _kill(child.process.pid)
        self._fence()
        if self.stopping:
            if self.stop_deadline is not None and now >= self.stop_deadline:
                self._kill_all("shutdown timeout reached")
            return
        if now >= self.next_poll:
            self.next_poll = now + self.options.poll_interval
            self._wake(1, reason="poll")
        if self.next_run_after is not None and now >= self.next_run_after:
            self.next_run_after = None
            self._wake(1)
        if self.periodic and now >= self.next_periodic and not self.agent.busy("periodic"):
            self._run_periodic(now)
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + workers.HEARTBEAT_SECONDS
            self._heartbeat()
        if self.notifier.watchdog_interval and self.ready_sent and now >= self.next_watchdog:
            self.next_watchdog = now + self.notifier.watchdog_interval
            self.notifier.watchdog()
        if (self.options.burst and self._all_idle() and now >= self.next_burst_check
                and not self.agent.busy("due_jobs")):
            self.agent.submit("due_jobs", list(self.options.queues), on_done=self._burst_answer)

    def _burst_answer(self, ok: bool, due: Any) -> None:
        if self.stopping or not self._all_idle():
            return  # work came meanwhile: look again once the children are idle
        if not ok or due:
            # Due but locked: running in another daemon, or held by a dead child's session
            # that PostgreSQL has not ended yet (or the database is away). Look again shortly.
            self.next_burst_check = time.monotonic() + BURST_RECHECK_SECONDS
            self._wake(len(self.children))
        else:
            logger.info("burst: no due job left, stopping")
            self._stop(graceful=True)

    def _finish(self) -> None:
        """Write what is left (lost attempts, the worker's row), for a few seconds at most."""
        stopped: list[bool] = []
        self.agent.submit("mark_stopped", self.name, self.jobs_done,
                          on_done=lambda ok, value: stopped.append(ok))
        deadline = time.monotonic() + FINISH_DATABASE_SECONDS
        while ((self.lost or not stopped) and self.agent.alive()
               and time.monotonic() < deadline):
            self._record_lost()
            _wait([self.agent.pipe], [], timeout=LOST_RETRY_SECONDS)
            self.agent.receive()
        for lost in self.lost:  # the database is away: these attempts stay unwritten
            logger.warning("lost attempt left unwritten id=%s worker=%s", lost.job_id,
                           lost.worker)
            _close_fd(lost.db_socket)
        if not stopped or not stopped[0]:
            logger.warning("could not mark this worker stopped")
        self.agent.close()
        self.agent.join(FINISH_DATABASE_SECONDS)
        self.listener.close()
        connections.close_all()
        logger.info("worker stopped name=%s jobs_done=%s%s", self.name, self.jobs_done,
                    " (forced)" if self.forced else "")

    # -- children ---------------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        # Never let a child inherit an open connection: close ours before forking.
        connections.close_all()
        parent_end, child_end = self.context.Pipe(duplex=True)
        options = ChildOptions(self.options.queues, self.options.batch_size,
                               self.options.max_jobs_per_child, self.metrics)
        # Our copies of other children's database sockets must not live on in the new child:
        # they would keep a dead child's session, and its job's lock, alive.
        copies = self._socket_copies()
        if self.agent.pipe is not None:
            copies.append(self.agent.pipe.fileno())  # the agent stops when our end closes
        shared = self.context.Array("d", shared_layout.SHARED_SIZE, lock=False)
        process = self.context.Process(
            target=child_main, args=(child_end, shared, options, os.getpid(), copies),
            name=f"djasync-child-{slot}", daemon=False,
        )
        process.start()
        child_end.close()
        self.children[slot] = ChildState(slot, process, parent_end, shared)
        logger.debug("child started slot=%s pid=%s", slot, process.pid)

    def _socket_copies(self) -> list[int]:
        """Our copies of children's database sockets (a forked process must close them)."""
        copies = [fd for c in self.children.values() for fd in (c.db_socket, c.slot_socket)
                  if fd is not None]
        return copies + [lost.db_socket for lost in self.lost if lost.db_socket is not None]

    def _fenced_sockets(self) -> list[int]:
        """The sockets of children running an atomic job: their end must wake us at once."""
        return [fd for c in self.children.values()
                if (fd := watched_socket(c)) is not None and not c.killed_for_lost_session
                and not c.killed_for_timeout and running_in_session(c) is not None]

    def _fence(self) -> None:
        """Kill each child whose atomic job's session PostgreSQL has ended.

        The session's transaction was the child's claim on the job: it is rolled back, the
        job's row is unlocked, and another worker may run the job now. A job left running
        would write to a connection that is gone, or, worse, do its work outside the
        database a second time alongside the new run. So it stops here, within a loop turn
        of the server's FIN reaching this host (the socket shows it: no query needed).
        """
        for child in self.children.values():
            if (child.killed_for_lost_session or child.killed_for_timeout
                    or watched_socket(child) is None or running_in_session(child) is None
                    or _session_alive(watched_socket(child))):
                continue
            # The child may have reconnected: its new socket comes over the pipe before it
            # claims again (and a slot connection closed on purpose is said before it is), so
            # read the pipe before deciding.
            self._read_messages(child)
            job_id = running_in_session(child)
            watched = watched_socket(child)
            if job_id is None or watched is None or _session_alive(watched):
                continue
            logger.warning("job's database session ended while it ran, killing its child "
                           "(another worker may run the job now) id=%s pid=%s", job_id,
                           child.process.pid)
            child.killed_for_lost_session = True
            _kill(child.process.pid)

    def _read_messages(self, child: ChildState) -> None:
        while True:
            try:
                if not child.pipe.poll():
                    return
                message = child.pipe.recv()
            except (EOFError, OSError):
                return
            self._on_message(child, message)

    def _on_message(self, child: ChildState, message: tuple) -> None:
        kind = message[0]
        if not child.reported:
            child.reported = True
            if not self.ready_sent and all(c.reported for c in self.children.values()):
                self.ready_sent = True
                self.notifier.ready(self._status())
                logger.info("worker ready children=%s", len(self.children))
        if kind == "conn":
            try:
                fd = reduction.recv_handle(child.pipe)
            except (EOFError, OSError, RuntimeError):
                return  # the child died between its message and its socket: reaped next

            _close_fd(child.db_socket)
            child.db_socket = fd
        elif kind == "conn_closed":
            _close_fd(child.db_socket)
            child.db_socket = None
        elif kind == "slots_conn":
            try:
                fd = reduction.recv_handle(child.pipe)
            except (EOFError, OSError, RuntimeError):
                return
            _close_fd(child.slot_socket)
            child.slot_socket = fd
        elif kind == "slots_closed":
            _close_fd(child.slot_socket)
            child.slot_socket = None
        elif kind == "busy":
            child.idle = False
            if child.woken_by == "poll":
                self.listener.poll_found_work()
            child.woken_by = ""
            self._wake(1)  # it found work: there may be more, wake another idle child
        elif kind == "idle":
            child.idle = True
            self._schedule_timer()

    def _reap(self, child: ChildState) -> None:
        self._read_messages(child)  # a last socket copy may be in the pipe
        child.process.join(timeout=5)
        code = child.process.exitcode
        del self.children[child.slot]
        child.pipe.close()
        self.jobs_done_by_exited += int(child.shared[shared_layout.JOBS_DONE])
        running = running_job(child)
        worker = f"{socket.gethostname()}:{child.process.pid}"  # the child's name in its leases
        # The connection that held a long job's slots (behind a pooler) ends now: its slots
        # are free again at once (the job's lease keeps it from running again until its
        # attempt is written).
        _close_fd(child.slot_socket)
        child.slot_socket = None
        # A child fenced off because PostgreSQL ended its session is not charged either:
        # before its kill the run had already ended as a session's end ends any atomic job
        # (rolled back, claimable again, not counted), and the end came from outside the job
        # (a terminate, a restart, a partition), so it must not use up the job's attempts.
        fenced = running is not None and child.killed_for_lost_session
        # A long job fenced off (its session, and the flow-control slots it held, had ended)
        # did run outside any transaction: that run is charged as any crash of a long job.
        fenced_long = fenced and (child.shared[shared_layout.IN_TRANSACTION]
                                  == shared_layout.IN_SESSION_SLOTS)
        if fenced_long:
            fenced = False
        charged = running is not None and not self.forced and not fenced
        if fenced:
            assert running is not None
            logger.warning("job stopped: its database session had ended id=%s pid=%s; the run "
                           "rolled back and is not charged (the job runs again)", running[0],
                           child.process.pid)
            self._slots_freed(0)  # that end gave its slots back
        if charged:
            assert running is not None
            job_id, _, _, epoch = running
            if child.killed_for_timeout:
                outcome, reason = Outcome.TIMED_OUT, "ran past its timeout; its process was killed"
            elif fenced_long:
                outcome, reason = (Outcome.CRASHED, "its database session ended, and with it "
                                   "the flow-control slots it held; its process was killed")
            else:
                outcome, reason = Outcome.CRASHED, f"its worker process died ({_describe(code)})"
            logger.error("job lost its process id=%s pid=%s outcome=%s reason=%s", job_id,
                         child.process.pid, outcome.value, reason)
            started = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
            # Our copy of its socket goes with the lost attempt: the session, its transaction
            # and the job's row lock live on until the attempt is written (_record_lost).
            self.lost.append(LostAttempt(job_id, outcome, started, reason, worker,
                                         child.db_socket,
                                         int(child.shared[shared_layout.BACKEND_PID])))
            child.db_socket = None
            self._record_lost()
        elif code != 0 and not self.forced and not fenced:
            logger.error("child died while idle pid=%s %s", child.process.pid, _describe(code))
        # A child that died idle held no job: its session may end now. (A lost job's session
        # ends when _record_lost has written its attempt.)
        _close_fd(child.db_socket)
        child.db_socket = None
        if not charged:
            # A long job killed by a forced stop (shutdown timeout, second signal) is not
            # charged, as an atomic job's rollback is not: give its lease back now, so that it
            # can run again at once rather than when the lease runs out (and then be charged a
            # "lease expired" crash). The child is dead and our copy of its socket closed
            # above, so its session ends. (A child that died idle between taking a lease and
            # starting the job ran nothing: the same. A charged job's lease is freed once its
            # crash is written: _record_lost.)
            self._release_leases(worker, None if running is None else running[0])
            if running is not None and not fenced and child.shared[
                    shared_layout.IN_TRANSACTION]:
                # Killed by a forced stop while its session held the job's claim (an atomic
                # job's transaction, a long job's slots): that session ends now. Its slots
                # wake who waits on them once it has (before the agent marks us stopped).
                self._slots_freed(int(child.shared[shared_layout.BACKEND_PID]))
        if self.stopping:
            return
        # Replace it: a recycled child at once, a dead one after a short pause.
        self.respawn_at[child.slot] = time.monotonic() + (0 if code == 0 else RESPAWN_DELAY_SECONDS)

    def _record_lost(self) -> None:
        """Have the agent write the attempts of jobs whose process died, one at a time, in
        order; until written, they stay here (the database may be away) and are tried again.

        Only once an attempt is written do we close our copy of its dead child's socket: until
        then PostgreSQL keeps that session, its transaction and the job's row lock, so nobody
        can run the job again with this attempt uncounted, and a poison job stops at
        ``max_attempts``. Only the end of that session by someone else (pg_terminate_backend,
        a restart or crash of PostgreSQL, its idle timeout) before the attempt is written
        frees the job early. Then the attempt is still written, whatever the job's status,
        and marked counted late (``attempts.LATE_NOTE``): the job may have run once more.
        """
        if not self.lost or self.agent.busy("record_lost"):
            return
        lost = self.lost[0]
        late = not _session_alive(lost.db_socket)
        self.agent.submit("record_lost", lost.job_id, lost.outcome.value, lost.started,
                          lost.worker, lost.reason, late,
                          on_done=functools.partial(self._lost_recorded, lost, late))

    def _lost_recorded(self, lost: LostAttempt, late: bool, ok: bool, value: Any) -> None:
        if not ok:  # the agent logged why; try again shortly
            self.next_lost_retry = time.monotonic() + LOST_RETRY_SECONDS
            return
        attempt_id, labels = value
        if attempt_id is None and not late and not _session_alive(lost.db_socket):
            # Nothing written because the row was not locked any more: the session ended
            # after our look (the agent may have been busy with the network for seconds).
            # Write it as the look would have then: late.
            self.agent.submit("record_lost", lost.job_id, lost.outcome.value, lost.started,
                              lost.worker, lost.reason, True,
                              on_done=functools.partial(self._lost_recorded, lost, True))
            return
        self.lost.remove(lost)
        if attempt_id is not None and not late and not _session_alive(lost.db_socket):
            late = True  # it ended between our look and the commit: perhaps before the write
            self.agent.submit("mark_lost_late", attempt_id)
        if late:
            logger.warning("lost attempt counted late id=%s worker=%s: its session had "
                           "ended first, so the job could run again meanwhile",
                           lost.job_id, lost.worker)
        _close_fd(lost.db_socket)
        self._slots_freed(lost.backend_pid)
        # Free the non-atomic jobs the dead child held (their crash is counted now).
        self._release_leases(lost.worker, lost.job_id)
        if self.metrics is not None:
            self.metrics.job_lost(lost.outcome, labels)
        self._record_lost()  # the next one

    def _slots_freed(self, backend_pid: int) -> None:
        """A dead child's session ends (our copy of its socket was just closed) or has ended:
        the flow-control slots its job held are free once PostgreSQL has ended it. Wake the
        workers waiting on them then (their transactions never commit: no wake-up of theirs)."""
        if limits.enabled():
            self.agent.submit("wake_after_session", backend_pid)

    def _release_leases(self, worker: str, running: int | None) -> None:
        """Free the non-atomic jobs a dead child held, so they run again without waiting for
        their leases to expire (the one it was running is charged already, or not at all).
        If this fails, the leases expire on their own."""
        self.agent.submit("release_leases", worker, running)

    def _wake(self, count: int, reason: str = "") -> int:
        """Wake up to ``count`` idle children; return how many were woken."""
        woken = 0
        for child in self.children.values():
            if woken >= count:
                break
            if child.idle:
                try:
                    child.pipe.send(("wake",))
                except OSError:
                    continue
                child.idle = False
                child.woken_by = reason
                woken += 1
        return woken

    def _all_idle(self) -> bool:
        return (bool(self.children) and not self.respawn_at
                and all(c.idle for c in self.children.values()))

    def _on_notifications(self, payloads: list[str]) -> None:
        if self.stopping or not payloads:
            return
        served = set(self.options.queues)
        relevant = [p for p in payloads if not served or p in served or p == "*"]
        if relevant:
            self._wake(1)
            self._schedule_timer()

    def _schedule_timer(self) -> None:
        """Arrange to wake a child when the earliest future ``run_after`` comes due."""
        if self.stopping or not any(c.idle for c in self.children.values()):
            return
        if self.agent.busy("next_run_after"):
            self.timer_again = True  # the answer on its way may predate what woke us
            return
        self.timer_again = False
        self.agent.submit("next_run_after", list(self.options.queues), on_done=self._timer_answer)

    def _timer_answer(self, ok: bool, delay: Any) -> None:
        if ok:
            self.next_run_after = None if delay is None else time.monotonic() + delay
        if self.timer_again:
            self._schedule_timer()

    def _run_periodic(self, now: float) -> None:
        """Have the agent enqueue periodic slots that came due (each exactly once across all
        daemons)."""
        self.next_periodic = now + 60.0  # until the answer says when

        def answered(ok: bool, wait: Any) -> None:
            later = 1.0 if not ok else min(wait if wait is not None else 60.0, 60.0)
            self.next_periodic = time.monotonic() + later

        self.agent.submit("periodic", on_done=answered)

    def queue_depth(self) -> list[tuple[str, int, int, float]] | None:
        """The queue depth for metrics: asked of the agent, waited for at most
        :data:`QUEUE_DEPTH_WAIT_SECONDS` (a scrape is answered from the loop, which must not
        wait on the database for long), else as last read if recent, else None."""
        asked = time.monotonic()
        if not self.agent.busy("queue_depth"):
            def answered(ok: bool, rows: Any) -> None:
                if ok and rows is not None:
                    self.queue_depth_rows, self.queue_depth_at = rows, time.monotonic()
                else:
                    self.queue_depth_rows = None
            self.agent.submit("queue_depth", on_done=answered)
        deadline = asked + QUEUE_DEPTH_WAIT_SECONDS
        while self.agent.busy("queue_depth") and self.agent.pipe is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _wait([self.agent.pipe], [], timeout=left)
            self.agent.receive()
        if time.monotonic() - self.queue_depth_at > QUEUE_DEPTH_MAX_AGE_SECONDS:
            return None
        return None if self.queue_depth_rows is None else list(self.queue_depth_rows)

    @property
    def jobs_done(self) -> int:
        return self.jobs_done_by_exited + sum(
            int(c.shared[shared_layout.JOBS_DONE]) for c in self.children.values()
        )

    def _running(self) -> list[int]:
        return [r[0] for r in map(running_job, self.children.values()) if r is not None]

    def _heartbeat(self) -> None:
        # One at a time: a heartbeat stuck on a lock or in a partition is not queued behind.
        if not self.agent.busy("heartbeat"):
            self.agent.submit("heartbeat", self.name, self._running(), self.jobs_done,
                              self.registration)
        if self.ready_sent:
            self.notifier.status(self._status())

    def _status(self) -> str:
        busy = len(self._running())
        return (f"{len(self.children)} children, {busy} busy, {self.jobs_done} jobs done, "
                f"queues {','.join(self.options.queues) or '*'}")

    # -- signals and stopping ---------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self.signal_writer.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.pending_signals.append(signum)

    def _handle_signals(self) -> None:
        try:
            while self.signal_reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self.pending_signals:
            signum = self.pending_signals.pop(0)
            name = signal.Signals(signum).name
            if not self.stopping:
                logger.info("%s: stopping after the running jobs (again to stop now)", name)
                self._stop(graceful=True)
            else:
                logger.warning("%s again: stopping now; running jobs roll back", name)
                self._kill_all(f"second {name}")

    def _stop(self, graceful: bool) -> None:
        self.stopping = True
        self.respawn_at.clear()
        self.stop_deadline = time.monotonic() + self.options.shutdown_timeout
        self.notifier.stopping(f"stopping: {self._status()}")
        for child in self.children.values():
            with contextlib.suppress(OSError):
                child.pipe.send(("stop",))
            # A busy child reads its pipe only when idle: the signal makes it stop claiming
            # after the batch it is running.
            with contextlib.suppress(ProcessLookupError):
                if child.process.pid is not None:
                    os.kill(child.process.pid, signal.SIGTERM)

    def _kill_all(self, reason: str) -> None:
        self.forced = True
        self.stop_deadline = None
        for child in self.children.values():
            if child.process.is_alive():
                running = running_job(child)
                logger.warning("killing child pid=%s job=%s reason=%s", child.process.pid,
                               running[0] if running else None, reason)
                _kill(child.process.pid)


def _kill(pid: int | None) -> None:
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


#: poll() events saying the server end of a socket is closed (Linux: POLLRDHUP, the FIN).
_GONE_EVENTS = (select.POLLHUP | select.POLLERR | select.POLLNVAL
                | getattr(select, "POLLRDHUP", select.POLLIN))


def _session_alive(fd: int | None) -> bool:
    """Whether PostgreSQL still has the session of this (dead child's) socket, as far as our
    end can see: a session the server ended has closed its end (FIN or reset)."""
    if fd is None:
        return False
    poller = select.poll()
    try:
        poller.register(fd, _GONE_EVENTS)
        events = poller.poll(0)
    except OSError:
        return False
    return not any(mask & _GONE_EVENTS for _, mask in events)


def _wait(readables: list[Any], hangups: list[int], timeout: float) -> set[Any]:
    """Wait until one of ``readables`` (file descriptors, or objects with ``fileno()``) can be
    read, or one of ``hangups`` (sockets) is closed or broken at the other end, or
    ``timeout`` seconds pass; return the readables that are ready.

    A hang-up is watched alone (POLLRDHUP, not POLLIN): the children's sockets carry their
    queries' answers, which must not wake us."""
    poller = select.poll()
    by_fd: dict[int, Any] = {}
    for item in readables:
        fd = item if isinstance(item, int) else item.fileno()
        by_fd[fd] = item
        poller.register(fd, select.POLLIN)
    for fd in hangups:
        if fd not in by_fd:
            poller.register(fd, _GONE_EVENTS)
    try:
        events = poller.poll(max(0, int(timeout * 1000 + 0.999)))
    except InterruptedError:
        return set()
    return {by_fd[fd] for fd, _ in events if fd in by_fd}


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _describe(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown exit"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _conninfo() -> dict[str, Any]:
    """Connection parameters for the LISTEN connection: ``DJASYNC["LISTEN_URL"]`` (straight to
    PostgreSQL when the database goes through a pooler), else Django's default database's."""
    params = dict(connection.get_connection_params())
    params.pop("cursor_factory", None)
    params.pop("context", None)
    params.pop("prepare_threshold", None)
    params.pop("server_side_binding", None)
    return listen_conninfo(params)
