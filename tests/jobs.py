"""Importable job functions for the tests (they live in an INSTALLED_APPS module)."""

from __future__ import annotations

import contextlib
import datetime
import decimal
import os
import signal
import threading
import time

from django.db import connection

import djasync
from tests.models import Ledger


def no_backoff(attempt: int) -> float:
    return 0.0


def add(a, b):
    return a + b


def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


def write_ledger(key, note=""):
    Ledger.objects.create(key=key, note=note)
    return key


def write_then_raise(key):
    Ledger.objects.create(key=key)
    raise RuntimeError(f"boom after writing {key}")


def always_raise():
    raise ValueError("this job always fails")


def return_unencodable(key):
    Ledger.objects.create(key=key)
    return object()


def return_decimal():
    return decimal.Decimal("1.10")


def return_datetime():
    return datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def sleep(seconds, key=None):
    time.sleep(seconds)
    if key:
        Ledger.objects.create(key=key)
    return seconds


def start_then_wait_for_file(started, gate, seconds=0.4):
    """An atomic job that creates ``started``, then waits, in its transaction, until ``gate``
    exists or ``seconds`` pass; return whether it saw ``gate``. A test decides the moment its
    COMMIT is sent; within the worker's chain limit (``limits.PAUSED_TTL_SECONDS``), its
    COMMIT goes in one message with the next claim."""
    with open(started, "w"):
        pass
    deadline = time.monotonic() + seconds
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.path.exists(gate)


def wait_then_connect_elsewhere(started, gate, connect_timeout):
    """An atomic job that creates ``started``, waits until ``gate`` exists, then opens a
    second connection to the database with ``connect_timeout``: cut off, it waits that long
    (a job blocked on the network, like an HTTP call), then fails, and its failure goes to
    the database on the job's own connection."""
    import psycopg

    with open(started, "w"):
        pass
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)
    with psycopg.connect(os.environ["DATABASE_URL"], connect_timeout=connect_timeout) as conn:
        conn.execute("SELECT 1")
    return True


def pg_sleep(seconds):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])


def kill_self(key=None):
    """Die the way a segfault or the OOM killer kills a worker process."""
    if key:
        Ledger.objects.create(key=key)
    os.kill(os.getpid(), signal.SIGKILL)


def exit_hard():
    os._exit(1)


def stop_parent_then_die(runs_file):
    """Poison that, on its first run, freezes its supervisor (SIGSTOP) before dying, so that
    its crash stays unrecorded while the test ends the dead child's session; each run appends
    its pid to ``runs_file``."""
    first = not os.path.exists(runs_file)
    with open(runs_file, "a") as runs:
        runs.write(f"{os.getpid()}\n")
    if first:
        os.kill(os.getppid(), signal.SIGSTOP)
    os.kill(os.getpid(), signal.SIGKILL)


def count_args(*args):
    return len(args)


class Maths:
    @classmethod
    def double(cls, x):
        return 2 * x


ON_COMMIT_CALLS: list[str] = []


def on_commit_then_raise(key):
    from django.db import transaction

    transaction.on_commit(lambda: ON_COMMIT_CALLS.append(key))
    raise RuntimeError("after on_commit")


def on_commit_then_return(key):
    from django.db import transaction

    transaction.on_commit(lambda: ON_COMMIT_CALLS.append(key))
    return key


def record_pid_then_sleep(pidfile, seconds, key):
    """Tell the test which process runs this job (outside the database), then work."""
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    Ledger.objects.create(key=key)
    return key


