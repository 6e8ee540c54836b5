"""Write down how an attempt ended: the attempt row and the job's new state, in one statement.

Every function here runs on Django's default connection inside a transaction that holds the
job's row lock (except :func:`record_lost`, which needs no lock by design).
"""

from __future__ import annotations

import datetime
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors
from django.db import connection, transaction
from django.utils import timezone

from djasync import conf, sql
from djasync.exceptions import (
    DjasyncError,
    ForbiddenFunction,
    FunctionNotFound,
    JobTimedOut,
    WorkerLost,
)
from djasync.models import Outcome, Status

logger = logging.getLogger("djasync.executor")


class PermanentFailure(DjasyncError):
    """The job row can never run (bad row, forbidden or unknown function): fail it now."""


@dataclass(frozen=True)
class Finished:
    """What happened to one job in one attempt."""

    job_id: int
    name: str
    queue: str
    attempt: int
    outcome: Outcome
    status: Status
    duration: float
    result: Any = None
    error: str = ""
    #: The exception the function raised (only in this process; never stored as such).
    exception: BaseException | None = None
    run_after: datetime.datetime | None = None


@dataclass
class Run:
    """One attempt in progress: the claimed job, who runs it, and since when."""

    job_id: int
    name: str
    queue: str
    priority: int
    worker: str
    max_attempts: int
    timeout: float | None
    started: datetime.datetime
    clock: float
    #: This attempt's number, as far as the claim knows (exact near ``max_attempts``).
    attempt: int = 1
    #: The job's ``meta["backoff"]``, if it has one (else ``DJASYNC["BACKOFF"]`` decides).
    backoff: Any = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.clock


def hot_cursor() -> psycopg.Cursor[Any]:
    """A reusable psycopg cursor on Django's connection (same transaction) for djasync's own
    statements off the worker's fast path (:mod:`djasync.wire` has that one)."""
    connection.ensure_connection()
    raw = connection.connection
    cursor = _hot_cursors.get(connection.alias)
    if cursor is None or cursor.connection is not raw or cursor.closed:
        cursor = _hot_cursors[connection.alias] = psycopg.Cursor(raw)
    return cursor


#: One reusable cursor per database alias's current connection (a new psycopg cursor per
#: statement costs more than the statement's own client-side work); a reconnect replaces it.
_hot_cursors: dict[str, psycopg.Cursor[Any]] = {}


def count(job_id: int) -> int:
    """Count the job's attempts so far, as committed now (a statement of its own)."""
    with connection.cursor() as cursor:
        cursor.execute(sql.COUNT_ATTEMPTS, [job_id])
        return int(cursor.fetchone()[0])


def succeed(run: Run, result: Any, encoded: str) -> Finished:
    """Mark the job succeeded with its result, in the transaction that ran it."""
    cursor = hot_cursor()
    cursor.execute(sql.FINISH_SUCCESS, {
        "job_id": run.job_id, "started_at": run.started, "worker": run.worker[:255],
        "result": encoded,
    })
    row = cursor.fetchone()
    assert row is not None, "the claimed job row disappeared"
    return _report_success(run, result, row[0], run.elapsed)


@dataclass
class Succeeded:
    """A job that succeeded in a batch, its success not written yet (see :func:`succeed_many`)."""

    run: Run
    result: Any
    encoded: str
    finished_at: datetime.datetime
    duration: float


def succeeded_now(run: Run, result: Any, encoded: str) -> Succeeded:
    return Succeeded(run, result, encoded, timezone.now(), run.elapsed)


def succeed_many(done: list[Succeeded]) -> dict[int, Finished]:
    """Mark the jobs of a batch succeeded in one statement (same transaction that ran them)."""
    cursor = hot_cursor()
    cursor.execute(sql.FINISH_SUCCESS_MANY, success_params(done))
    return report_successes(done, dict(cursor.fetchall()))


def success_params(done: list[Succeeded]) -> dict[str, Any]:
    return {
        "job_id": [d.run.job_id for d in done],
        "started_at": [d.run.started for d in done],
        "finished_at": [d.finished_at for d in done],
        "result": [d.encoded for d in done],
        "worker": [d.run.worker[:255] for d in done],
    }


def report_successes(done: list[Succeeded], numbers: dict[int, int]) -> dict[int, Finished]:
    """Log and report written successes; ``numbers`` maps each job to its attempt number.

    This runs after the COMMIT: it must not raise. A job missing from ``numbers`` deleted its
    own row (its success was written to nothing); it is reported with the claim's count.
    """
    return {d.run.job_id: _report_success(d.run, d.result,
                                          numbers.get(d.run.job_id, d.run.attempt), d.duration)
            for d in done}


def _report_success(run: Run, result: Any, number: int, duration: float) -> Finished:
    # One line per finished job, plain or Task (a failure's line is in fail()), at INFO unless
    # DJASYNC["LOG_FINISHED_JOBS"] is off, then at DEBUG.
    level = logging.INFO if conf.get().LOG_FINISHED_JOBS else logging.DEBUG
    if logger.isEnabledFor(level):
        logger.log(level, "job succeeded id=%s name=%s attempt=%s duration=%.3f",
                   run.job_id, run.name, number, duration,
                   extra=_fields(run, number, duration, Outcome.SUCCEEDED))
    return Finished(run.job_id, run.name, run.queue, number, Outcome.SUCCEEDED,
                    Status.SUCCEEDED, duration, result=result)


