"""Job functions the chaos workers run (``chaos`` is an installed app, so they are allowed).

Every job takes its own unique ``key`` as first argument; its effects carry that key.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import signal
import time
from pathlib import Path

import psycopg
from django.db import connection

from chaos.models import LedgerEntry
from djasync.executor import current_job
from djasync.scheduling import cancel

#: Directory shared with the harness (markers of running slow jobs, the "fast" flag).
RUN_DIR_ENV = "CHAOS_RUN_DIR"

EXTERNAL_INSERT = (
    "INSERT INTO chaos_ledgerentry (key, kind, pid, at) VALUES (%s, 'external', %s, now())"
)


def short_backoff(attempt: int) -> float:
    """Retry after 0.2 s: failed attempts come back within the run."""
    return 0.2


def ledger(key: str, seconds: float = 0.0, flow: list | None = None) -> str:
    """The innocent job: sleep 0-4 ms, write one ledger row in the job's transaction, sleep
    (``seconds`` more: group members run a while, so that members are added meanwhile).

    A flow job (``flow`` = [tenant key, rated, queue], scheduled with those limits) records
    its run in ``chaos_flowrun`` while it sleeps (see :func:`_flow_run`), and its commit in
    ``chaos_flowcommit``, in its transaction."""
    if flow is not None:
        run_id = _flow_run(key, flow, "atomic", seconds)
        LedgerEntry.objects.create(key=key, kind="txn", pid=os.getpid())
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO chaos_flowcommit (run_id, xid) "
                           "VALUES (%s, txid_current())", [run_id])
        return key
    time.sleep(random.uniform(0, 0.004))
    LedgerEntry.objects.create(key=key, kind="txn", pid=os.getpid())
    time.sleep(random.uniform(0, 0.004) + seconds)
    return key


#: Seconds between the marks a running flow job leaves (``chaos_flowrun.seen``).
FLOW_HEARTBEAT_SECONDS = 0.025
_recorder: psycopg.Connection | None = None


def _record(sql: str, params: list) -> tuple:
    """Run ``sql`` on this process's recording connection (autocommit, its own session:
    what it writes stays written whatever happens to the job's transaction); reconnect once
    if that connection is gone (the chaos ends sessions and restarts the server)."""
    global _recorder
    for retry in (False, True):
        try:
            if _recorder is None or _recorder.closed:
                # Not durable (synchronous_commit off): the marks come every 25 ms from each
                # running flow job. An immediate restart may lose the last ~0.2 s of them:
                # runs then look shorter or absent, which can hide an overlap, never make one.
                # Straight to PostgreSQL (CHAOS_RECORD_URL) for a daemon behind PgBouncer,
                # which refuses ``options``: the recorder is the harness's witness, not djasync.
                url = os.environ.get("CHAOS_RECORD_URL") or os.environ["DATABASE_URL"]
                _recorder = psycopg.connect(url, autocommit=True,
                                            connect_timeout=5,
                                            options="-c synchronous_commit=off")
            row = _recorder.execute(sql, params).fetchone()
            assert row is not None
            return row
        except psycopg.OperationalError:
            with contextlib.suppress(Exception):
                if _recorder is not None:
                    _recorder.close()
            _recorder = None
            if retry:
                raise
    raise AssertionError("unreachable")


def _now() -> datetime.datetime:
    """This process's clock (the hosts' namespaces and the server share one): when a mark was
    *sent*. The server's ``clock_timestamp()`` says when it was executed, which can be later
    than the process lived: a killed job's last mark, sent into a cut, was retransmitted by the
    kernel after the heal and stamped 0.75 s after the kill, beside the job's next run (seed
    905's F1 "overlap" of 3 on a concurrency-2 key)."""
    return datetime.datetime.now(datetime.UTC)


def _flow_run(key: str, flow: list, kind: str, seconds: float) -> int:
    """Record a flow job's run on the recording connection: its start, then every 25 ms
    ``seen`` (the last moment it was known to run) while it works ``seconds``, then
    ``finished``. A run killed or cut off keeps its start and its last mark: the checker
    counts it as running from the one to the other, no longer, no shorter. If the start
    cannot be written the job fails (and runs again): no run goes unrecorded."""
    tenant, rated, queue = flow
    # The server session holding the run's slot: the job's connection (straight to
    # PostgreSQL; behind PgBouncer this is the pooler's key, which matches no session).
    backend = connection.connection.info.backend_pid if connection.connection else None
    started = _now()
    (run_id,) = _record(
        "INSERT INTO chaos_flowrun (job_key, tenant, rated, queue, kind, pid, backend, "
        "started, seen) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        [key, tenant, rated, queue, kind, os.getpid(), backend, started, started])
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, FLOW_HEARTBEAT_SECONDS))
        with contextlib.suppress(psycopg.Error):  # the mark is missed: the run looks shorter
            _record("UPDATE chaos_flowrun SET seen = %s WHERE id = %s RETURNING id",
                    [_now(), run_id])
    with contextlib.suppress(psycopg.Error):
        ended = _now()
        _record("UPDATE chaos_flowrun SET seen = %s, finished = %s WHERE id = %s RETURNING id",
                [ended, ended, run_id])
    return run_id


