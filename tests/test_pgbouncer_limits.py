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
#: Without LISTEN_URL the slots' transactions pin server connections of the pool (one per
#: running long job with keys: here at most 2), and the jobs' own statements need more.
POOL_SIZE_PINNED = 4

#: (PgBouncer, where the slots of a long job are held behind it): "direct" through
#: DJASYNC["LISTEN_URL"], "pooled" without it (a transaction through the pooler).
DEBIAN_DIRECT = pytest.param(("debian", "direct"), id="pgbouncer-debian-LISTEN_URL",
                             marks=ON_DEBIAN.marks)
DEBIAN_POOLED = pytest.param(("debian", "pooled"), id="pgbouncer-debian-no-LISTEN_URL",
                             marks=ON_DEBIAN.marks)
BUILT_DIRECT = pytest.param(("built", "direct"), id=f"{ON_BUILT.id}-LISTEN_URL",
                            marks=ON_BUILT.marks)
BUILT_POOLED = pytest.param(("built", "pooled"), id=f"{ON_BUILT.id}-no-LISTEN_URL",
                            marks=ON_BUILT.marks)


@pytest.fixture
def bouncer(request: pytest.FixtureRequest, tmp_path: Path, transactional_db: None):
    which, slots = request.param
    program = DEBIAN if which == "debian" else BUILT
    if program is None:
        pytest.skip(_NO_DEBIAN if which == "debian" else _NO_BUILT)
    started = pgbouncer.start(tmp_path / "pgbouncer", conninfo(), program=program,
                              pool_size=POOL_SIZE if slots == "direct" else POOL_SIZE_PINNED)
    started.slots = slots  # type: ignore[attr-defined]
    yield started
    started.stop()


@pytest.fixture
def env(tmp_path, bouncer):
    """The worker's environment: its database through ``bouncer``, LISTEN straight to
    PostgreSQL (or not at all: then the slots are held through the pooler), the LIMITS above;
    the table the jobs record their runs in."""
    listen_url = database_url() if bouncer.slots == "direct" else None
    (tmp_path / "pooled_limits.py").write_text(
        "from tests.settings import *  # noqa\n"
        f"DJASYNC = {{**DJASYNC, 'LIMITS': {LIMITS!r}, 'LISTEN_URL': {listen_url!r}}}\n")
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


@pytest.mark.parametrize("bouncer", [DEBIAN_DIRECT, DEBIAN_POOLED, BUILT_DIRECT, BUILT_POOLED],
                         indirect=True)
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
    # Without LISTEN_URL the worker says that each such job pins a server connection.
    assert ("pins one of its server connections" in text) == (bouncer.slots == "pooled")


@pytest.mark.parametrize("bouncer", [DEBIAN_DIRECT, DEBIAN_POOLED], indirect=True)
def test_a_long_job_killed_through_pgbouncer_frees_its_slot_and_runs_again(tmp_path, bouncer,
                                                                            env):
    """kill -9 of the child that runs a long job holding a key: the slot is free again at
    once (not left on a pooled server session): the waiting job runs, and the killed one is
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
        # Its next run is short (the one running is not changed by this), and it may win the
        # slot from the waiting job (it has the priority): either way both run at once.
        Job.objects.filter(pk=victim.pk).update(args=["solo", 0.2])
        pidfile.unlink()
        os.kill(int(child), signal.SIGKILL)
        wait_for(all_done([victim.pk, waiting.pk]), timeout=20,
                 what="both jobs to run once the killed one's slot is free",
                 why=lambda: f"held={held_slots()}")
        wait_for(lambda: not held_slots(), timeout=5, what="no slot held after the runs")
    finally:
        assert stop(daemon) == 0
    assert max_overlap() == {"solo": 1}
    victim.refresh_from_db()
    assert [a.outcome for a in victim.attempt_set.all()] == ["crashed", "succeeded"]


@pytest.mark.parametrize("bouncer", [DEBIAN_DIRECT, DEBIAN_POOLED], indirect=True)
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
        with psycopg.connect(**conninfo(), autocommit=True) as direct:
            detail = direct.execute(
                "SELECT l.pid, l.mode, l.classid, l.objid, a.state, a.query FROM pg_locks l"
                " JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory'"
                " AND l.objsubid = 2").fetchall()
        assert len(holders) == 1, (holders, detail)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [holders[0][0]])
        wait_for(all_done(ids), timeout=120, what="every job to succeed")
    finally:
        assert stop(daemon) == 0
    assert max_overlap() == {"solo": 1}
    victim.refresh_from_db()
    assert [a.outcome for a in victim.attempt_set.all()] == ["crashed", "succeeded"]
