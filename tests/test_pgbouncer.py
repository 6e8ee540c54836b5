"""End to end through a real PgBouncer in transaction mode.

The daemon runs with ``DATABASES`` pointing at a PgBouncer started here, in front of the test
database; a second client shares the same pool. Nothing the worker sets may reach that client
(every job timeout is ``SET LOCAL``), every job must still run under its timeouts, and LISTEN
either goes straight to PostgreSQL (``DJASYNC["LISTEN_URL"]``) or is given up with evidence.

Two PgBouncers, where it matters: Debian's package (1.18 on Debian 12), which cannot carry
prepared statements, and the newer one tools/pgbouncer_build.py builds (1.24), which can
(``max_prepared_statements``). With Django's default settings djasync finds out which, once per
connection: its statements go unnamed through the first (as with ``prepare_threshold: None``)
and stay prepared through the second. A missing PgBouncer is skipped, saying why.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from django.db import connection, transaction
from django.db.models import Count, Sum

import djasync
from djasync.models import Job, Outcome, Status
from djasync_worker import listener as listener_module
from djasync_worker.listener import Listener
from tests import jobs, pgbouncer
from tests.conftest import conninfo
from tests.daemon import ROOT, database_url, start_worker, stop, wait_for, worker_env
from tests.models import Ledger

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.daemon]

#: Debian's package (1.18 on Debian 12).
DEBIAN = pgbouncer.executable()
#: The newer one, built by tools/pgbouncer_build.py (.ci/run builds it; a developer runs it).
BUILT = pgbouncer.built_executable()
#: PgBouncer's pool for the test database: fewer server connections than its clients, so
#: that the worker's children and the other client share them.
POOL_SIZE = 3
#: max_prepared_statements of the newer PgBouncer: fewer than djasync's statements would make
#: PgBouncer evict and prepare again; enough for all of them.
MAX_PREPARED = 100
#: The worker's default job timeout here, and what SHOW prints for it and its idle timeout.
TIMEOUT = 120
DEFAULT_TIMEOUTS = "2min|130s"

_NO_DEBIAN = "Debian's pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)"
_NO_BUILT = (f"PgBouncer {pgbouncer.pgbouncer_build.VERSION} is not built: run "
             "`python3 tools/pgbouncer_build.py` (.ci/run does; it needs the Debian mirror)")
#: The fixture's programs: ``bouncer`` takes Debian's unless a test asks for another.
ON_DEBIAN = pytest.param("debian", id="pgbouncer-debian",
                         marks=pytest.mark.skipif(DEBIAN is None, reason=_NO_DEBIAN))
ON_BUILT = pytest.param("built", id=f"pgbouncer-{pgbouncer.pgbouncer_build.VERSION}",
                        marks=pytest.mark.skipif(BUILT is None, reason=_NO_BUILT))
#: The built one with max_prepared_statements = 0 (its default from 1.24 on is 200).
ON_BUILT_OFF = pytest.param(
    "built-off", id=f"pgbouncer-{pgbouncer.pgbouncer_build.VERSION}-max_prepared_statements-0",
    marks=pytest.mark.skipif(BUILT is None, reason=_NO_BUILT))


@pytest.fixture
def bouncer(request: pytest.FixtureRequest, tmp_path: Path, transactional_db: None):
    """A PgBouncer in transaction mode in front of the test database, on a free port: Debian's
    (the default), or the built one with ``max_prepared_statements`` set (``built``) or 0
    (``built-off``)."""
    which = getattr(request, "param", "debian")
    program = DEBIAN if which == "debian" else BUILT
    if program is None:
        pytest.skip(_NO_DEBIAN if which == "debian" else _NO_BUILT)
    version = pgbouncer.version(program)
    assert version is not None, program
    max_prepared = None
    if version >= pgbouncer.TRACKS_PREPARED:
        max_prepared = 0 if which == "built-off" else MAX_PREPARED
    started = pgbouncer.start(tmp_path / "pgbouncer", conninfo(), pool_size=POOL_SIZE,
                              program=program, max_prepared_statements=max_prepared)
    yield started
    started.stop()


def carries_prepared(bouncer: pgbouncer.PgBouncer) -> bool:
    return bouncer.version >= pgbouncer.TRACKS_PREPARED and "max_prepared_statements = 0" not in (
        bouncer.directory / "pgbouncer.ini").read_text()


def pooled_env(tmp_path: Path, bouncer: pgbouncer.PgBouncer, *, listen_url: str | None,
               prepared: bool) -> dict[str, str]:
    """The worker's environment: its database through ``bouncer``; its settings module
    ``pooled_settings`` (no prepared statements unless ``prepared``)."""
    lines = ["from tests.settings import *  # noqa",
             f"DJASYNC = {{**DJASYNC, 'TIMEOUT': {TIMEOUT}, 'LISTEN_URL': {listen_url!r}}}"]
    if not prepared:
        lines.append("DATABASES['default']['OPTIONS'] = {'prepare_threshold': None}")
    (tmp_path / "pooled_settings.py").write_text("\n".join(lines) + "\n")
    return worker_env(DATABASE_URL=bouncer.url(), PYTHONPATH=f"{tmp_path}:{ROOT}")


def server_defaults() -> str:
    with psycopg.connect(**conninfo(), autocommit=True) as direct:
        return "|".join(direct.execute(f"SHOW {name}").fetchone()[0] for name in (
            "statement_timeout", "idle_in_transaction_session_timeout"))


class PoolWatcher(threading.Thread):
    """Another client of the pool: reads the two timeouts again and again, in autocommit
    statements and in transactions, and counts what it saw."""

    def __init__(self, bouncer: pgbouncer.PgBouncer) -> None:
        super().__init__(daemon=True)
        self.bouncer = bouncer
        self.seen: collections.Counter[str] = collections.Counter()
        self.stopped = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.bouncer.url(), autocommit=True,
                                 prepare_threshold=None) as conn:
                while not self.stopped.is_set():
                    self.seen[_show_timeouts(conn)] += 1
                    with conn.transaction():
                        self.seen[_show_timeouts(conn)] += 1
                    time.sleep(0.01)
        except BaseException as exc:  # reported by the test
            self.error = exc


def _show_timeouts(conn: psycopg.Connection) -> str:
    return "|".join(conn.execute(f"SHOW {name}").fetchone()[0] for name in (
        "statement_timeout", "idle_in_transaction_session_timeout"))


def every_server_connection(bouncer: pgbouncer.PgBouncer) -> list[str]:
    """The two timeouts on each server connection of the pool: as many clients as the pool
    has connections each hold a transaction open, so each is on a server connection of its own."""
    clients = [psycopg.connect(bouncer.url(), prepare_threshold=None) for _ in range(POOL_SIZE)]
    try:
        seen = [_show_timeouts(client) for client in clients]  # each opens a transaction
        pids = {client.execute("SELECT pg_backend_pid()").fetchone()[0] for client in clients}
        assert len(pids) == POOL_SIZE, pids
        return seen
    finally:
        for client in clients:  # ended, not dropped mid-transaction: PgBouncer keeps the
            client.rollback()   # server connection (it closes one its client left dirty)
            client.close()


def stats(bouncer: pgbouncer.PgBouncer) -> dict[str, int]:
    """PgBouncer's SHOW STATS for the test database (1.24+ counts prepared statements:
    ``total_client_parse_count``, ``total_server_parse_count``, ``total_bind_count``)."""
    (row,) = [row for row in bouncer.admin_dicts("SHOW STATS")
              if row["database"] == conninfo()["dbname"]]
    return {key: int(value) for key, value in row.items() if key != "database"}


def server_prepared_statements(bouncer: pgbouncer.PgBouncer) -> list[tuple[str, str]]:
    """(name, statement) of every prepared statement on every server connection of the pool
    (one client per server connection, each holding a transaction, as above)."""
    clients = [psycopg.connect(bouncer.url(), prepare_threshold=None) for _ in range(POOL_SIZE)]
    try:
        found = [row for client in clients for row in client.execute(
            "SELECT name, statement FROM pg_prepared_statements").fetchall()]
        pids = {client.execute("SELECT pg_backend_pid()").fetchone()[0] for client in clients}
        assert len(pids) == POOL_SIZE, pids
        return found
    finally:
        for client in clients:  # ended, not dropped mid-transaction: PgBouncer keeps the
            client.rollback()   # server connection (it closes one its client left dirty)
            client.close()


@pytest.mark.parametrize("bouncer", [ON_DEBIAN, ON_BUILT], indirect=True)
def test_jobs_run_through_pgbouncer_under_their_timeouts_and_nothing_leaks_to_other_clients(
        tmp_path, bouncer):
    """Django's default settings on both: through Debian's PgBouncer (1.18) djasync's
    statements go unnamed; through 1.21+ with ``max_prepared_statements`` they stay prepared."""
    prepared = carries_prepared(bouncer)
    defaults = server_defaults()
    assert defaults != DEFAULT_TIMEOUTS  # else a leak could not be told from the default
    log = tmp_path / "w.log"
    env = pooled_env(tmp_path, bouncer, listen_url=database_url(), prepared=True)
    watcher = PoolWatcher(bouncer)
    watcher.start()
    daemon = start_worker("--concurrency", "3", "--poll-interval", "30",
                          "--settings", "pooled_settings", log=log, env=env)
    try:
        wait_for(lambda: "worker ready" in log.read_text(), timeout=30, what="ready")
        for round_ in range(4):  # while the worker runs, scheduled after it started
            djasync.schedule_many(
                [djasync.JobSpec(jobs.record_timeouts, [f"r{round_}-{i}"]) for i in range(40)]
                + [djasync.JobSpec(jobs.add, [i, i]) for i in range(20)]
                + [djasync.JobSpec(jobs.record_timeouts, [f"c{round_}"], meta={"timeout": 7})])
            time.sleep(0.2)
        over = djasync.schedule(jobs.pg_sleep, args=[5], meta={"timeout": 1, "max_attempts": 1})
        wait_for(lambda: not Job.objects.filter(status=Status.PENDING).exists(), timeout=60,
                 what="every job to end")
    finally:
        assert stop(daemon) == 0, log.read_text()[-3000:]
        watcher.stopped.set()
        watcher.join(10)
    text = log.read_text()
    assert watcher.error is None, watcher.error
    # The other client saw the server's defaults, and only them, all along.
    assert sum(watcher.seen.values()) > 20, watcher.seen
    assert set(watcher.seen) == {defaults}, watcher.seen
    # After the run, not one server connection of the pool keeps a setting of the worker's.
    assert every_server_connection(bouncer) == [defaults] * POOL_SIZE
    # Every job ran under its timeouts: the default one, or its own.
    notes = dict(Ledger.objects.values_list("note").annotate(n=Count("id")))
    assert notes == {DEFAULT_TIMEOUTS: 160, "7s|17s": 4}, notes
    over.refresh_from_db()
    assert over.status == Status.FAILED
    attempt = over.attempt_set.get()
    # Stopped by its statement_timeout (1 s), not by the watchdog (which kills at 2 s).
    assert attempt.outcome == Outcome.TIMED_OUT
    assert "statement timeout" in attempt.exception_message, attempt.exception_message
    assert Job.objects.filter(status=Status.SUCCEEDED).count() == 244
    # LISTEN went straight to PostgreSQL (LISTEN_URL); the budget is the pooler's.
    assert "listening channel=djasync" in text
    assert "LISTEN unavailable" not in text
    assert "connection budget not checked: this worker goes through a connection pooler" in text
    assert "Traceback" not in text, text[-3000:]
    # No statement went missing, on either PgBouncer (unnamed ones cannot; prepared ones are
    # carried by 1.21+), and PgBouncer logged no error of a client's.
    assert ("statements stay prepared through the connection pooler" in text) == prepared
    assert ("statements go unnamed (parsed every time) through" in text) != prepared
    assert "does not exist" not in text and "is missing on the server" not in text, text[-3000:]
    assert not re.search(r"ERROR|WARNING", bouncer.log.read_text()), bouncer.log.read_text()
    on_servers = server_prepared_statements(bouncer)
    # djasync's names never reach a server connection (not even its probe's, on 1.18): no
    # other client can run into them.
    assert not [name for name, _ in on_servers if name.startswith("djasync_")], on_servers
    if not prepared:
        assert on_servers == [], on_servers
        return
    # Prepared through 1.21+: PgBouncer prepared each statement once per server connection
    # under a name of its own, and bound them for every job; djasync parsed each once per
    # client connection (a few per child), not once per job.
    counts = stats(bouncer)
    assert any("FROM djasync_job" in statement and name.startswith("PGBOUNCER_")
               for name, statement in on_servers), (on_servers, counts, bouncer.log.read_text())
    assert counts["total_bind_count"] > 244 * 3, counts  # claim, finish, BEGIN/COMMIT … per job
    assert counts["total_client_parse_count"] < counts["total_bind_count"] / 10, counts
    assert counts["total_server_parse_count"] < counts["total_bind_count"] / 10, counts


def test_without_listen_url_the_worker_says_listen_is_unavailable_and_why_and_still_runs_jobs(
        tmp_path, bouncer):
    log = tmp_path / "w.log"
    env = pooled_env(tmp_path, bouncer, listen_url=None, prepared=False)
    daemon = start_worker("--concurrency", "2", "--poll-interval", "0.3",
                          "--settings", "pooled_settings", log=log, env=env)
    stop_churn = threading.Event()

    def churn() -> None:
        """As a busy application would, take the server connection the LISTEN ran on (the
        one session whose pg_listening_channels() has it) and hold it for longer than the
        listener's probe interval."""
        with psycopg.connect(bouncer.url(), prepare_threshold=None) as conn:
            while not stop_churn.is_set():
                if take_the_listening_session(conn):
                    time.sleep(listener_module.PROBE_INTERVAL_SECONDS * 1.5)
                conn.commit()
                time.sleep(0.02)

    churner = threading.Thread(target=churn, daemon=True)
    try:
        wait_for(lambda: "worker ready" in log.read_text(), timeout=30, what="ready")
        churner.start()
        wait_for(lambda: "LISTEN unavailable" in log.read_text(), timeout=60,
                 what="the listener to find out")
        job = djasync.schedule(jobs.add, args=[1, 2])
        wait_for(lambda: Job.objects.filter(pk=job.pk, status=Status.SUCCEEDED).exists(),
                 timeout=30, what="the job, found by polling")
    finally:
        stop_churn.set()
        if churner.is_alive():
            churner.join(10)  # before the fixture stops PgBouncer under it
        assert stop(daemon) == 0, log.read_text()[-3000:]
    text = log.read_text()
    line = next(line for line in text.splitlines() if "LISTEN unavailable" in line)
    assert "server session pid" in line and "LISTEN_URL" in line, line
    assert text.count("LISTEN unavailable") == 1, text[-3000:]
    assert "the LISTEN connection goes through a connection pooler" in text


