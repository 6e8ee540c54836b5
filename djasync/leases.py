"""Long jobs (``meta={"atomic": False}``): run outside any transaction, under a fenced lease.

Holding a transaction for minutes hurts PostgreSQL (the vacuum horizon stops for the whole
cluster, row locks are held), so a long job may opt out of the atomic contract:

1. just before the job starts (after the claiming transaction has committed, and after any
   batch-mates ran), a short transaction of its own takes a lease (owner token, expiry), only
   if the job may still start (:data:`sql.TAKE_LEASE`), and commits;
2. the function runs in autocommit, while a thread renews the lease every third of its length;
3. the outcome is written only if the worker still holds the lease (the fence): a worker that
   froze past its lease, and whose job was re-queued and run again, cannot overwrite anything.

If the worker dies, its supervisor records the crash and releases the lease at once; if the
whole host dies, the lease expires and the next claim records the attempt as lost. The job's
database effects are at-least-once: a re-run repeats whatever the lost attempt committed.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from djasync import attempts, conf, limits, sql
from djasync.attempts import Finished, Run
from djasync.connections import one_line
from djasync.models import Outcome, Status

logger = logging.getLogger("djasync.executor")


def is_leased(meta: Any) -> bool:
    return isinstance(meta, dict) and meta.get("atomic") is False


class LimitFull(Exception):
    """A long job's flow-control key has no free slot now: its lease is rolled back, and the
    job waits for the next claim."""


def take(job_id: int, run_after: datetime.datetime | None, worker: str,
         ) -> tuple[str, int, bool] | None:
    """Take the lease of a long job about to start, in the open (short) transaction; return
    the owner token and the attempts made so far, or None if the job may no longer start here
    (see :data:`sql.TAKE_LEASE`: it ran, runs or was cancelled elsewhere since our claim).

    ``run_after`` is the job's ``run_after`` as the claim read it. If the previous holder's
    lease ran out, its attempt is recorded as lost first, so that it counts towards
    ``max_attempts`` before this one starts.

    A job with flow-control keys also takes a slot of each, held by this session (not this
    transaction; behind a pooler, by a transaction of a connection of its own) until
    :func:`limits.release_session_slots` after its outcome, or until the session ends if its
    worker dies; the third value says so. Raises :class:`LimitFull` if a
    key is full (the caller rolls the lease back).
    """
    owner = f"{worker}/{uuid.uuid4().hex[:12]}"
    with connection.cursor() as cursor:
        cursor.execute(sql.TAKE_LEASE, {"owner": owner, "job_id": job_id, "run_after": run_after,
                                        "seconds": conf.get().LEASE_SECONDS})
        row = cursor.fetchone()
    if row is None:
        return None
    expired, previous, keys = row
    holds_slots = keys is not None and limits.enabled()
    if holds_slots:
        full = limits.take_session_slots(keys)
        if full is not None:
            raise LimitFull(full)
    if expired:
        attempts.record_lost(job_id, outcome=Outcome.CRASHED, started=timezone.now(),
                             worker=worker, reason="its lease expired (worker dead or frozen)")
        previous += 1
    return owner, int(previous), holds_slots


def release(job_id: int) -> None:
    """Free a lease just taken for a job that then may not run (its row was failed)."""
    with connection.cursor() as cursor:
        cursor.execute(sql.RELEASE_LEASE, [job_id])


def give_back(taken: list[tuple[int, str]]) -> None:
    """Free the leases of jobs that will not start after all, so that another worker can take
    them now rather than when the lease expires; if the database is away, they expire."""
    try:
        with connection.cursor() as cursor:
            for job_id, owner in taken:
                cursor.execute(sql.GIVE_BACK_LEASE, {"job_id": job_id, "owner": owner})
    except Exception as exc:
        logger.warning("cannot give back leases (they will expire) error=%s", exc)


def free_leases_of_dead(worker: str, *, charged: int | None) -> None:
    """Free the long jobs a dead process (``worker``) held, so that they run again without
    waiting for their leases to run out.

    ``charged`` is the job it was running when it died, whose attempt its watcher has already
    recorded (or which a forced stop does not charge). Any other lease it still held is a run
    whose outcome it could not write (the database went away at that moment) and that it left
    behind: that run did happen, so it is recorded as lost here, before the lease goes;
    freeing it silently would let the job run again with that run uncounted.
    """
    now = timezone.now()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql.LEASES_OF, [worker])
        ids = [row[0] for row in cursor.fetchall()]
        for job_id in ids:
            if job_id != charged:
                attempts.record_lost(
                    job_id, outcome=Outcome.CRASHED, started=now, worker=worker,
                    reason="its worker could not write this run's outcome, and then died")
        if ids:
            cursor.execute(sql.RELEASE_LEASES, [ids])


class _Renewer(threading.Thread):
    """Renew a lease until stopped, on a connection of its own (Django's are per thread)."""

    def __init__(self, job_id: int, owner: str) -> None:
        super().__init__(name=f"djasync-lease-{job_id}", daemon=True)
        self.job_id, self.owner = job_id, owner
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        seconds = conf.get().LEASE_SECONDS
        try:
            while not self.stopped.wait(seconds / 3):
                try:
                    with connection.cursor() as cursor:
                        cursor.execute(sql.RENEW_LEASE, {"owner": self.owner, "seconds": seconds,
                                                         "job_id": self.job_id})
                        renewed = cursor.rowcount == 1
                except Exception as exc:  # the database may be back by the next renewal
                    logger.warning("lease renewal failed id=%s error=%s", self.job_id,
                                   one_line(exc))
                    connection.close()
                    continue
                if not renewed:
                    self.lost = True
                    logger.warning("lease lost id=%s: the job was re-queued; this run's outcome "
                                   "will be discarded", self.job_id)
                    return
                limits.keep_slots()  # behind a pooler: the transaction holding its slots
        finally:
            connection.close()


def run(run: Run, owner: str, call: Callable[[], tuple[Any, str]],
        raised: type[Exception]) -> Finished:
    """Run a leased job outside any transaction; record its outcome if we still hold the lease.

    ``call`` runs the function and returns (result, JSON); it raises ``raised`` wrapping the
    function's exception.
    """
    # Inside a caller's transaction (``job()`` or ``djasync.testing.run_jobs`` in a test) the
    # row stays locked by that transaction until it ends, so nobody else can take the job and
    # there is nothing to renew; a renewal would only wait on our own row lock (for ever: we
    # would be waiting for the renewer to stop).
    renewer = None if connection.in_atomic_block else _Renewer(run.job_id, owner)
    if renewer is not None:
        renewer.start()
    failure: BaseException | None = None
    result: Any = None
    encoded = ""
    try:
        result, encoded = call()
    except raised as exc:
        failure = getattr(exc, "exc", exc)
    finally:
        if renewer is not None:
            renewer.stopped.set()
            renewer.join()
    return _write_outcome(run, owner, failure, result, encoded)


#: Seconds between tries to write a long job's outcome while the database is away.
OUTCOME_RETRY_SECONDS = 0.5


def _write_outcome(run: Run, owner: str, failure: BaseException | None, result: Any,
                   encoded: str) -> Finished:
    """Write the outcome of a leased run, if we still hold the lease (the fence).

    The run is over and happened: losing its outcome to a dropped connection (a restart of
    PostgreSQL, ``pg_terminate_backend``, a network blip) would leave the job leased with the
    run unrecorded. So an operational error (a lost connection, a terminated session, a
    timeout) is retried on a new connection for as long as the lease lasts; once the lease
    has run out, the next claim records the run as lost instead. (A dead session is not
    always visible on the connection right after its error: psycopg may still call it idle,
    so the kind of error decides, not the connection's state.) The retry is safe: a write that
    did commit released the lease, and the fence then writes nothing twice.
    """
    deadline = time.monotonic() + conf.get().LEASE_SECONDS
    failed_at: float | None = None
    while True:
        try:
            finished = _write_outcome_once(run, owner, failure, result, encoded)
        except (OperationalError, InterfaceError) as exc:
            if connection.in_atomic_block:  # a caller's transaction: not ours to retry
                raise
            connection.close()
            if time.monotonic() + OUTCOME_RETRY_SECONDS > deadline:
                raise
            # One line per outage, then one when it is written.
            if failed_at is None:
                failed_at = time.monotonic()
                logger.warning("cannot write a long job's outcome yet id=%s error=%s; "
                               "retrying", run.job_id, one_line(exc))
            else:
                logger.debug("cannot write a long job's outcome yet id=%s error=%s",
                             run.job_id, one_line(exc))
            time.sleep(OUTCOME_RETRY_SECONDS)
            continue
        if failed_at is not None:
            logger.info("long job's outcome written after %.1f s of retries id=%s",
                        time.monotonic() - failed_at, run.job_id)
        return finished


def _write_outcome_once(run: Run, owner: str, failure: BaseException | None, result: Any,
                        encoded: str) -> Finished:
    nested = connection.in_atomic_block  # job() or run_jobs() in a caller's transaction
    with transaction.atomic():
        with connection.cursor() as cursor:
            if not nested:
                # The default job timeouts bound this transaction too (it may wait on the
                # row's lock), SET LOCAL as in every transaction of the worker: nothing stays
                # on the session. A caller's transaction keeps its own.
                cursor.execute(sql.SET_TIMEOUTS, sql.timeout_params(conf.get().TIMEOUT))
            cursor.execute(sql.LOCK_IF_LEASED, {"job_id": run.job_id, "owner": owner})
            held = cursor.fetchone() is not None
        if not held:
            logger.warning("job finished after losing its lease id=%s: outcome discarded",
                           run.job_id)
            return Finished(run.job_id, run.name, run.queue, run.attempt, Outcome.ERROR,
                            Status.PENDING, run.elapsed,
                            error="lease lost before the job finished; outcome discarded")
        if failure is not None:
            assert isinstance(failure, BaseException)
            finished = attempts.fail(run, failure)
        else:
            finished = attempts.succeed(run, result, encoded)
        with connection.cursor() as cursor:
            cursor.execute(sql.RELEASE_LEASE, [run.job_id])
    return finished