def fail(run: Run, exc: BaseException, *, permanent: bool = False,
         counted: bool = True) -> Finished:
    """Record a failed attempt, and reschedule the job with backoff or mark it failed.

    ``permanent`` fails the job whatever its attempts; ``counted=False`` fails it without
    writing an attempt (nothing ran: its attempts were used up before).
    """
    settings = conf.get()
    permanent = permanent or isinstance(exc, ForbiddenFunction | FunctionNotFound)
    outcome = Outcome.TIMED_OUT if _is_timeout(exc) else Outcome.ERROR
    number = count(run.job_id) + (1 if counted else 0)
    run_after = None
    if permanent or number >= run.max_attempts:
        status = Status.FAILED
    else:
        status = Status.PENDING
        run_after = timezone.now() + datetime.timedelta(
            seconds=settings.backoff(number, run.backoff))
    with connection.cursor() as cursor:
        if counted:
            cursor.execute(sql.FINISH_FAILURE, {
                "job_id": run.job_id, "number": number, "started_at": run.started,
                "outcome": outcome.value, "status": status.value, "run_after": run_after,
                "exception_type": _qualified_name(type(exc)),
                "exception_message": str(exc)[:10_000],
                "traceback": _clip("".join(traceback.format_exception(exc)),
                                   settings.TRACEBACK_MAX_CHARS),
                "worker": run.worker[:255],
            })
        else:
            cursor.execute(sql.FAIL_WITHOUT_ATTEMPT, [run.job_id])
    duration = run.elapsed
    log = logger.error if status == Status.FAILED else logger.warning
    log("job %s id=%s name=%s attempt=%s duration=%.3f error=%s: %s%s",
        "failed" if status == Status.FAILED else "will retry", run.job_id, run.name, number,
        duration, type(exc).__name__, str(exc)[:200],
        f" retry_at={run_after.isoformat()}" if run_after else "",
        extra=_fields(run, number, duration, outcome, status=status.value,
                      error=type(exc).__name__))
    return Finished(run.job_id, run.name, run.queue, number, outcome, status, duration,
                    error=f"{type(exc).__name__}: {exc}", exception=exc, run_after=run_after)


#: Appended to the message of a lost attempt counted after its run's database session had
#: ended (killed by pg_terminate_backend, a restart, a timeout): until then the job was
#: claimable with this attempt uncounted, so it may have run once more than ``max_attempts``.
LATE_NOTE = (" [counted late: its database session had ended before the crash was recorded, "
             "so the job could run again meanwhile]")


def record_lost(job_id: int, *, outcome: Outcome, started: datetime.datetime, worker: str,
                reason: str, late: bool = False, holder: str = "") -> int | None:
    """Record an attempt whose process died (crashed) or was stopped (timed out), or whose
    failure could not be written in its own transaction; return the attempt row's id (None
    when no row was written: the job is gone, or finished and ``late`` is false).

    Only an attempt row is inserted (the foreign key takes a KEY SHARE lock, which does not
    conflict with a worker's NO KEY UPDATE), so this never waits on the job row's lock; the
    next claim counts it. ``late``: the run's session had already ended (see
    :data:`LATE_NOTE`); the row is then written whatever the job's status. ``holder``: the
    dead process's worker name, to write nothing if its run had committed its own outcome
    before it died (see :data:`sql.RECORD_LOST_ATTEMPT`).

    The commit is synchronous even under ``synchronous_commit = off``: this row is the only
    trace of a run whose transaction rolled back, and the caller lets the job be claimed again
    once it returns (a crash path only, so the flush costs nothing on the hot path).
    """
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL synchronous_commit = on")
        cursor.execute(sql.RECORD_LOST_ATTEMPT, {
            "job_id": job_id, "started_at": started, "outcome": outcome.value,
            "exception_type": _qualified_name(
                {Outcome.CRASHED: WorkerLost, Outcome.TIMED_OUT: JobTimedOut}.get(
                    outcome, DjasyncError)
            ),
            "exception_message": reason[:10_000] + (LATE_NOTE if late else ""),
            "worker": worker[:255], "late": late, "holder": holder,
        })
        row = cursor.fetchone()
    return None if row is None else int(row[0])


def mark_lost_late(attempt_id: int) -> None:
    """Add :data:`LATE_NOTE` to a lost attempt found, once written, to have been counted late."""
    with connection.cursor() as cursor:
        cursor.execute(sql.MARK_LOST_ATTEMPT_LATE, [LATE_NOTE, attempt_id])


def _fields(run: Run, attempt: int, duration: float, outcome: Outcome,
            **more: Any) -> dict[str, Any]:
    """Structured fields of a job log line (``--log-format json`` prints them); never the
    job's arguments, which may hold secrets."""
    return {"job_id": run.job_id, "job_name": run.name, "queue": run.queue, "attempt": attempt,
            "duration": round(duration, 6), "outcome": outcome.value, **more}


def _is_timeout(exc: BaseException) -> bool:
    from djasync.connections import causes

    return any(isinstance(e, psycopg.errors.QueryCanceled) for e in causes(exc))


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"[:255]


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n… {len(text) - limit} characters cut …\n{text[-half:]}"
