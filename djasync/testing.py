"""Helpers for testing code that schedules jobs, inside an ordinary Django ``TestCase``.

Jobs run on the test's own connection, inside the test's transaction (each in a savepoint, as a
worker would run it), so no commit is needed and everything rolls back when the test ends::

    from djasync.testing import assert_scheduled, run_jobs

    class SignupTests(TestCase):
        def test_signup_sends_a_welcome_mail(self):
            self.client.post("/signup/", {"email": "a@example.com"})
            assert_scheduled("accounts.jobs.send_welcome", kwargs={"email": "a@example.com"})
            run_jobs()
            self.assertEqual(len(mail.outbox), 1)

``run_jobs(later=timedelta(days=1))`` runs what would be due a day from now, so a job
scheduled with ``run_after`` need not be waited for. A job that fails makes ``run_jobs()``
raise its exception; ``clear_queue()`` empties the queue.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable, Iterable
from typing import Any

from django.db import connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from djasync import executor, registry, sql
from djasync.attempts import Finished
from djasync.exceptions import DjasyncError
from djasync.models import Group, Job, Outcome, identity_of
from djasync.validation import check_args, check_kwargs

#: A job that keeps rescheduling itself would make run_jobs() loop for ever.
DEFAULT_MAX_JOBS = 1000


def run_jobs(
    *,
    later: datetime.timedelta | None = None,
    at: datetime.datetime | None = None,
    queues: Iterable[str] | None = None,
    max_jobs: int = DEFAULT_MAX_JOBS,
    raise_errors: bool = True,
) -> list[Finished]:
    """Run every job due now (or due ``later`` from now, or ``at`` a time); return what ran.

    Retries that come due within the same window run too, up to ``max_jobs`` attempts.
    With ``raise_errors`` (the default), once the run is over, the first failed attempt's
    exception is raised again, the original exception with its traceback: a job that fails
    fails the test, whether or not a retry is scheduled (as Celery's eager mode propagates).
    The run itself is complete when it raises: every due job ran, and each failure was
    recorded (attempt row, retry or ``failed``) as a worker would record it.
    ``raise_errors=False`` returns quietly, for tests of retries: read the outcome in the
    :class:`~djasync.attempts.Finished` items returned (their ``exception``, ``status``).
    """
    if later is not None and at is not None:
        raise ValueError("pass later= or at=, not both")
    now = at if at is not None else (timezone.now() + later if later is not None else None)
    queue_list = list(queues) if queues else None
    finished: list[Finished] = []
    with transaction.atomic():  # outside a TestCase, still one transaction of savepoints
        # A job's timeouts are SET LOCAL, which outlives its savepoint: give the test's
        # transaction its own back afterwards (else a later pause in the test, or a slow
        # query, would be cut by the last job's timeouts).
        with connection.cursor() as cursor:
            cursor.execute(sql.READ_TIMEOUTS)
            statement, idle = cursor.fetchone()
        while len(finished) < max_jobs:
            batch = executor.run_batch(1, queues=queue_list, now=now)
            if not batch:
                break
            finished.extend(batch)
        with connection.cursor() as cursor:
            cursor.execute(sql.SET_TIMEOUTS, {"statement": statement, "idle": idle})
    if raise_errors:
        for item in finished:
            if item.outcome != Outcome.SUCCEEDED:
                if item.exception is not None:
                    raise item.exception
                raise DjasyncError(f"job #{item.job_id} {item.name} failed: {item.error}")
    return finished


def clear_queue(function: Callable[..., Any] | None = None) -> Any:
    """Delete every job (with its attempts) and every group; return how many jobs went.

    For tests and development shells, as django-async's ``clear_queue`` was: never on a
    queue whose jobs matter. Inside a ``TestCase`` it rolls back with the test. A job that a
    worker is running holds its row lock, so this waits for it to finish. Rows of other apps
    that reference a job get their ``on_delete``, as with any Django delete.

    Used as a decorator (``@clear_queue``), it empties the queue before each call of the
    decorated function.
    """
    if function is not None:
        @functools.wraps(function)
        def cleared(*args: Any, **kwargs: Any) -> Any:
            clear_queue()
            return function(*args, **kwargs)

        return cleared
    with transaction.atomic():
        _, by_model = Job.objects.all().delete()
        Group.objects.all().delete()
    return by_model.get(Job._meta.label, 0)


def scheduled(function: Any = None, *, args: Any = None, kwargs: Any = None) -> QuerySet[Job]:
    """Return the pending jobs, of ``function`` (and exactly these arguments) if given."""
    jobs = Job.objects.pending()
    if function is None:
        return jobs
    name = registry.name_of(function)
    if args is None and kwargs is None:
        return jobs.filter(name=name)
    return jobs.filter(identity=identity_of(name, check_args(args), check_kwargs(kwargs)))


def assert_scheduled(function: Any, *, args: Any = None, kwargs: Any = None,
                     count: int = 1) -> list[Job]:
    """Fail unless exactly ``count`` pending jobs of ``function`` (with these arguments) exist."""
    jobs = list(scheduled(function, args=args, kwargs=kwargs))
    if len(jobs) != count:
        pending = [f"{job.name}({job.args}, {job.kwargs})" for job in Job.objects.pending()[:20]]
        raise AssertionError(
            f"expected {count} pending job(s) of {registry.name_of(function)}"
            f"{'' if args is None and kwargs is None else f' with {args!r}, {kwargs!r}'}, "
            f"found {len(jobs)}; pending: {pending or 'none'}"
        )
    return jobs
