"""Run claimed jobs: the one place that knows djasync's transaction contract.

For each claimed job, in the transaction that claimed (and locked) it:

1. a savepoint (Django's nested ``atomic``) is opened and the function runs inside it;
2. on return, the result is encoded and the job is marked ``succeeded`` in the same transaction,
   so the job's writes and its status commit together or not at all;
3. on exception, the savepoint rolls back the job's writes, and in the still-open transaction an
   attempt row is written and the job is rescheduled with backoff or marked ``failed``.

A batch claims several jobs and runs each in its own savepoint, committing once.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import psycopg.errors
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
from django.utils import timezone

from djasync import conf, registry, sql
from djasync.exceptions import DjasyncError, ForbiddenFunction, FunctionNotFound
from djasync.models import Job, Outcome, Status
from djasync.validation import check_meta

logger = logging.getLogger(__name__)

_json = DjangoJSONEncoder(allow_nan=False)

#: Extra seconds a job's transaction may sit idle beyond its timeout before PostgreSQL ends it.
IDLE_MARGIN_SECONDS = 10


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
    #: Attempts made before this one; read after the row is locked (see ``sql.START_JOB``).
    previous_attempts: int = 0

    @property
    def attempt(self) -> int:
        return self.previous_attempts + 1


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


class PermanentFailure(DjasyncError):
    """The job row can never run (bad row, forbidden or unknown function): fail it now."""


def claim(
    limit: int = 1,
    *,
    queues: Sequence[str] | None = None,
    name_prefix: str | None = None,
    job_id: int | None = None,
) -> list[ClaimedJob]:
    """Lock and return up to ``limit`` runnable jobs. Call inside a transaction."""
    query = sql.claim(
        by_queue=bool(queues), by_name_prefix=bool(name_prefix), by_id=job_id is not None
    )
    params: dict[str, Any] = {"limit": limit, "queues": list(queues or []),
                              "name_prefix": name_prefix, "job_id": job_id}
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        rows = cursor.fetchall()
    # Django's psycopg setup returns jsonb as text (JSONField parses it itself).
    return [
        ClaimedJob(id, name, _loads(args), _loads(kwargs), _loads(meta), *rest)
        for id, name, args, kwargs, meta, *rest in rows
    ]


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def run_batch(
    limit: int = 1,
    *,
    queues: Sequence[str] | None = None,
    name_prefix: str | None = None,
    worker: str | None = None,
    before_each: Callable[[ClaimedJob], None] | None = None,
) -> list[Finished]:
    """Claim up to ``limit`` due jobs and run them in one transaction; return what happened.

    ``before_each`` is called with each job just before it runs: the worker uses it to tell its
    supervisor which job it is on, so that a crash can be charged to that job alone.
    An empty list means nothing was due.
    """
    worker = worker or default_worker_name()
    with transaction.atomic():
        jobs = claim(limit, queues=queues, name_prefix=name_prefix)
        return [_run_claimed(job, worker, before_each) for job in jobs]


def run_job_now(job: Job) -> Any:
    """Run one specific job in this process (``job()``); return its result or raise its error.

    Inside an open transaction (a request under ``ATOMIC_REQUESTS``, a test) this nests as a
    savepoint: the job's writes and its status then commit or roll back with that transaction.
    """
    nested = connection.in_atomic_block
    with transaction.atomic():
        claimed = claim(1, job_id=job.pk)
        if not claimed:
            raise DjasyncError(f"job #{job.pk} cannot run now: {_why_not_runnable(job)}")
        with connection.cursor() as cursor:
            cursor.execute(sql.READ_TIMEOUTS)
            statement, idle = cursor.fetchone()
        finished = _run_claimed(claimed[0], default_worker_name(), None)
        if nested:  # SET LOCAL outlives the job's savepoint: give the caller its own back
            with connection.cursor() as cursor:
                cursor.execute(sql.RESTORE_TIMEOUTS, {"statement": statement, "idle": idle})
    job.refresh_from_db()
    if finished.exception is not None:
        raise finished.exception
    if finished.outcome != Outcome.SUCCEEDED:
        raise DjasyncError(f"job #{job.pk} {finished.outcome.label}: {finished.error}")
    return finished.result


def _why_not_runnable(job: Job) -> str:
    job.refresh_from_db()
    if job.status != Status.PENDING:
        return f"it is {job.status}"
    group = job.final_of.first()
    if group is not None and group.jobs.exclude(pk=job.pk).filter(status=Status.PENDING).exists():
        return f"it is the final job of group {group} and other jobs of the group are pending"
    return "another worker is running it right now"


def _run_claimed(
    job: ClaimedJob,
    worker: str,
    before_each: Callable[[ClaimedJob], None] | None,
) -> Finished:
    settings = conf.get()
    started = timezone.now()
    clock = time.monotonic()
    try:
        function, args, kwargs, meta = _prepare(job)
    except Exception as exc:
        job = replace(job, previous_attempts=_count_attempts(job.id))
        return _record_failure(job, worker, started, clock, exc, permanent=True)
    max_attempts = int(meta.get("max_attempts") or settings.MAX_ATTEMPTS)
    timeout = meta.get("timeout", settings.TIMEOUT)
    try:
        with transaction.atomic():  # the job's savepoint
            job = replace(job, previous_attempts=_start(job.id, timeout))
            if job.previous_attempts >= max_attempts:
                raise _AttemptsUsedUp
            if before_each is not None:
                before_each(job)
            logger.debug("job starting id=%s name=%s attempt=%s", job.id, job.name, job.attempt)
            token = _current.set(RunningJob(job.id, job.name, job.queue, job.priority,
                                            job.attempt, max_attempts, worker, started))
            try:
                result = function(*args, **kwargs)
            finally:
                _current.reset(token)
            if transaction.get_rollback():
                raise JobWritesLost(
                    "the job caught a database error without rolling back to a savepoint of "
                    "its own (wrap the statement in transaction.atomic()), so its writes are "
                    "lost; the attempt counts as failed"
                )
            encoded = _json.encode(result)  # inside the savepoint: unencodable = failed attempt
    except _AttemptsUsedUp:
        # Its earlier attempts crashed or timed out (a poison job): never run it again.
        error = PermanentFailure(
            f"used up its {max_attempts} attempts (the last ones crashed or timed out)"
        )
        return _record_failure(job, worker, started, clock, error, permanent=True, counted=False)
    except Exception as exc:
        return _record_failure(job, worker, started, clock, exc, max_attempts=max_attempts)
    with connection.cursor() as cursor:
        cursor.execute(sql.FINISH_ATTEMPT, _attempt_params(
            job, worker, started, outcome=Outcome.SUCCEEDED, status=Status.SUCCEEDED,
            result=encoded,
        ))
    duration = time.monotonic() - clock
    logger.info("job succeeded id=%s name=%s attempt=%s duration=%.3f",
                job.id, job.name, job.attempt, duration)
    return Finished(job.id, job.name, job.queue, job.attempt, Outcome.SUCCEEDED,
                    Status.SUCCEEDED, duration, result=result)


class _AttemptsUsedUp(Exception):
    pass


class JobWritesLost(DjasyncError):
    """The job left its transaction unusable (a caught database error), losing its writes."""


def _prepare(job: ClaimedJob) -> tuple[Callable[..., Any], list[Any], dict[str, Any], dict]:
    """Check a row's contents (it may have been written by hand) and resolve its function."""
    if not isinstance(job.args, list):
        raise PermanentFailure(f"args must be a JSON array, not {type(job.args).__name__}")
    if not isinstance(job.kwargs, dict):
        raise PermanentFailure(f"kwargs must be a JSON object, not {type(job.kwargs).__name__}")
    try:
        meta = check_meta(job.meta)
    except (TypeError, ValueError) as exc:
        raise PermanentFailure(f"bad meta: {exc}") from None
    return _resolve(job.name), job.args, job.kwargs, meta


