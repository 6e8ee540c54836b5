"""Flow-control limits on long jobs (``meta={"atomic": False}``) through PgBouncer in
transaction mode.

Straight to PostgreSQL a long job holds its keys' slots with session-level advisory locks on
its own connection. Through a pooler in transaction mode the session is whichever server
connection PgBouncer lent for that statement: the lock stayed there, went back to the pool,
and the release ran elsewhere (freeing nothing there, or another job's slots). So a pooled
worker holds them in a transaction of their own, on a connection of their own, for the job's
run (see ``djasync.limits``). Runs are recorded with clock_timestamp() by the jobs
(``jobs.flow_outside``) and checked for overlap; no slot may stay held after the runs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psycopg
import pytest
from django.db import connection
from django.test import override_settings

import djasync
from djasync.models import Job, Status
from tests import jobs, pgbouncer
from tests.conftest import conninfo
from tests.daemon import ROOT, database_url, start_worker, stop, wait_for, worker_env
from tests.settings import DJASYNC
from tests.test_limits_daemon import all_done, max_overlap
from tests.test_pgbouncer import _NO_BUILT, _NO_DEBIAN, BUILT, DEBIAN, ON_BUILT, ON_DEBIAN

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.daemon]

LIMITS = {"solo": {"concurrency": 1}, "other": {"concurrency": 1}}
#: Fewer server connections than the worker's children and its other clients: they share.
POOL_SIZE = 2


@pytest.fixture
def bouncer(request: pytest.FixtureRequest, tmp_path: Path, transactional_db: None):
    which = getattr(request, "param", "debian")
    program = DEBIAN if which == "debian" else BUILT
    if program is None:
        pytest.skip(_NO_DEBIAN if which == "debian" else _NO_BUILT)
    started = pgbouncer.start(tmp_path / "pgbouncer", conninfo(), pool_size=POOL_SIZE,
                              program=program)
    yield started
    started.stop()


@pytest.fixture
def env(tmp_path, bouncer):
    """The worker's environment: its database through ``bouncer``, LISTEN straight to
    PostgreSQL, the LIMITS above; the table the jobs record their runs in."""
    (tmp_path / "pooled_limits.py").write_text(
        "from tests.settings import *  # noqa\n"
        f"DJASYNC = {{**DJASYNC, 'LIMITS': {LIMITS!r}, 'LISTEN_URL': {database_url()!r}}}\n")
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {jobs.FLOW_RUNS} (key text, started "
                       "timestamptz, finished timestamptz, pid integer)")
        cursor.execute(f"TRUNCATE {jobs.FLOW_RUNS}")
    with override_settings(DJASYNC={**DJASYNC, "LIMITS": LIMITS}):
        yield worker_env(DATABASE_URL=bouncer.url(), PYTHONPATH=f"{tmp_path}:{ROOT}")


def start(tmp_path, env, *args, name="w"):
    return start_worker("--settings", "pooled_limits", *args, log=tmp_path / f"{name}.log",
                        env=env)


def done(ids) -> int:
    return Job.objects.filter(pk__in=ids, status=Status.SUCCEEDED).count()


def held_slots() -> list[tuple[int, str, str | None]]:
    """(pid, state, transaction start) of each server session holding a slot of a key now."""
    with psycopg.connect(**conninfo(), autocommit=True) as direct:
        return direct.execute(
            "SELECT l.pid, a.state, a.xact_start::text FROM pg_locks l"
            "  JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted"
            "   AND l.classid::bigint IN (SELECT (hashtext('djasync.limit:' || k)::bigint"
            "                                     + 4294967296) %% 4294967296"
            "                               FROM unnest(%s::text[]) k)",
            [list(LIMITS)]).fetchall()


@pytest.mark.parametrize("bouncer", [ON_DEBIAN, ON_BUILT], indirect=True)
def test_long_jobs_with_limits_through_pgbouncer_never_overrun_and_leave_no_slot_held(
        tmp_path, bouncer, env):
    """Two keys of concurrency 1, long jobs of each, three children sharing two server
    connections: no moment has two runs of a key, every job runs, and once they are done no
    server session of the pool holds a slot."""
    ids = [djasync.schedule(jobs.flow_outside, [key, 0.3], limits=[key],
                            meta={"atomic": False}).pk
           for _ in range(4) for key in ("solo", "other")]
    daemon = start(tmp_path, env, "--concurrency", "3", "--poll-interval", "0.2")
    try:
        wait_for(all_done(ids), timeout=60, what="every job to succeed",
                 why=lambda: f"done={done(ids)} overlap={max_overlap()} held={held_slots()}")
        # Given back with each job's end (at most the last one's end is still on its way).
        wait_for(lambda: not held_slots(), timeout=5, what="no slot held after the runs")
    finally:
        assert stop(daemon) == 0, (tmp_path / "w.log").read_text()[-3000:]
    assert max_overlap() == {"other": 1, "solo": 1}
    text = (tmp_path / "w.log").read_text()
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("bouncer", [ON_DEBIAN], indirect=True)
def test_a_long_job_killed_through_pgbouncer_frees_its_slot_and_runs_again(tmp_path, bouncer,
                                                                            env):
    """kill -9 of the child that runs a long job holding a key: the slot is free again at
    once (not left on a pooled server session), the waiting job runs, the killed one is
    charged and runs again."""
    pidfile = tmp_path / "pid"
    victim = djasync.schedule(jobs.flow_outside, ["solo", 30, str(pidfile)], limits=["solo"],
                              meta={"atomic": False, "max_attempts": 2}, priority=10)
    daemon = start(tmp_path, env, "--concurrency", "2", "--poll-interval", "0.2")
    try:
        _, child = wait_for(lambda: pidfile.exists() and pidfile.read_text().split(),
                            timeout=60, what="the long job's start")
        waiting = djasync.schedule(jobs.flow_outside, ["solo", 0.2], limits=["solo"],
                                   meta={"atomic": False})
        time.sleep(0.5)  # solo is full: it waits
        assert Job.objects.get(pk=waiting.pk).status == Status.PENDING
        pidfile.unlink()
        os.kill(int(child), signal.SIGKILL)
        wait_for(lambda: Job.objects.filter(pk=waiting.pk, status=Status.SUCCEEDED).exists(),
                 timeout=20, what="the waiting job to run once the slot is free")
        Job.objects.filter(pk=victim.pk).update(args=["solo", 0.2])
        wait_for(all_done([victim.pk, waiting.pk]), timeout=60, what="the victim to run again")
        wait_for(lambda: not held_slots(), timeout=5, what="no slot held after the runs")
    finally:
        assert stop(daemon) == 0
    assert max_overlap() == {"solo": 1}
    victim.refresh_from_db()
    assert [a.outcome for a in victim.attempt_set.all()] == ["crashed", "succeeded"]


@pytest.mark.parametrize("bouncer", [ON_DEBIAN], indirect=True)
def test_a_long_job_whose_slot_session_postgresql_ends_through_pgbouncer_is_stopped(
        tmp_path, bouncer, env):
    """PostgreSQL ends the server session holding a long job's slot (an operator's
    pg_terminate_backend): the slot is free then, so the job must stop (the supervisor's
    fence), as straight to PostgreSQL, rather than run on beside the next holder."""
    pidfile = tmp_path / "pid"
    victim = djasync.schedule(jobs.flow_outside, ["solo", 3, str(pidfile)], limits=["solo"],
                              meta={"atomic": False})
    daemon = start(tmp_path, env, "--concurrency", "3", "--poll-interval", "0.2")
    try:
        wait_for(lambda: pidfile.exists(), timeout=60, what="the long job's start")
        ids = [victim.pk] + [djasync.schedule(jobs.flow_outside, ["solo", 0.3],
                                              limits=["solo"], meta=meta).pk
                             for meta in ({"atomic": False}, {}, {"atomic": False})]
        time.sleep(0.3)  # they wait: solo is full
        holders = held_slots()
        assert len(holders) == 1, holders
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [holders[0][0]])
        wait_for(all_done(ids), timeout=120, what="every job to succeed")
    finally:
        assert stop(daemon) == 0
    assert max_overlap() == {"solo": 1}
    victim.refresh_from_db()
    assert [a.outcome for a in victim.attempt_set.all()] == ["crashed", "succeeded"]
