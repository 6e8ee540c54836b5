"""Run claimed jobs: the one place that knows djasync's transaction contract.

A job runs inside the transaction that claimed (and locked) it, in a savepoint of its own
(Django's nested ``atomic``), so its writes and its ``succeeded`` status commit together or
not at all. On exception the savepoint rolls back the job's writes and, in the same
transaction, still holding the row lock, an attempt row is written and the job is rescheduled
with backoff or marked ``failed`` (see :mod:`djasync.attempts`). A batch claims several jobs
and runs each in its own savepoint, committing once; ``job()`` inside a caller's transaction
nests the same way and commits with the caller.

Per job, in the worker: BEGIN, claim (one statement that locks and reads), SAVEPOINT, the
job, RELEASE, finish (one statement that writes the attempt and the status), COMMIT.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import inspect
import json
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import psycopg
from asgiref.sync import async_to_sync
from django.core.serializers.json import DjangoJSONEncoder
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    connection,
    connections,
    transaction,
)
from django.utils import timezone

from djasync import attempts, conf, leases, limits, registry, sql, wire
from djasync.attempts import Finished, PermanentFailure, Run
from djasync.exceptions import DjasyncError
from djasync.models import Job, Outcome, Status
from djasync.validation import check_meta

__all__ = ["ClaimedJob", "Finished", "RunningJob", "claim", "current_job", "drain",
           "record_lost_attempt", "run_batch", "run_batches", "run_job_now", "running_here"]

logger = logging.getLogger(__name__)

_json = DjangoJSONEncoder(allow_nan=False)

#: Extra seconds a job's transaction may sit idle beyond its timeout before PostgreSQL ends it.
IDLE_MARGIN_SECONDS = sql.IDLE_MARGIN_SECONDS
#: Recount attempts exactly when a job is this close to ``max_attempts`` (see ``sql.claim``).
RECOUNT_MARGIN = 2

record_lost_attempt = attempts.record_lost


#: Called (no arguments) just before the executor closes its connection on purpose, after a
#: job's writes were lost: the daemon's child says so to its supervisor, whose fence would
#: otherwise take the session's end for a lost session and kill the child mid-recording.
BEFORE_DELIBERATE_CLOSE: list[Callable[[], None]] = []

def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ClaimedJob:
    """A locked job row, as the claim read it."""

    id: int
    name: str
    args: Any
    kwargs: Any
    meta: Any
    queue: str
    priority: int
    group_id: int | None
    #: Attempts before this one, as the claim saw them (may be one short; see ``sql.claim``).
    previous_attempts: int = 0
    #: A non-atomic job whose previous holder's lease ran out.
    lease_expired: bool = False
    #: When the job became due (its ``run_after``): pickup latency is measured from here.
    due_at: datetime.datetime | None = None


@dataclass(frozen=True)
class RunningJob:
    """What a job function can learn about its own run, through :func:`current_job`."""

    id: int
    name: str
    queue: str
    priority: int
    attempt: int
    max_attempts: int
    worker: str
    started_at: datetime.datetime


_current: ContextVar[RunningJob | None] = ContextVar("djasync_current_job", default=None)


def current_job() -> RunningJob | None:
    """Return the job running in this context (inside a job function), else ``None``."""
    return _current.get()


#: The jobs each connection's open transaction claimed to run (a worker's batch, ``job()``),
#: by Django's connection object: see :func:`running_here`.
_running: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()
_NONE: frozenset[int] = frozenset()


def running_here() -> frozenset[int]:
    """The ids of the jobs this connection's open transaction claimed to run and has not
    committed yet (a worker's batch, ``job()``); empty outside one.

    They are running, as a job locked by another worker is; but their rows are locked by
    this very session, so ``SKIP LOCKED`` does not skip them: a job cancelling,
    descheduling, retrying or calling a batch-mate (or itself) must leave them out by id.
    """
    return _running.get(connections[DEFAULT_DB_ALIAS], _NONE)


@contextmanager
def _running_now(jobs: Iterable[ClaimedJob]) -> Iterator[None]:
    """Count ``jobs`` as running on this connection (:func:`running_here`) inside the block."""
    db = connections[DEFAULT_DB_ALIAS]
    before = _running.get(db, _NONE)
    _running[db] = before.union(job.id for job in jobs)
    try:
        yield
    finally:
        _running[db] = before


class JobWritesLost(DjasyncError):
    """The job left its transaction unusable (a caught database error), losing its writes."""


class _Raised(Exception):
    """Carries what the job function raised out of the transaction that ran it."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


#: The ``statement_timeout`` and idle-in-transaction timeout (ms) for a job's timeout.
timeout_settings = sql.timeout_params


def set_session_timeouts_if_direct() -> bool:
    """On a connection straight to PostgreSQL, also make the default job timeouts the session's
    own (the worker does it once per connection); return whether it did.

    Every transaction the worker runs sets its job timeouts itself (``SET LOCAL``, in the claim
    message: see ``sql.CLAIM_SETTINGS``), so this is only a bound for the statements a long
    (non-atomic) job runs outside any transaction of ours. Behind a connection pooler the
    session is not ours: a session-level setting would stay on the server connection and reach
    the pooler's other clients. So nothing is set unless the session PostgreSQL runs us in is
    the one the connection was opened with (a pooler answers the connection with a backend
    key of its own), in the same statement, at no extra round trip.
    """
    connection.ensure_connection()  # a connection not yet opened has no raw connection
    raw = connection.connection
    with connection.cursor() as cursor:
        cursor.execute(sql.SET_SESSION_TIMEOUTS_IF_DIRECT,
                       {**timeout_settings(conf.get().TIMEOUT), "pid": raw.info.backend_pid})
        return cursor.fetchone() is not None


def claim(
    limit: int = 1,
    *,
    queues: Sequence[str] | None = None,
    name_prefix: str | None = None,
    job_id: int | None = None,
    now: datetime.datetime | None = None,
) -> list[ClaimedJob]:
    """Lock and return up to ``limit`` runnable jobs. Call inside a transaction.

    ``now`` pretends the time is ``now`` when deciding which ``run_after`` has passed.
    """
    _check_limit(limit)
    found = _claim_statement(limit, queues, name_prefix, job_id, now)
    if found is None:  # every queue served is paused
        return []
    query, params = found
    cursor = attempts.hot_cursor()
    for statement in sql.CLAIM_PLAN:
        cursor.execute(statement)
    cursor.execute(query, params)
    rows = cursor.fetchall()
    for statement in sql.CLAIM_PLAN_DONE:
        cursor.execute(statement)
    # Django's psycopg setup returns jsonb as text (JSONField parses it itself).
    return [
        ClaimedJob(id, name, _loads(args), _loads(kwargs), _loads(meta), *rest)
        for id, name, args, kwargs, meta, *rest in rows
    ]


def _claim_statement(limit: int, queues: Sequence[str] | None, name_prefix: str | None,
                     job_id: int | None, now: datetime.datetime | None,
                     wakes_waiters: bool = False,
                     ) -> tuple[str, dict[str, Any]] | None:
    """The claim statement and its parameters; None if every queue served is paused.

    With ``DJASYNC["LIMITS"]`` set: :func:`sql.claim_limited`, which reads the paused queues
    itself. Without: the plain claim (:func:`sql.claim`), unchanged while no queue is paused;
    a paused queue is left out of the queues served (read at most every
    ``limits.PAUSED_TTL_SECONDS``), or, for a worker serving every queue, filtered out.

    ``wakes_waiters``: the caller sends :data:`sql.WAKE_WAITERS` before its COMMIT (the
    claim then sends no NOTIFY of its own for the slots it took: see migration 0015)."""
    params: dict[str, Any] = {"queues": list(queues or []), "name_prefix": name_prefix,
                              "job_id": job_id, "now": now}
    if limits.enabled():
        params.update(limits.config_params(), queues=list(queues) if queues else None,
                      channel=None if wakes_waiters else conf.NOTIFY_CHANNEL)
        if limit == 1 and job_id is None and not queues and name_prefix is None:
            return sql.CLAIM_ONE_LIMITED, params
        return sql.claim_limited(limit), params
    paused = limits.paused_queues() if job_id is None else []
    if paused and queues:
        queues = [queue for queue in queues if queue not in paused]
        if not queues:
            return None
        params["queues"] = queues
    query = sql.claim(
        by_queue=bool(queues), by_name_prefix=bool(name_prefix), by_id=job_id is not None,
        limit=limit, one_queue=queues is not None and len(queues) == 1,
        paused=bool(paused) and not queues,
    )
    if paused and not queues:
        params["paused"] = paused
    return query, params


def _check_limit(limit: Any) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, not {limit!r}")


def _loads(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value in _EMPTY_JSON:  # most jobs' args, kwargs and meta: no parser needed
        return _EMPTY_JSON[value]()
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:  # a row written by hand; see _check_row
        return Unreadable(f"{type(exc).__name__}: {str(exc)[:200]}")


_EMPTY_JSON: dict[str, Callable[[], Any]] = {"[]": list, "{}": dict}


@dataclass(frozen=True)
class Unreadable:
    """A JSON column jsonb stored but Python cannot read (nested too deep, an integer of
    thousands of digits): the row is failed with this reason instead of breaking the claim."""

    reason: str


def run_batch(
    limit: int = 1,
    *,
    queues: Sequence[str] | None = None,
    name_prefix: str | None = None,
    worker: str | None = None,
    before_each: Callable[[ClaimedJob], None] | None = None,
    now: datetime.datetime | None = None,
) -> list[Finished]:
    """Claim up to ``limit`` due jobs and run them in one transaction; return what happened.

    ``before_each`` is called with each job just before it runs: the worker uses it to tell its
    supervisor which job it is on, so that a crash can be charged to that job alone.
    An empty list means nothing was due.
    """
    _check_limit(limit)
    worker = worker or default_worker_name()
    if not connection.in_atomic_block:  # the worker, flush_queue, drain(): a transaction of ours
        try:
            return _FastBatch(worker, before_each).run(
                limit, queues=queues, name_prefix=name_prefix, now=now)
        except CommitRefused as refused:
            logger.warning("%s; running the next %s jobs one at a time", refused, refused.jobs)
            finished: list[Finished] = []
            for _ in range(refused.jobs):
                batch = _FastBatch(worker, before_each).run(
                    1, queues=queues, name_prefix=name_prefix, now=now)
                if not batch:
                    break
                finished += batch
            return finished
    outcomes: list[Outcomes] = []
    leased: list[Leased] = []
    with transaction.atomic():
        claimed = claim(limit, queues=queues, name_prefix=name_prefix, now=now)
        with _running_now(claimed):
            for job in claimed:
                if not leases.is_leased(job.meta):
                    outcomes.append(_run_in_savepoint(job, worker, before_each,
                                                      defer_success=limit > 1))
                else:
                    _lease(job, worker, outcomes, leased)
            # A batch writes its successes in one statement, before its one COMMIT.
            succeeded = [o for o in outcomes if isinstance(o, attempts.Succeeded)]
            written = attempts.succeed_many(succeeded) if succeeded else {}
    return _after_commit(outcomes, written, leased, before_each)


def run_batches(
    limit: int,
    on_batch: Callable[[list[Finished]], bool],
    *,
    queues: Sequence[str] | None = None,
    worker: str | None = None,
    before_each: Callable[[ClaimedJob], None] | None = None,
) -> None:
    """Run batches (as :func:`run_batch`) back to back until nothing is due or ``on_batch``,
    called with each batch once it has committed, returns false. The worker's loop.

    Outside a transaction, each batch's finish message also claims the next batch (see
    ``_FastBatch.run``): ``on_batch`` then runs while the next jobs are already locked, so it
    must not use the database; when it returns false, those jobs are rolled back unstarted.
    """
    _check_limit(limit)
    worker = worker or default_worker_name()
    alone = 0  # after a batch's writes were lost: this many jobs are claimed one at a time
    while True:
        fast = _FastBatch(worker, before_each)
        if connection.in_atomic_block:
            batch = run_batch(limit, queues=queues, worker=worker, before_each=before_each)
        elif alone:
            batch = fast.run(1, queues=queues, name_prefix=None, now=None)
            alone = alone - 1 if batch else 0
        else:
            try:
                batch = fast.run(limit, queues=queues, name_prefix=None, now=None,
                                 on_batch=on_batch)
            except CommitRefused as refused:
                logger.warning("%s; running the next %s jobs one at a time", refused,
                               refused.jobs)
                alone = refused.jobs
                continue
        if not batch or not on_batch(batch):
            return


def _lease(job: ClaimedJob, worker: str, outcomes: list[Outcomes],
           leased: list[Leased]) -> None:
    """A long job of a batch: keep it to run once the claim has committed. No lease is taken
    now: the claim's row lock keeps other workers off it until then, and a lease taken now
    would run out while the job waits for its batch-mates (see :func:`_start_leased`)."""
    leased.append((job, worker))


def _after_commit(outcomes: list[Finished | attempts.Succeeded], written: dict[int, Finished],
                  leased: list[Leased],
                  before_each: Callable[[ClaimedJob], None] | None) -> list[Finished]:
    """Once the claiming transaction committed: what happened to each job, in claim order, and
    the long (leased) jobs of the batch run, outside any transaction, one after the other."""
    finished = [written[o.run.job_id] if isinstance(o, attempts.Succeeded) else o
                for o in outcomes]
    for job, worker in leased:
        started = _start_leased(job, worker)
        if started is None:
            continue
        if isinstance(started, Finished):  # its row may not run: failed, as in the claim
            finished.append(started)
            continue
        run, owner, holds_slots = started
        try:
            if before_each is not None:
                try:
                    before_each(job)
                except BaseException:  # the worker is stopping: this job and the next wait
                    leases.give_back([(job.id, owner)])
                    raise
            finished.append(leases.run(run, owner, functools.partial(_call, run, job),
                                       _Raised))
        finally:
            if holds_slots:  # its flow-control slots, held by this session
                limits.release_session_slots()
    return finished


def _start_leased(job: ClaimedJob, worker: str) -> tuple[Run, str, bool] | Finished | None:
    """Lease a long job just before it starts, in a short transaction of its own; return its
    run, lease owner and whether it holds flow-control slots (at session level: see
    :func:`leases.take`), how it ended if its row may not run, or None if it may no longer
    start here: since our claim committed, another worker ran it or runs it, or it was
    cancelled, or one of its limits is full (then it is skipped, and logged)."""
    try:
        with transaction.atomic():
            taken = leases.take(job.id, job.due_at, worker)
            if taken is None:
                logger.info("long job skipped id=%s name=%s: it was cancelled, rescheduled or "
                            "taken by another worker after this batch claimed it", job.id,
                            job.name)
                return None
            owner, previous, holds_slots = taken
            run = _begin(dataclasses.replace(job, previous_attempts=previous,
                                             lease_expired=False), worker)
            if isinstance(run, Finished):
                leases.release(job.id)
                if holds_slots:
                    limits.release_session_slots()
                return run
    except leases.LimitFull as full:
        logger.info("long job skipped id=%s name=%s: limit %s became full after this batch "
                    "claimed it", job.id, job.name, full)
        return None
    except BaseException:
        # (Behind a pooler the slots are on a connection of their own: given back whatever
        # became of this one.)
        if limits.enabled() and (connection.connection is not None
                                 or limits.holds_slots_elsewhere()):
            limits.release_session_slots()
        raise
    return run, owner, holds_slots


class CommitRefused(DjasyncError):
    """What a batch of several jobs did could not be written (its finish or COMMIT failed,
    or a statement of djasync's between its jobs): nothing of it was kept, and which job
    caused it is unknown. The next jobs are then taken one at a time (``run_batches``,
    ``run_batch``), so that the job is found alone and its failure recorded."""

    def __init__(self, jobs: int) -> None:
        super().__init__(f"what a batch of {jobs} jobs did could not be written")
        self.jobs = jobs


def _record_refused(batch: list[Outcomes], exc: DatabaseError) -> Finished:
    """Record the failed attempt of a job whose success could not be written, in a new
    transaction (its own was rolled back), with the error that stopped it, so that it is
    retried with backoff and finally failed instead of running again and again."""
    if len(batch) != 1 or not isinstance(batch[0], attempts.Succeeded):
        raise CommitRefused(len(batch)) from exc
    run = batch[0].run
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(sql.RELOCK, [run.job_id])
            if cursor.fetchone() is None:  # another worker has it already: it is its job now
                raise exc
        return attempts.fail(run, exc)


#: What happened to a job of a batch (a success not yet written, or how it ended).
Outcomes = Finished | attempts.Succeeded
#: A long job of a batch, to lease and run after the claim's COMMIT: its row, the worker.
Leased = tuple[ClaimedJob, str]

#: The savepoint each job of a worker's batch runs in (one at a time, released between jobs).
JOB_SAVEPOINT = "djasync_job"


class _FastBatch:
    """A batch in the fewest round trips (:mod:`djasync.wire`), with Django's state kept true.

    Django's outer ``atomic`` block still brackets the batch, so the job sees
    ``in_atomic_block``, its nested ``atomic`` blocks make savepoints as usual, and its
    ``on_commit`` callbacks run after the commit. What changes is who sends BEGIN, SAVEPOINT,
    RELEASE and COMMIT: this class, in the same messages as the claim and the finish. For
    that, psycopg is put in autocommit mode (so it sends no BEGIN of its own; the server is in
    our transaction all the same; once our BEGIN has gone through, psycopg's flag is turned off
    again, as job code and Django read it: see ``wire.Statements.began``), and the job's
    savepoint is entered in Django's books by hand exactly as ``atomic`` would (its id on
    ``savepoint_ids``, so that ``on_commit`` callbacks registered in a job that fails are
    dropped with its savepoint). Once we COMMIT, Django's
    ``atomic`` finds the transaction ended and only runs the callbacks. Any error leaves through
    Django's ``atomic``, which rolls back.

    Jobs run one at a time in ``SAVEPOINT djasync_job``: a failure rolls back to it and is
    written after it; between jobs ``RELEASE …`` and ``SAVEPOINT …`` go in one round trip;
    successes are written together with the last RELEASE and the COMMIT.
    """

    def __init__(self, worker: str, before_each: Callable[[ClaimedJob], None] | None) -> None:
        self.worker = worker
        self.before_each = before_each
        self.in_savepoint = False
        #: The jobs of the open transaction's batch, and what happened to those that ran
        #: (their records written in it, not committed yet).
        self.claimed: list[ClaimedJob] = []
        self.outcomes: list[Outcomes] = []
        #: The finish message's COMMIT went through (what failed came after it).
        self.committed = False
        #: What :func:`running_here` said before this batch (``job()`` of a job may run one).
        self.running_before = _NONE
        #: Django's connection object itself: ``connection`` is a proxy that looks it up (in
        #: a thread-and-task-local) at every attribute, several times per job.
        self.db = connections[DEFAULT_DB_ALIAS]
        #: When the claim message's paused queues were read (see ``run``).
        self.claim_read_at = 0.0

    def run(self, limit: int, *, queues: Sequence[str] | None, name_prefix: str | None,
            now: datetime.datetime | None,
            on_batch: Callable[[list[Finished]], bool] | None = None) -> list[Finished]:
        """Claim and run one batch; return what happened to its jobs.

        With ``on_batch``, chain batches: each finish message also begins the next transaction
        and claims its jobs (``…; COMMIT; BEGIN; … claim …; SAVEPOINT``), so a job costs one
        round trip instead of two, and ``on_batch`` is called with each batch once committed.
        A batch is chained only if nothing has to run between its COMMIT and the next claim:
        no ``on_commit`` callbacks pending (they must run outside any transaction) and no
        long (leased) jobs. The chain ends when a claim finds nothing (the empty transaction
        is rolled back; ``[]`` is returned), when ``on_batch`` returns false (the jobs already
        claimed for the next batch are rolled back, never started, and stay queued; ``[]``),
        or with a batch that cannot be chained, which is returned as without ``on_batch``.
        """
        statements = wire.statements()
        claim_message = self._claim_message(statements, limit, queues, name_prefix, now)
        if claim_message is None:  # every queue served is paused
            return []
        outcomes: list[Outcomes] = []
        written: dict[int, Finished] = {}
        leased: list[Leased] = []
        lost: DatabaseError | None = None
        lost_writes = False
        self.running_before = running = _running.get(self.db, _NONE)
        try:
            with transaction.atomic():
                statements.raw.autocommit = True  # BEGIN and COMMIT are ours (see the class)
                try:
                    results = statements.send(claim_message)
                    statements.began()
                    jobs = self._claimed(statements, results)
                    while True:
                        outcomes, leased = self._run_jobs(statements, jobs)
                        # The plain claim's paused queues are read at most every
                        # PAUSED_TTL_SECONDS: a chain stops then, to read them again.
                        chain = (on_batch is not None and bool(jobs) and not leased
                                 and not self.db.run_on_commit
                                 and time.monotonic() - self.claim_read_at
                                 < limits.PAUSED_TTL_SECONDS)
                        written, jobs = self._finish(
                            statements,
                            [o for o in outcomes if isinstance(o, attempts.Succeeded)],
                            then=claim_message if chain else None)
                        if not chain:
                            break
                        assert on_batch is not None
                        finished = _after_commit(outcomes, written, [], None)
                        outcomes, written = [], {}
                        if not on_batch(finished) or not jobs:
                            # the next claim: unwanted, or nothing. Its slots, given back
                            # by the ROLLBACK, wake who waits on them (same message).
                            rollback = [statements.plain("ROLLBACK")]
                            if jobs and limits.enabled():
                                rollback.append((None, sql.wake_waiters_of(
                                    [job.id for job in jobs]).encode(), None))
                                self.claimed = []  # (woken here, not again below)
                            statements.send(rollback)
                            self._left()
                            break
                except BaseException as exc:
                    lost_writes = self._writes_lost(exc, statements)
                    self._left()  # before Django's atomic sees its books (it pops savepoints)
                    raise
        except DatabaseError as exc:
            self._wake_after_rollback()
            if not lost_writes:
                raise
            lost = exc
        except BaseException:
            self._wake_after_rollback()
            raise
        finally:
            _running[self.db] = running
        if lost is not None:
            # The job may have left its session changed (a role, a search path, prepared
            # statements dropped): the rollback undid what is transactional, closing the
            # connection undoes the rest, and the failure is written on a new one.
            for hook in BEFORE_DELIBERATE_CLOSE:
                hook()
            self.db.close()
            if len(self.claimed) > 1:  # the culprit is found alone, its own error recorded
                raise CommitRefused(len(self.claimed)) from lost
            return [_record_refused(self.outcomes, lost)]
        return _after_commit(outcomes, written, leased, self.before_each)

    def _wake_after_rollback(self) -> None:
        """The open transaction rolled back whole (its COMMIT failed, the worker stopped in
        the middle of a batch, a serialization failure, …): the flow-control slots its claim
        took are free again, but the wake-up sent before a COMMIT (``sql.WAKE_WAITERS``) never
        went. Notify the workers waiting on those jobs' keys now, outside any transaction, on
        the same connection if it still works (a lost session's end is the supervisor's to
        announce: ``djasync_worker``'s agent, once PostgreSQL has ended it). Never raises: at
        worst a waiting job starts at its worker's next poll."""
        claimed = self.claimed
        if not claimed or self.committed or not limits.enabled():
            return
        try:
            raw = self.db.connection
            if raw is None or raw.closed or raw.broken or self.db.in_atomic_block:
                return
            with self.db.cursor() as cursor:
                cursor.execute(sql.wake_waiters_of([job.id for job in claimed]))
        except Exception:
            logger.debug("waking the workers waiting on a rolled-back batch's keys failed",
                         exc_info=True)

    def _writes_lost(self, exc: BaseException, statements: wire.Statements) -> bool:
        """Whether ``exc`` lost what the open batch's jobs did, its cause likely one of them:
        a statement of djasync's failed after a job ran (its RELEASE, its finish, its COMMIT,
        the failure record of a later job of the batch), before its COMMIT went through, on a
        connection still working (a lost connection is a crash, counted as such)."""
        if not isinstance(exc, DatabaseError) or not self.outcomes or self.committed:
            return False
        raw = statements.raw
        if raw.closed or raw.broken or raw.pgconn.status != psycopg.pq.ConnStatus.OK:
            return False
        return len(self.claimed) > 1 or isinstance(self.outcomes[0], attempts.Succeeded)

    def _claim_message(self, statements: wire.Statements, limit: int,
                       queues: Sequence[str] | None, name_prefix: str | None,
                       now: datetime.datetime | None) -> list[wire.Command] | None:
        """BEGIN, the job timeouts and the claim's plan settings (one statement), the claim,
        its plan settings put back, and the first job's SAVEPOINT (all prepared now, before
        our BEGIN); None if every queue served is paused.

        The timeouts are ``SET LOCAL``: every transaction of the worker sets them afresh, so
        that none depends on its session's settings, and none leaves any behind. Behind a
        pooler in transaction mode the session is not ours (see ``sql.CLAIM_SETTINGS``)."""
        found = _claim_statement(limit, queues, name_prefix, None, now,
                                 wakes_waiters=True)
        if found is None:
            return None
        query, claim_params = found
        self.claim_read_at = time.monotonic()
        command = statements.command
        return [command(statements.begin(worker=True)),
                command(sql.CLAIM_SETTINGS, timeout_settings(conf.get().TIMEOUT)),
                command(query, claim_params), *map(command, sql.CLAIM_PLAN_DONE),
                command(f'SAVEPOINT "{JOB_SAVEPOINT}"')]

    #: The claim's result, counted from the end of a message that ends with a claim message:
    #: the plan settings put back and the SAVEPOINT come after it.
    _CLAIM_FROM_END = len(sql.CLAIM_PLAN_DONE) + 2

    def _claimed(self, statements: wire.Statements,
                 results: list[Any]) -> list[ClaimedJob]:
        """Read the jobs a claim message (the last ones of ``results``) locked; its BEGIN and
        SAVEPOINT went through, so Django's books say so from here."""
        self._entered()
        claim_result = results[-self._CLAIM_FROM_END]
        self.claimed = [ClaimedJob(id, name, _loads(args), _loads(kwargs), _loads(meta), *rest)
                        for id, name, args, kwargs, meta, *rest in statements.rows(claim_result)]
        self.outcomes, self.committed = [], False
        _running[self.db] = self.running_before.union(job.id for job in self.claimed)
        return self.claimed

    def _run_jobs(self, statements: wire.Statements,
                  jobs: list[ClaimedJob]) -> tuple[list[Outcomes], list[Leased]]:
        """Run the claimed jobs, each in the savepoint; lease the long ones (run after COMMIT)."""
        outcomes: list[Outcomes] = self.outcomes
        leased: list[Leased] = []
        for number, job in enumerate(jobs):
            if number:
                self._next_savepoint(statements)
            if leases.is_leased(job.meta):
                _lease(job, self.worker, outcomes, leased)
            else:
                outcomes.append(self._run_one(job))
        return outcomes, leased

    def _run_one(self, job: ClaimedJob) -> Finished | attempts.Succeeded:
        run = _begin(job, self.worker)  # a row that may not run is failed inside the savepoint
        if isinstance(run, Finished):
            return run
        # The claim message set the default timeouts (SET LOCAL): only another one is set here.
        custom_timeout = _apply_timeout(run, defaults_set=True)
        try:
            if self.before_each is not None:
                self.before_each(job)
            result, encoded = _call(run, job)
        except _Raised as raised:
            self._roll_back()  # also undoes a custom timeout's SET LOCAL
            return attempts.fail(run, raised.exc)
        except BaseException:
            self._roll_back()
            raise
        if custom_timeout:  # the next job of the batch gets the default again
            _set_local_timeouts(conf.get().TIMEOUT)
        return attempts.succeeded_now(run, result, encoded)

    def _finish(self, statements: wire.Statements, succeeded: list[attempts.Succeeded],
                then: list[wire.Command] | None = None,
                ) -> tuple[dict[int, Finished], list[ClaimedJob]]:
        """RELEASE, write the successes and COMMIT, in one message; return the successes as
        written. ``then`` (a claim message) goes in the same message: the jobs it claimed are
        returned too, locked by the new transaction.

        RELEASE, the plan setting and COMMIT follow the jobs' own code in their transaction,
        so they are sent unnamed (:meth:`wire.Statements.plain`): a job that dropped the
        session's prepared statements then loses at most its success (the finish statement
        fails, and that is recorded as its failed attempt: see ``run``), never a failure
        already recorded. (With limits, the plan setting and the wake-up call are one
        statement, prepared: it fails where the finish would.)"""
        command, plain = statements.command, statements.plain
        release, commit = plain(f'RELEASE SAVEPOINT "{JOB_SAVEPOINT}"'), plain("COMMIT")
        # With limits, the slots the COMMIT gives back wake whoever waits on them.
        waking = limits.enabled()
        tail = then or []
        if not succeeded:
            wake = [plain(sql.WAKE_WAITERS)] if waking else []
            results = self._send_finish(statements, [release, *wake, commit], tail)
            return {}, self._claimed(statements, results) if then else []
        if len(succeeded) == 1:
            (one,) = succeeded
            finish = command(sql.FINISH_SUCCESS, {
                "job_id": one.run.job_id, "started_at": one.run.started,
                "worker": one.run.worker[:255], "result": one.encoded})
        else:
            finish = command(sql.FINISH_SUCCESS_MANY, attempts.success_params(succeeded))
        plan = [*map(command, sql.FINISH_PLAN_WAKING)] if waking else [
            *map(plain, sql.FINISH_PLAN)]
        results = self._send_finish(statements, [release, *plan, finish, commit], tail)
        rows = statements.rows(results[1 + len(plan)])
        # Committed: nothing below may raise (see attempts.report_successes).
        if len(succeeded) > 1:
            numbers = {row[0]: row[-1] for row in rows}
        else:  # FINISH_SUCCESS returns the attempt number alone (no row: the job deleted it)
            numbers = {succeeded[0].run.job_id: rows[0][0]} if rows else {}
        written = attempts.report_successes(succeeded, numbers)
        return written, self._claimed(statements, results) if then else []

    def _send_finish(self, statements: wire.Statements, finish: list[wire.Command],
                     then: list[wire.Command]) -> list[Any]:
        """Send a finish message (ending with its COMMIT), and ``then``; note whether the COMMIT
        went through if a statement fails."""
        try:
            results = statements.send([*finish, *then])
        except DatabaseError:
            self.committed = (statements.failed_at or 0) >= len(finish)
            raise
        self._left()
        self.committed = True
        return results

    def _next_savepoint(self, statements: wire.Statements) -> None:
        """Keep what the previous job wrote (or its failure record), and start a new savepoint."""
        if self.in_savepoint:
            self._left()
            statements.send([statements.plain(f'RELEASE SAVEPOINT "{JOB_SAVEPOINT}"'),
                             statements.plain(f'SAVEPOINT "{JOB_SAVEPOINT}"')])
        else:
            statements.send([statements.plain(f'SAVEPOINT "{JOB_SAVEPOINT}"')])
        self._entered()

    def _entered(self) -> None:
        self.db.savepoint_ids.append(JOB_SAVEPOINT)
        self.in_savepoint = True

    def _left(self) -> None:
        """The job's savepoint was released (or the transaction ended). Its ``on_commit``
        callbacks now belong to the transaction: the name is taken off their savepoints, as
        every job of a batch reuses it and Django drops the callbacks of a savepoint rolled
        back by name (a later job's failure would otherwise drop this job's callbacks)."""
        if self.in_savepoint:
            self.in_savepoint = False
            self.db.savepoint_ids.remove(JOB_SAVEPOINT)
            callbacks: list[Any] = self.db.run_on_commit  # (savepoint ids, function, robust)
            for number, (sids, *rest) in enumerate(callbacks):
                callbacks[number] = (sids - {JOB_SAVEPOINT}, *rest)

    def _roll_back(self) -> None:
        """What ``atomic`` does when its block raises: back to the savepoint, forgetting the
        ``on_commit`` callbacks registered since, and clearing a pending rollback mark."""
        self.db.needs_rollback = False
        self.db.savepoint_rollback(JOB_SAVEPOINT)


def _run_in_savepoint(job: ClaimedJob, worker: str,
                      before_each: Callable[[ClaimedJob], None] | None,
                      defer_success: bool = False) -> Finished | attempts.Succeeded:
    """Run one claimed job in a savepoint of the open transaction.

    With ``defer_success`` a success is returned unwritten, for the batch to write with the
    others (:func:`attempts.succeed_many`); a failure is always written at once.
    """
    run = _begin(job, worker)
    if isinstance(run, Finished):
        return run
    _apply_timeout(run, defaults_set=False)  # SET LOCAL: it outlives the savepoint
    try:
        with transaction.atomic():
            if before_each is not None:
                before_each(job)
            result, encoded = _call(run, job)
    except _Raised as raised:
        finished: Finished | attempts.Succeeded = attempts.fail(run, raised.exc)
    else:
        finished = (attempts.succeeded_now(run, result, encoded) if defer_success
                    else attempts.succeed(run, result, encoded))
    return finished


def run_job_now(job: Job) -> Any:
    """Run one specific job in this process (``job()``); return its result or raise its error.

    Inside an open transaction (a request under ``ATOMIC_REQUESTS``, a test) this nests as a
    savepoint: the job's writes and its status then commit or roll back with that transaction.
    """
    nested = connection.in_atomic_block
    if job.pk in running_here():  # locked by this very session: the claim would not skip it
        raise DjasyncError(f"job #{job.pk} cannot run now: it is running (claimed by this "
                           "connection's open transaction, a batch of the worker's)")
    with transaction.atomic():
        claimed = claim(1, job_id=job.pk)
        if not claimed:
            raise DjasyncError(f"job #{job.pk} cannot run now: {_why_not_runnable(job)}")
        long = leases.is_leased(claimed[0].meta)
        if not long:
            with _running_now(claimed):
                finished = _run_in_savepoint_keeping_timeouts(claimed[0], nested)
    if long:  # as a worker runs it: under a lease, once the claim has committed
        ran = _after_commit([], {}, [(claimed[0], default_worker_name())], None)
        if not ran:  # taken by a worker between our claim's commit and the lease
            raise DjasyncError(f"job #{job.pk} cannot run now: {_why_not_runnable(job)}")
        finished = ran[0]
    job.refresh_from_db(using=connection.alias)  # the primary, whatever a router says
    if finished.exception is not None:
        raise finished.exception
    if finished.outcome != Outcome.SUCCEEDED:
        raise DjasyncError(f"job #{job.pk} {finished.outcome.label}: {finished.error}")
    return finished.result


def _run_in_savepoint_keeping_timeouts(claimed: ClaimedJob, nested: bool) -> Finished:
    """Run a job claimed by ``job()`` in a savepoint; inside a caller's transaction, give the
    caller its own timeouts back afterwards (``SET LOCAL`` outlives the job's savepoint)."""
    with connection.cursor() as cursor:
        cursor.execute(sql.READ_TIMEOUTS)
        statement, idle = cursor.fetchone()
    finished = _run_in_savepoint(claimed, default_worker_name(), None)
    assert isinstance(finished, Finished)
    if nested:
        with connection.cursor() as cursor:
            cursor.execute(sql.SET_TIMEOUTS, {"statement": statement, "idle": idle})
    return finished


def _why_not_runnable(job: Job) -> str:
    job.refresh_from_db(using=connection.alias)  # the primary, whatever a router says
    if job.status != Status.PENDING:
        return f"it is {job.status}"
    group = job.final_of.using(connection.alias).first()
    if group is not None and group.jobs.using(connection.alias).exclude(pk=job.pk).filter(
            status=Status.PENDING).exists():
        return (f"it is the final job of group {group.reference!r} (#{group.pk}) and other jobs "
                "of the group are pending")
    if job.limits and limits.enabled():
        return (f"one of its limits ({', '.join(job.limits)}) is full, or another worker is "
                "running it right now")
    return "another worker is running it right now"


def _begin(job: ClaimedJob, worker: str) -> Run | Finished:
    """Check the row and its attempts; return the run, or how it ended if it may not run."""
    settings = conf.get()
    meta = job.meta if isinstance(job.meta, dict) else {}
    max_attempts = meta.get("max_attempts")
    run = Run(job.id, registry.display_name(job.name, job.args), job.queue, job.priority, worker,
              max_attempts if isinstance(max_attempts, int) else settings.MAX_ATTEMPTS,
              meta.get("timeout", settings.TIMEOUT), timezone.now(), time.monotonic(),
              backoff=meta.get("backoff"))
    try:
        _check_row(job)
        _resolve(job.name)
    except Exception as exc:
        return attempts.fail(run, exc, permanent=True)
    previous = job.previous_attempts
    if previous + RECOUNT_MARGIN >= run.max_attempts:
        previous = _recount(job.id)
    run.attempt = previous + 1
    if previous >= run.max_attempts:
        # Its earlier attempts crashed or timed out (a poison job): never run it again.
        error = PermanentFailure(
            f"used up its {run.max_attempts} attempts (the last ones crashed or timed out)"
        )
        return attempts.fail(run, error, permanent=True, counted=False)
    return run


def _recount(job_id: int) -> int:
    """Count the job's attempts as committed now, and those this transaction wrote.

    Under READ COMMITTED a statement of its own sees both. Under REPEATABLE READ (or
    SERIALIZABLE) it reads the claim's snapshot, which misses a crash the supervisor recorded
    (then released the row's lock) after that snapshot was taken: the job ran once past
    ``max_attempts``. A connection of its own (autocommit, READ COMMITTED) sees that crash,
    but not what this transaction wrote and has not committed: the lost attempt of a long job
    whose lease ran out, recorded just now by :func:`leases.take` (the job then ran once past
    ``max_attempts`` too). So at those levels the attempts are counted as the union of what
    each sees, by id (only near ``max_attempts``, and only at those levels).
    """
    with connection.cursor() as cursor:
        cursor.execute(_COUNT_AND_ISOLATION, [job_id])
        count, isolation = cursor.fetchone()
        if isolation == "read committed":
            return int(count)
        cursor.execute(sql.ATTEMPT_IDS, [job_id])
        seen_here = {row[0] for row in cursor.fetchall()}
    side = _fresh_counter()
    committed = {row[0] for row in side.execute(sql.ATTEMPT_IDS, [job_id])}
    return len(seen_here | committed)


_COUNT_AND_ISOLATION = (f"SELECT ({sql.COUNT_ATTEMPTS}), "
                        "current_setting('transaction_isolation')")


def _fresh_counter() -> psycopg.Connection[Any]:
    """A connection of this thread's own (autocommit, READ COMMITTED) for counts on a fresh
    snapshot. Plain psycopg, not a Django connection: the worker hands each new Django
    connection's socket to its supervisor as the job's (see ``djasync_worker.child``)."""
    holder = getattr(_counter, "holder", None)
    if holder is None:
        holder = _counter.holder = _CounterConnection()
    side = holder.connection
    if side is None or side.closed or side.broken:
        side = holder.connection = psycopg.connect(**connection.get_connection_params(),
                                                   autocommit=True)
    return side


def close_fresh_counter() -> None:
    """Close this thread's counting connection (see :func:`_fresh_counter`), if it has one."""
    holder = getattr(_counter, "holder", None)
    if holder is not None:
        holder.close()


class _CounterConnection:
    """Holds a thread's counting connection, and closes it when the thread ends (its
    thread-local data goes then): a thread that ran jobs above READ COMMITTED (``job()`` in a
    web server's thread, a test's) must not leave an open session behind."""

    def __init__(self) -> None:
        self.connection: psycopg.Connection[Any] | None = None

    def close(self) -> None:
        side, self.connection = self.connection, None
        if side is not None:
            side.close()

    def __del__(self) -> None:
        self.close()


_counter = threading.local()


def _check_row(job: ClaimedJob) -> None:
    """Refuse a row whose contents cannot be a job (it may have been written by hand)."""
    for column, value in (("args", job.args), ("kwargs", job.kwargs), ("meta", job.meta)):
        if isinstance(value, Unreadable):
            raise PermanentFailure(f"{column} cannot be read: {value.reason}")
    if not isinstance(job.args, list):
        raise PermanentFailure(f"args must be a JSON array, not {type(job.args).__name__}")
    if not isinstance(job.kwargs, dict):
        raise PermanentFailure(f"kwargs must be a JSON object, not {type(job.kwargs).__name__}")
    try:
        check_meta(job.meta)
    except (TypeError, ValueError) as exc:
        raise PermanentFailure(f"bad meta: {exc}") from None


def _call(run: Run, job: ClaimedJob) -> tuple[Any, str]:
    """Call the job's function; return its result and its JSON, or raise :class:`_Raised`."""
    logger.debug("job starting id=%s name=%s", run.job_id, run.name)
    token = _current.set(RunningJob(run.job_id, run.name, run.queue, run.priority,
                                    run.attempt, run.max_attempts, run.worker, run.started))
    try:
        result = _resolve(job.name)(*job.args, **job.kwargs)
        if connection.in_atomic_block:
            if transaction.get_rollback():
                raise JobWritesLost(
                    "the job caught a database error without rolling back to a savepoint of "
                    "its own (wrap the statement in transaction.atomic()), so its writes are "
                    "lost; the attempt counts as failed"
                )
            # Read from libpq's last message, no round trip: an error caught on psycopg's
            # connection itself, which Django never saw, left the transaction aborted.
            if connection.connection.pgconn.transaction_status == _IN_ERROR:
                raise JobWritesLost(
                    "the job caught a database error itself and left its transaction aborted "
                    "(roll back to a savepoint of its own: transaction.atomic()), so its "
                    "writes are lost; the attempt counts as failed"
                )
        encoded = _json.encode(result)  # an unencodable result is a failed attempt
        if "\\u" in encoded:
            _check_storable(encoded)
        return result, encoded
    except (Exception, SystemExit) as exc:  # sys.exit() in a job is its failure, not ours
        raise _Raised(exc) from exc
    finally:
        _current.reset(token)


_IN_ERROR = psycopg.pq.TransactionStatus.INERROR

#: A JSON escape: a surrogate pair, another ``\\uXXXX``, or a one-character escape.
_ESCAPE = re.compile(r"\\(?:u(d[89ab][0-9a-f]{2}\\ud[c-f][0-9a-f]{2}|[0-9a-f]{4})|.)")


def _check_storable(encoded: str) -> None:
    """Refuse JSON that jsonb cannot store (``\\u0000``, an unpaired surrogate). Found only by
    the statement that writes the success, it would fail the whole transaction with the attempt
    unrecorded, and the job (and the rest of its batch) would run again and again."""
    for match in _ESCAPE.finditer(encoded):
        code = match[1]
        if code is not None and len(code) == 4 and (
                code == "0000" or (code[0] == "d" and code[1] in "89abcdef")):
            raise ValueError("the result holds a NUL character or an unpaired surrogate, "
                             "which PostgreSQL's jsonb cannot store")


def _apply_timeout(run: Run, *, defaults_set: bool) -> bool:
    """Give the job its timeout (``SET LOCAL``); return whether it differs from the default.
    ``defaults_set``: the transaction has the default timeouts already (the worker's claim)."""
    custom = run.timeout != conf.get().TIMEOUT
    if custom or not defaults_set:
        _set_local_timeouts(run.timeout)
    return custom


def _set_local_timeouts(timeout: float | None) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql.SET_TIMEOUTS, timeout_settings(timeout))


_resolved: dict[tuple[str, tuple[str, ...]], Callable[..., Any]] = {}


def _resolve(name: str) -> Callable[..., Any]:
    """Resolve (and cache) an allowed function; the allow-list is checked before any import."""
    key = (name, registry.allowed_prefixes())
    function = _resolved.get(key)
    if function is None:
        function = registry.resolve(name)
        if inspect.iscoroutinefunction(function):
            # One event loop per call, in this thread: the coroutine's database calls
            # (sync_to_async with thread_sensitive=True, or the ORM's a* methods) come back to
            # this thread and its connection, so they belong to the job's transaction.
            function = async_to_sync(function)
        _resolved[key] = function
    return function


def drain(
    *,
    max_jobs: int | None = None,
    queues: Iterable[str] | None = None,
    name_prefix: str | None = None,
    worker: str | None = None,
    stop_on_failure: bool = False,
    on_finished: Callable[[Finished], None] | None = None,
    before_each: Callable[[ClaimedJob], None] | None = None,
) -> list[Finished]:
    """Run due jobs one transaction each until none is left, or ``max_jobs`` ran.

    ``before_each`` is called with each job just before it runs (see :func:`run_batch`).
    """
    queue_list = list(queues) if queues else None
    done: list[Finished] = []
    while max_jobs is None or len(done) < max_jobs:
        batch = run_batch(1, queues=queue_list, name_prefix=name_prefix, worker=worker,
                          before_each=before_each)
        if not batch:
            break
        for finished in batch:
            done.append(finished)
            if on_finished is not None:
                on_finished(finished)
        if stop_on_failure and any(f.outcome != Outcome.SUCCEEDED for f in batch):
            break
    return done