_resolved: dict[tuple[str, tuple[str, ...]], Callable[..., Any]] = {}


def _resolve(name: str) -> Callable[..., Any]:
    key = (name, registry.allowed_prefixes())
    function = _resolved.get(key)
    if function is None:
        function = _resolved[key] = registry.resolve(name)
    return function


def _start(job_id: int, timeout: float | None) -> int:
    """Set the job's timeouts and return how many attempts it had before (one round trip)."""
    statement_ms = "0" if timeout is None else str(max(1, int(timeout * 1000)))
    idle_ms = "0" if timeout is None else str(int((timeout + IDLE_MARGIN_SECONDS) * 1000))
    with connection.cursor() as cursor:
        cursor.execute(sql.START_JOB, {"statement_ms": statement_ms, "idle_ms": idle_ms,
                                       "job_id": job_id})
        return int(cursor.fetchone()[2])


def _count_attempts(job_id: int) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM djasync_attempt WHERE job_id = %s", [job_id])
        return int(cursor.fetchone()[0])


def _is_timeout(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, psycopg.errors.QueryCanceled):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _record_failure(
    job: ClaimedJob,
    worker: str,
    started: datetime.datetime,
    clock: float,
    exc: Exception,
    *,
    permanent: bool = False,
    counted: bool = True,
    max_attempts: int | None = None,
) -> Finished:
    """Write the failed attempt and reschedule or fail the job, in the claiming transaction."""
    settings = conf.get()
    permanent = permanent or isinstance(exc, ForbiddenFunction | FunctionNotFound)
    outcome = Outcome.TIMED_OUT if _is_timeout(exc) else Outcome.ERROR
    max_attempts = max_attempts or settings.MAX_ATTEMPTS
    attempt = job.attempt if counted else job.previous_attempts
    run_after = None
    if permanent or attempt >= max_attempts:
        status = Status.FAILED
    else:
        status = Status.PENDING
        run_after = timezone.now() + datetime.timedelta(seconds=settings.backoff(attempt))
    error = f"{type(exc).__name__}: {exc}"
    params = _attempt_params(
        job, worker, started, outcome=outcome, status=status, run_after=run_after,
        exception_type=_qualified_name(type(exc)),
        exception_message=str(exc)[:10_000],
        traceback=_clip("".join(traceback.format_exception(exc)), settings.TRACEBACK_MAX_CHARS),
    )
    with connection.cursor() as cursor:
        if counted:
            cursor.execute(sql.FINISH_ATTEMPT, params)
        else:  # nothing ran: mark the job failed without inventing an attempt
            cursor.execute(
                sql.FAIL_WITHOUT_ATTEMPT, [job.id],
            )
    duration = time.monotonic() - clock
    logger.warning(
        "job %s id=%s name=%s attempt=%s duration=%.3f error=%s%s",
        "failed" if status == Status.FAILED else "will retry", job.id, job.name, attempt,
        duration, type(exc).__name__,
        f" retry_at={run_after.isoformat()}" if run_after else "",
    )
    return Finished(job.id, job.name, job.queue, attempt, outcome, status, duration,
                    error=error, exception=exc, run_after=run_after)