def take_the_listening_session(conn: psycopg.Connection) -> bool:
    """In the transaction ``conn`` opens, whether its server session is the one that LISTENs."""
    return conn.execute("SELECT 'djasync' IN (SELECT pg_listening_channels())").fetchone()[0]


def test_the_listener_gives_up_listen_only_on_evidence_that_its_session_changed(
        bouncer, monkeypatch, caplog):
    monkeypatch.setattr(listener_module, "PROBE_INTERVAL_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger="djasync_worker.listener")
    listener = Listener(bouncer.conninfo())
    direct = Listener(conninfo())

    def drive(until, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, (listener.state, direct.state)
            for one in (listener, direct):
                one.ensure()
                one.receive()
            time.sleep(0.01)

    try:
        drive(lambda: listener.up and direct.up)
        # Up, through the pooler: nothing says yet that LISTEN cannot work (session mode would).
        assert "goes through a connection pooler" in caplog.text
        assert "LISTEN unavailable" not in caplog.text
        # Another client takes that very server connection and holds it: the next probe must
        # run on another one.
        with psycopg.connect(bouncer.url(), prepare_threshold=None) as other:
            for _ in range(200):
                if take_the_listening_session(other):
                    break
                other.rollback()
                time.sleep(0.02)
            else:
                pytest.fail("the pool never lent the listener's server connection again")
            drive(lambda: listener.unavailable)
        assert "LISTEN unavailable" in caplog.text
        # Given up for good: no reconnect, no deadline; a direct listener is untouched.
        assert listener.next_deadline() == float("inf") and listener.fileno() is None
        assert not listener.ensure() and not listener.up
        drive(lambda: direct.up)
        assert direct.state == listener_module.UP and not direct.unavailable
    finally:
        listener.close()
        direct.close()


@pytest.mark.parametrize("bouncer", [ON_DEBIAN, ON_BUILT, ON_BUILT_OFF], indirect=True)
def test_a_worker_finds_out_whether_the_pooler_carries_prepared_statements(tmp_path, bouncer):
    """Through a pooler, the worker's connections find out (once each) whether it carries
    prepared statements (PgBouncer 1.21+ with max_prepared_statements > 0) or passes their
    names through to whichever server connection it lends (1.18; 1.24 with 0), says which,
    and runs its jobs either way without a statement going missing; 1.18's probe leaves no
    statement behind on the server connections."""
    log = tmp_path / "w.log"
    env = pooled_env(tmp_path, bouncer, listen_url=database_url(), prepared=True)
    djasync.schedule_many([djasync.JobSpec(jobs.add, [i, i]) for i in range(100)])
    daemon = start_worker("--concurrency", "2", "--settings", "pooled_settings", log=log,
                          env=env)
    try:
        wait_for(lambda: Job.objects.filter(status=Status.SUCCEEDED).count() == 100,
                 timeout=60, what="every job to succeed")
    finally:
        assert stop(daemon) == 0, log.read_text()[-3000:]
    text = log.read_text()
    expected, other = ("stay prepared", "go unnamed") if carries_prepared(bouncer) else (
        "go unnamed", "stay prepared")
    lines = [line for line in text.splitlines() if f"statements {expected}" in line]
    assert lines and f"statements {other}" not in text, text[-3000:]
    assert "max_prepared_statements" in lines[0], lines[0]
    assert "ERROR" not in text and "does not exist" not in text, text[-3000:]
    assert Job.objects.aggregate(n=Sum("attempts"))["n"] == 100
    on_servers = server_prepared_statements(bouncer)
    assert not [name for name, _ in on_servers if name.startswith("djasync_")], on_servers


class _Rollback(Exception):
    pass


@pytest.mark.parametrize("bouncer", [ON_DEBIAN, ON_BUILT], indirect=True)
def test_scheduling_through_the_pooler_with_the_default_settings(bouncer):
    """The web side: Django's own connection through PgBouncer, its default settings.
    ``schedule_many`` finds out about the pooler on its first statement, in autocommit (the
    probe in a transaction of its own) and inside the caller's transaction (the probe in it:
    it neither commits nor ends it); its jobs are written or rolled back with the caller's."""
    direct = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict.update(HOST="127.0.0.1", PORT=str(bouncer.port))
    try:
        with pytest.raises(_Rollback), transaction.atomic():
            Ledger.objects.create(key="rolled back", note="")
            djasync.schedule_many([djasync.JobSpec(jobs.add, [1, 2])] * 3)  # probe: here
            raise _Rollback
        for _ in range(3):  # autocommit, one INSERT each, on connections made anew
            connection.close()
            djasync.schedule_many([djasync.JobSpec(jobs.add, [2, 3])] * 2)
        connection.close()
        with transaction.atomic():  # the probe inside a transaction that commits
            Ledger.objects.create(key="kept", note="")
            djasync.schedule_many([djasync.JobSpec(jobs.add, [3, 4])] * 2)
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(direct)
    with psycopg.connect(**conninfo(), autocommit=True) as check:
        assert check.execute("SELECT args::text, count(*) FROM djasync_job GROUP BY 1"
                             " ORDER BY 1").fetchall() == [("[2, 3]", 6), ("[3, 4]", 2)]
        assert check.execute(f"SELECT key FROM {Ledger._meta.db_table}").fetchall() == [
            ("kept",)]
    on_servers = server_prepared_statements(bouncer)
    assert not [name for name, _ in on_servers if name.startswith("djasync_")], on_servers
    if carries_prepared(bouncer):  # the INSERT, prepared once per server connection at most
        assert any("INSERT INTO" in text for _, text in on_servers), on_servers
        assert stats(bouncer)["total_client_parse_count"] <= 2 * 5, stats(bouncer)
    else:
        assert on_servers == [], on_servers


_HOLD_A_ROW_LOCK = """
import sys, time
import psycopg
conn = psycopg.connect(sys.argv[1], prepare_threshold=None)
conn.execute("SELECT 1 FROM djasync_job WHERE id = %s FOR NO KEY UPDATE", [int(sys.argv[2])])
print(conn.execute("SELECT pg_backend_pid()").fetchone()[0], flush=True)
time.sleep(600)  # idle in transaction, as a worker's child while its job's code runs
"""


@pytest.mark.parametrize("bouncer", [ON_DEBIAN, ON_BUILT], indirect=True)
def test_a_client_gone_mid_transaction_has_its_row_locks_released_at_once(bouncer):
    """Once PgBouncer gives a client up, a transaction the client left open ends with it:
    PgBouncer cannot hand that server connection to another client, so it closes it, and
    PostgreSQL rolls back. The network recipe (docs/howto/pgbouncer.md) relies on it: the
    time a cut-off host's job stays locked is the time PgBouncer takes to give the host up."""
    job = djasync.schedule(jobs.add, args=[1, 2])
    client = subprocess.Popen([sys.executable, "-c", _HOLD_A_ROW_LOCK, bouncer.url(),
                               str(job.pk)], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        backend = int(client.stdout.readline())
        with psycopg.connect(**conninfo(), autocommit=True) as direct:
            def claimable() -> bool:
                with direct.transaction():
                    return direct.execute("SELECT 1 FROM djasync_job WHERE id = %s FOR NO KEY "
                                          "UPDATE SKIP LOCKED", [job.pk]).fetchone() is not None

            assert not claimable()
            os.kill(client.pid, signal.SIGKILL)  # its kernel closes the socket: PgBouncer sees EOF
            gone = time.monotonic()
            wait_for(claimable, timeout=10, what="the row lock to be released", interval=0.002)
            took = time.monotonic() - gone
            print(f"PgBouncer {pgbouncer.dotted(bouncer.version)}: row lock released "
                  f"{took * 1000:.0f} ms after its client was gone")
            assert took < 1.0
            assert not direct.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                      [backend]).fetchone()  # the server session ended
    finally:
        client.kill()
        client.wait()
        assert client.stdout is not None
        client.stdout.close()