def final(key: str) -> str:
    """A group's final job: its ledger row, written first, holds ``clock_timestamp()`` at the
    start of its body (the checker compares it with the members' ``finished_at``)."""
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO chaos_ledgerentry (key, kind, pid, at) "
                       "VALUES (%s, 'txn', %s, clock_timestamp())", [key, os.getpid()])
    return key


def long(key: str, seconds: float, flow: list | None = None) -> str:
    """A long job (scheduled with meta atomic=False): write its effect at once (autocommit:
    at least once, with the run's start), then work ``seconds`` under its lease (a flow job,
    see :func:`ledger`: recording its run in ``chaos_flowrun`` meanwhile)."""
    running = current_job()
    LedgerEntry.objects.create(key=key, kind="long", pid=os.getpid(),
                               run_started=running.started_at if running else None)
    if flow is not None:
        _flow_run(key, flow, "long", seconds)
    else:
        time.sleep(seconds)
    return key


def cancel_mate(key: str, mate_id: int, mate_key: str) -> str:
    """Cancel another job (scheduled with this one, claimed right after it: on a daemon with
    ``--batch-size`` it is often in this job's batch); a cancel that returns success is
    recorded in this job's transaction, so the record commits exactly when the cancel does."""
    if cancel([mate_id]) == 1:
        LedgerEntry.objects.create(key=mate_key, kind="cancel_ok", pid=os.getpid())
    LedgerEntry.objects.create(key=key, kind="txn", pid=os.getpid())
    return key


def periodic(name: str) -> str:
    """A periodic job (chaos/settings.py): one ledger row keyed by its job id, in its
    transaction (every run of it has the same arguments)."""
    running = current_job()
    assert running is not None, "periodic jobs run through the executor"
    LedgerEntry.objects.create(key=f"periodic-{running.id}", kind="periodic", pid=os.getpid())
    return name


def external(key: str) -> str:
    """Negative control: the same effect, committed on a second connection outside the job's
    transaction. A crash after it re-runs the job and duplicates the row (expected).

    The sleep after the write is longer than ``ledger``'s so that faults land in that window
    often enough for the control to show duplicates in a short run.
    """
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True, connect_timeout=5) as conn:
        conn.execute(EXTERNAL_INSERT, (key, os.getpid()))
    time.sleep(random.uniform(0.03, 0.08))
    return key


def segv(key: str) -> None:
    """Poison: the process dies of a segmentation fault."""
    os.kill(os.getpid(), signal.SIGSEGV)


def sigkill(key: str) -> None:
    """Poison: the process is killed (the OOM killer's way)."""
    os.kill(os.getpid(), signal.SIGKILL)


def exit1(key: str) -> None:
    """Poison: the process exits at once, without cleanup."""
    os._exit(1)


def always_raise(key: str) -> None:
    """Poison of the ordinary kind: it raises every time."""
    raise RuntimeError(f"poison job {key} always raises")


def slow(key: str, seconds: float) -> str:
    """A long job for the SIGTERM tests: tell the harness it started, work, write its row.

    If the harness has created ``<run dir>/fast``, the work is cut short (a re-run after a
    forced stop need not wait again).
    """
    run_dir = Path(os.environ[RUN_DIR_ENV])
    (run_dir / "started" / f"{key}.{os.getpid()}").write_text(str(time.time()))
    if not (run_dir / "fast").exists():
        time.sleep(seconds)
    LedgerEntry.objects.create(key=key, kind="txn", pid=os.getpid())
    return key


def stop_supervisor_then_die(key: str, runs_file: str) -> None:
    """Poison that freezes its supervisor (SIGSTOP) on its first run before dying, so that
    its crash stays unrecorded meanwhile; each run appends a line to ``runs_file``.

    Used by the reproduction of an early lock release (see chaos/README.md).
    """
    path = Path(runs_file)
    first = not path.exists()
    with path.open("a") as runs:
        runs.write(f"{os.getpid()}\n")
    if first:
        os.kill(os.getppid(), signal.SIGSTOP)
    os.kill(os.getpid(), signal.SIGKILL)