def _attempt_params(job: ClaimedJob, worker: str, started: datetime.datetime, *,
                    outcome: Outcome, status: Status, result: str | None = None,
                    run_after: datetime.datetime | None = None, exception_type: str = "",
                    exception_message: str = "", traceback: str = "") -> dict[str, Any]:
    return {
        "job_id": job.id, "number": job.attempt, "started_at": started,
        "outcome": outcome.value, "status": status.value, "result": result,
        "run_after": run_after, "exception_type": exception_type,
        "exception_message": exception_message, "traceback": traceback, "worker": worker[:255],
    }


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"[:255]


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n… {len(text) - limit} characters cut …\n{text[-half:]}"


def record_lost_attempt(job_id: int, *, outcome: Outcome, started: datetime.datetime,
                        worker: str, reason: str) -> None:
    """Record that a job's process died (crashed) or was stopped (timed out) while running it.

    Called by whoever watched the process (the worker's supervisor), on its own connection and
    outside any job transaction: the dead process's transaction, and everything it wrote, is
    gone. Only an attempt row is inserted, so this never waits on the job row's lock.
    """
    with connection.cursor() as cursor:
        cursor.execute(sql.RECORD_LOST_ATTEMPT, {
            "job_id": job_id, "started_at": started, "outcome": outcome.value,
            "exception_type": "djasync.WorkerLost" if outcome == Outcome.CRASHED
            else "djasync.Timeout",
            "exception_message": reason[:10_000], "worker": worker[:255],
        })


def drain(
    *,
    max_jobs: int | None = None,
    queues: Iterable[str] | None = None,
    name_prefix: str | None = None,
    worker: str | None = None,
    stop_on_failure: bool = False,
    on_finished: Callable[[Finished], None] | None = None,
) -> list[Finished]:
    """Run due jobs one transaction each until none is left, or ``max_jobs`` ran."""
    queue_list = list(queues) if queues else None
    done: list[Finished] = []
    while max_jobs is None or len(done) < max_jobs:
        batch = run_batch(1, queues=queue_list, name_prefix=name_prefix, worker=worker)
        if not batch:
            break
        for finished in batch:
            done.append(finished)
            if on_finished is not None:
                on_finished(finished)
        if stop_on_failure and any(f.outcome != Outcome.SUCCEEDED for f in batch):
            break
    return done