def busy_loop(seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def swallow_integrity_error(key):
    """Write, then catch a database error without a savepoint of its own (a user's mistake)."""
    from django.db import IntegrityError

    Ledger.objects.create(key=key)
    with contextlib.suppress(IntegrityError):
        Ledger.objects.create(key=None)
    return key


def raise_unless_ledger(key):
    """Fail until a Ledger row with ``key`` exists: lets a test fix the cause, then retry."""
    if not Ledger.objects.filter(key=key).exists():
        raise LookupError(f"no ledger row {key!r} yet")
    return key


def hourly_backoff(attempt: int) -> float:
    """Wait one hour per attempt made: easy to recognise in ``run_after``."""
    return 3600.0 * attempt


def report_current_job():
    from djasync.executor import current_job

    running = current_job()
    return {"id": running.id, "name": running.name, "queue": running.queue,
            "priority": running.priority, "attempt": running.attempt,
            "max_attempts": running.max_attempts}


async def async_write_ledger(key):
    """An async job: its ORM writes go through the job's own connection and transaction."""
    await Ledger.objects.acreate(key=key)
    return key


async def async_write_then_raise(key):
    await Ledger.objects.acreate(key=key)
    raise RuntimeError(f"async boom after writing {key}")


def long_job(key, gate=None, pidfile=None):
    """A non-atomic job: writes, then waits (outside any transaction) until ``gate`` exists."""
    from djasync.executor import current_job

    Ledger.objects.create(key=key, note=f"attempt {current_job().attempt}")
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
    deadline = time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def modules_imported(*names):
    """Report which of these modules the worker process running the job has imported."""
    import sys

    return [name for name in names if name in sys.modules]


def delete_own_row(key):
    """A job that deletes its own job row (and registers an on_commit callback)."""
    from django.db import transaction

    from djasync.executor import current_job
    from djasync.models import Job

    transaction.on_commit(lambda: ON_COMMIT_CALLS.append(key))
    Job.objects.filter(pk=current_job().id).delete()
    return key


#: What each ``write_after_commit`` callback saw when it ran: (key, in an atomic block,
#: the server's transaction status name).
AFTER_COMMIT_SEEN: list[tuple[str, bool, str]] = []


def write_after_commit(key):
    """Register an on_commit callback that looks at the connection's state and writes a row."""
    from django.db import transaction

    def after() -> None:
        status = connection.connection.info.transaction_status.name
        AFTER_COMMIT_SEEN.append((key, connection.in_atomic_block, status))
        Ledger.objects.create(key=f"{key} after commit")

    transaction.on_commit(after)
    Ledger.objects.create(key=key)
    return key


def drop_the_claim_statement(key):
    """DEALLOCATE the worker's prepared claim (as a pooler or an admin might), then succeed:
    the COMMIT of this job goes through and the next claim, in the same message, fails."""
    Ledger.objects.create(key=key)
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM pg_prepared_statements "
                       "WHERE statement LIKE '%SKIP LOCKED%'")
        for (name,) in cursor.fetchall():
            cursor.execute(f"DEALLOCATE {name}")
    return key


def raise_keyboard_interrupt(key):
    Ledger.objects.create(key=key)
    raise KeyboardInterrupt


def exit_process_politely(key):
    """sys.exit() from a job: a failure of the job, not an exit of the worker."""
    import sys

    Ledger.objects.create(key=key)
    sys.exit(3)


def reference_a_missing_job(key):
    """Writes a row whose foreign key is checked only at COMMIT (Django's FKs are deferred):
    the job returns, and its transaction's COMMIT fails."""
    from tests.models import JobReference

    Ledger.objects.create(key=key)
    JobReference.objects.create(job_id=987_654_321)
    return key


def schedule_from_a_thread_then_here(key):
    """A fan-out job: a helper thread schedules (on its own connection), then the job does."""

    def helper():
        try:
            djasync.schedule(add, args=[1, 2])
        finally:
            connection.close()

    thread = threading.Thread(target=helper)
    thread.start()
    thread.join()
    djasync.schedule(add, args=[3, 4])
    Ledger.objects.create(key=key)
    return key


def deallocate_then_raise(key):
    """Drop the session's prepared statements (someone's code; DEALLOCATE ALL is allowed in a
    transaction), then fail."""
    Ledger.objects.create(key=key)
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    raise ValueError("failed after DEALLOCATE ALL")


def long_job_losing_its_session(key):
    """A non-atomic job whose database session is ended from outside while it runs (as a
    restart of PostgreSQL or pg_terminate_backend would), before its outcome is written."""
    import psycopg

    Ledger.objects.create(key=key)
    pid = connection.cursor().connection.info.backend_pid
    params = {k: v for k, v in connection.get_connection_params().items()
              if k in ("dbname", "user", "password", "host", "port")}
    with psycopg.connect(**params, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])
    return key


