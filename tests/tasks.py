"""Importable Tasks (Django's Tasks framework) for the backend tests, in an INSTALLED_APPS module.

Each Task's module-level name is its function's name, so its ``module_path`` imports back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from importlib.util import find_spec
from typing import Any

import django
from asgiref.sync import sync_to_async
from django.db import IntegrityError

from djasync.backends import DjasyncTask
from djasync.executor import current_job
from tests.models import Ledger

if find_spec("django.tasks") is not None:
    from django.tasks import task, task_backends  # noqa: F401  (the tests use task_backends)
else:  # Django 5.2 with the django-tasks backport
    from django_tasks import task, task_backends  # noqa: F401

#: Django 6.0's @task takes no backend options; 6.1 and the backport pass them to task_class.
DECORATOR_TAKES_OPTIONS = django.VERSION >= (6, 1) or find_spec("django.tasks") is None


def with_options(**options: Any) -> Callable[[Callable[..., Any]], DjasyncTask]:
    """``@task(**options)``, or on Django 6.0 the DjasyncTask it would build."""
    if DECORATOR_TAKES_OPTIONS:
        return task(**options)
    return lambda function: DjasyncTask(func=function, priority=0, backend="default",
                                        queue_name="default", run_after=None,
                                        takes_context=False, **options)


@task
def add(a, b):
    return a + b


@task
def write_ledger(key):
    Ledger.objects.create(key=key)
    return key


@task
def write_then_raise(key):
    Ledger.objects.create(key=key)
    raise ValueError(f"boom after writing {key}")


@with_options(max_attempts=1, timeout=30)
def fail_once(key):
    raise ValueError(f"{key} fails, and has one attempt")


@with_options(max_attempts=2, backoff=120)
def fail_with_backoff(key):
    raise ValueError(f"{key} fails; its retry waits two minutes")


@task
def report_job_name():
    running = current_job()
    return running.name if running else None


@task(queue_name="emails")
def send_mail(to):
    return f"sent to {to}"


@task(takes_context=True)
def report_context(context):
    result = context.task_result
    seen = result.task.get_backend().get_result(result.id)
    return {"attempt": context.attempt, "id": result.id, "status": result.status,
            "worker_ids": result.worker_ids, "status_seen_by_get_result": seen.status}


@task(takes_context=True)
def fail_before_attempt(context, succeed_on):
    Ledger.objects.create(key=f"attempt {context.attempt}")
    if context.attempt < succeed_on:
        raise LookupError(f"attempt {context.attempt} fails")
    return {"attempt": context.attempt, "errors": len(context.task_result.errors),
            "worker_ids": len(context.task_result.worker_ids)}


@task
def wait_for_file(path, key):
    """Run until the test creates ``path`` (at most 30 s), then write."""
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    Ledger.objects.create(key=key)
    return key


@with_options(max_attempts=1)
def kill_self():
    """Die the way a segfault or the OOM killer kills a worker process."""
    os.kill(os.getpid(), signal.SIGKILL)


def greet():
    return "hello"


#: Importing ``tests.tasks.greet`` finds the plain function, not this Task: a worker could not
#: run it.
misnamed = task(greet)


@task
def return_a_set():
    return {1, 2}


@task
def swallow_integrity_error(key):
    Ledger.objects.create(key=key)
    with contextlib.suppress(IntegrityError):  # without a savepoint of its own: a mistake
        Ledger.objects.create(key=None)
    return key


@task
async def async_add(a, b):
    await asyncio.sleep(0)
    return a + b


@task
async def async_write(key):
    await Ledger.objects.acreate(key=key)
    return key


def create_ledger(key):
    return Ledger.objects.create(key=key).key


@task
async def async_write_through_sync_to_async(key):
    return await sync_to_async(create_ledger, thread_sensitive=True)(key)


@task
async def async_write_then_raise(key):
    await Ledger.objects.acreate(key=key)
    raise RuntimeError(f"async boom after writing {key}")


@task(takes_context=True)
async def async_report_context(context):
    running = current_job()
    return {"attempt": context.attempt, "job_id": running.id if running else None}


@with_options(max_attempts=1)
def exit_one():
    """End the way a script does: ``exit(1)`` (SystemExit)."""
    sys.exit(1)


@with_options(max_attempts=1)
def raise_keyboard_interrupt():
    """Raise KeyboardInterrupt from the task's own code (no signal involved)."""
    raise KeyboardInterrupt("raised by the task")


@task
def charge(order_id, tenant_id, region="eu", **extra):
    """A Task whose flow-control keys come from its arguments (tests/test_limits.py)."""
    return order_id
