"""The daemon survives restarts of its PostgreSQL server (a throwaway embedded one)."""

import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest

import pg
from tests.daemon import ROOT, start_worker, stop, wait_for, worker_env

pytestmark = pytest.mark.daemon

INSERT_JOB = """
INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, status, attempts,
                         identity, created_at, worker)
VALUES ('tests.jobs.write_ledger', %s, '{}', '{}', 'default', 0, now(), 'pending', 0, '', now(),
        '')
"""


@pytest.fixture(scope="module")
def server() -> Iterator[pg.EmbeddedPostgres]:
    with pg.EmbeddedPostgres() as server:
        subprocess.run(
            [sys.executable, "-m", "django", "migrate", "--settings", "tests.settings", "-v0"],
            cwd=ROOT, env=worker_env(DATABASE_URL=server.url), check=True, timeout=120,
        )
        yield server


def schedule(server: pg.EmbeddedPostgres, key: str) -> None:
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(INSERT_JOB, [psycopg.types.json.Jsonb([key])])
        conn.execute("NOTIFY djasync, 'default'")


def ledger(server: pg.EmbeddedPostgres) -> dict[str, int]:
    try:
        with psycopg.connect(server.url, autocommit=True, connect_timeout=2) as conn:
            rows = conn.execute("SELECT key, count(*) FROM tests_ledger GROUP BY key").fetchall()
    except psycopg.OperationalError:
        return {}
    return dict(rows)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_the_daemon_resumes_work_after_a_postgresql_restart(server, tmp_path, mode):
    log = tmp_path / "w.log"
    daemon = start_worker("--concurrency", "2", "--poll-interval", "0.5", log=log,
                          env=worker_env(DATABASE_URL=server.url))
    try:
        schedule(server, f"before-{mode}")
        wait_for(lambda: ledger(server).get(f"before-{mode}") == 1, what="the first job")
        server.restart(mode=mode)
        schedule(server, f"after-{mode}")
        wait_for(lambda: ledger(server).get(f"after-{mode}") == 1, timeout=60,
                 what=f"a job after a {mode} restart")
        assert daemon.poll() is None, log.read_text()[-3000:]
        counts = ledger(server)
        assert counts[f"before-{mode}"] == 1 and counts[f"after-{mode}"] == 1
    finally:
        assert stop(daemon) == 0, log.read_text()[-3000:]