def tick(path, seconds, idle_timeout_ms=None):
    """Run for ``seconds``, appending ``<event> <pid> <backend pid> <epoch>`` lines to ``path``
    every 0.05 s (``start``, ``tick``s, ``end``): the file shows when each run went on, from
    the local clock, whatever happened to its database session. ``idle_timeout_ms`` sets the
    session's idle-in-transaction timeout for the rest of the transaction (PostgreSQL then
    ends the session while the code sleeps)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
        if idle_timeout_ms is not None:
            cursor.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, true)",
                           [str(idle_timeout_ms)])

    def write(event):
        with open(path, "a") as out:
            out.write(f"{event} {os.getpid()} {backend} {time.time():.3f}\n")

    write("start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        write("tick")
    write("end")
    return seconds


def record_timeouts(key):
    """Write the timeouts this job's statements run under (``statement_timeout`` and the
    idle-in-transaction one, as ``SHOW`` prints them) to the ledger, as ``"<stmt>|<idle>"``."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('statement_timeout') || '|' ||"
                       " current_setting('idle_in_transaction_session_timeout')")
        (note,) = cursor.fetchone()
    Ledger.objects.create(key=key, note=note)
    return note


#: The table flow-control tests record runs in (made by tests/test_limits.py): a job's start
#: and end as PostgreSQL's clock_timestamp() saw them, written with the job's own commit.
FLOW_RUNS = "flow_run"


def flow_run(key, seconds=0.02, pidfile=None):
    """Record this run's start and end under ``key`` (an atomic job: the row commits with
    the job, so only runs that finished are recorded); optionally publish the pid and wait."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        (started,) = cursor.fetchone()
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
    time.sleep(seconds)
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {FLOW_RUNS} (key, started, finished, pid) "
                       "VALUES (%s, %s, clock_timestamp(), pg_backend_pid())", [key, started])


#: Seconds between the "still running" marks of :func:`flow_outside`.
FLOW_HEARTBEAT_SECONDS = 0.025


def flow_outside(key, seconds=0.02, pidfile=None):
    """Record this run under ``key`` on a connection of its own (autocommit), so that a run
    killed or cut off mid-way is recorded too: its start, then every 25 ms the moment it was
    last seen running (``finished``: the end of a run that completed, else the last mark).
    Works for atomic and long jobs; ``pidfile`` gets "<pid of the job's own database session
    (the one holding its flow-control slots)> <pid of this process>"."""
    import psycopg

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (backend,) = cursor.fetchone()
    # (Unnamed statements: DATABASE_URL may go through a pooler that carries no prepared ones.)
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True,
                         prepare_threshold=None) as record:
        (started,) = record.execute(
            f"INSERT INTO {FLOW_RUNS} (key, started, finished, pid) "
            "VALUES (%s, clock_timestamp(), clock_timestamp(), %s) RETURNING started",
            [key, os.getpid()]).fetchone()
        if pidfile:
            with open(pidfile, "w") as f:
                f.write(f"{backend} {os.getpid()}")
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, FLOW_HEARTBEAT_SECONDS))
            record.execute(f"UPDATE {FLOW_RUNS} SET finished = clock_timestamp() "
                           "WHERE key = %s AND pid = %s AND started = %s",
                           [key, os.getpid(), started])


def flow_hold(key, gate, pidfile, ending="return"):
    """Hold ``key``'s slot (an atomic job) until the file ``gate`` exists, then end as
    ``ending`` says: "return"; "raise"; "commit_fails" (a row whose deferred foreign key
    fails the transaction's COMMIT, so that the whole transaction rolls back). ``pidfile``
    gets "<pid of the job's database session> <pid of this process>"."""
    from tests.models import JobReference

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (backend,) = cursor.fetchone()
    with open(pidfile, "w") as f:
        f.write(f"{backend} {os.getpid()}")
    deadline = time.monotonic() + 120
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no gate file {gate}")
        time.sleep(0.002)
    if ending == "raise":
        raise RuntimeError("flow_hold raised, as asked")
    if ending == "commit_fails":
        JobReference.objects.create(job_id=987_654_321)
    return key
