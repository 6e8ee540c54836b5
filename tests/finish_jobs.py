"""Job functions whose success cannot be written, and jobs that act on their batch-mates."""

from __future__ import annotations

import contextlib

import psycopg
from django.db import connection

import djasync
from djasync.scheduling import cancel, retry_now
from tests.models import Ledger

#: A ledger key with this prefix breaks a deferred constraint trigger at COMMIT (the
#: ``rejected_at_commit`` fixture installs it).
REJECTED = "reject"


def write_rejected_at_commit(key):
    """Writes a row that a DEFERRABLE INITIALLY DEFERRED trigger refuses at COMMIT (P0001)."""
    Ledger.objects.create(key=f"{REJECTED}-{key}")
    return key


def write_then_leave_search_path(key, local=True):
    """Writes, then points the search path at a schema without djasync's tables."""
    Ledger.objects.create(key=key)
    with connection.cursor() as cursor:
        cursor.execute(f"SET {'LOCAL ' if local else ''}search_path TO djasync_nowhere")
    return key


def write_then_set_role(key, role):
    """Writes, then switches the session to a role that may not touch djasync's tables."""
    Ledger.objects.create(key=key)
    with connection.cursor() as cursor:
        cursor.execute(f'SET ROLE "{role}"')
    return key


def write_then_deallocate_all(key):
    """Writes, then drops the session's prepared statements (djasync's finish among them)."""
    Ledger.objects.create(key=key)
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    return key


def catch_an_error_on_the_raw_connection(key):
    """Writes, then catches a database error itself on psycopg's connection: Django never
    hears of it, and the transaction is left aborted."""
    Ledger.objects.create(key=key)
    with contextlib.suppress(psycopg.Error):
        connection.connection.execute("SELECT 1 / 0")
    return key


def cancel_jobs(key, ids):
    """Cancels other jobs (batch-mates in the tests); records how many it cancelled."""
    Ledger.objects.create(key=key, note=str(cancel(ids)))
    return key


def cancel_self(key):
    from djasync.executor import current_job

    job = current_job()
    assert job is not None
    Ledger.objects.create(key=key, note=str(cancel([job.id])))
    return key


def deschedule_then_write(key, function, args):
    """Deschedules ``function(*args)`` (itself, or a batch-mate), then writes."""
    Ledger.objects.create(key=key, note=str(djasync.deschedule(function, args=args)))
    return key


def retry_jobs(key, ids):
    Ledger.objects.create(key=key, note=str(retry_now(ids)))
    return key


def call_job(key, job_id):
    """Runs another job now (``job()``): refused if that job is running."""
    from djasync.exceptions import DjasyncError
    from djasync.models import Job

    try:
        Job.objects.get(pk=job_id)()
        note = "ran"
    except DjasyncError as exc:
        note = f"refused: {exc}"[:100]
    Ledger.objects.create(key=key, note=note)
    return key
