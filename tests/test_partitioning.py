"""docs/howto/partitioning.md's recipe, run as written against a scratch database of its own:
convert a used djasync_job into a table partitioned by id, run the queue across partitions
(a real daemon, groups, unique jobs, prune_jobs), add a range while a job holds its locks, and
drop an old range."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from tests.daemon import ROOT, run_worker, worker_env

pytestmark = pytest.mark.django_db(transaction=True)

PAGE = ROOT / "docs" / "howto" / "partitioning.md"


def recipe() -> str:
    """The page's SQL, as a user copies it into their migration."""
    (sql,) = re.findall(r"^```postgresql\n(.*?)^```", PAGE.read_text(), re.S | re.M)
    return sql


@pytest.fixture
def scratch(scratch_database: str) -> str:
    """A new database beside the test database, migrated; its URL."""
    manage("migrate", "--no-input", "-v", "0", url=scratch_database)
    return scratch_database


def manage(*args: str, url: str) -> str:
    done = subprocess.run([sys.executable, "-m", "django", *args, "--settings", "tests.settings"],
                          cwd=ROOT, env=worker_env(DATABASE_URL=url), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def schedule(phase: str, url: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.partition_workload", phase], cwd=ROOT,
                          env=worker_env(DATABASE_URL=url), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def drain(url: str) -> None:
    done = run_worker("--burst", "--concurrency", "2", "--batch-size", "3", timeout=120,
                      env=worker_env(DATABASE_URL=url))
    assert done.returncode == 0, done.stdout + done.stderr


def statuses(conn: psycopg.Connection, ids: list[int]) -> dict[int, str]:
    return dict(conn.execute("SELECT id, status FROM djasync_job WHERE id = ANY(%s)",
                             [ids]).fetchall())


def partition_of(conn: psycopg.Connection, job_id: int) -> str:
    return conn.execute("SELECT tableoid::regclass::text FROM djasync_job WHERE id = %s",
                        [job_id]).fetchone()[0]


def test_the_recipe_converts_a_used_table_and_the_queue_runs_across_partitions(scratch):
    before = schedule("before", scratch)
    drain(scratch)
    with psycopg.connect(scratch, autocommit=True) as conn:
        conn.execute("INSERT INTO tests_jobnote (job_id) VALUES (%s)",
                     [before["plain"][0]])
        top_before = conn.execute("SELECT max(id) FROM djasync_job").fetchone()[0]

        with conn.transaction():
            conn.execute(recipe())
        kind = conn.execute("SELECT relkind FROM pg_class WHERE relname = 'djasync_job'"
                            ).fetchone()[0]
        assert kind == "p"
        # Nothing copied or lost; the old rows are the first partition's.
        assert partition_of(conn, before["plain"][0]) == "djasync_job_p0"
        assert statuses(conn, before["plain"]) == {pk: "succeeded" for pk in before["plain"]}
        assert statuses(conn, [before["later"]]) == {before["later"]: "pending"}
        # djasync's index names are the parent's (later migrations refer to them).
        names = {row[0] for row in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'djasync_job'")}
        assert {"djasync_job_pkey", "djasync_job_claim", "djasync_job_claim_queue",
                "djasync_job_finished"} <= names
        # Foreign keys, djasync's and the project's, point at the partitioned table.
        referenced = {row[0] for row in conn.execute(
            "SELECT conrelid::regclass::text FROM pg_constraint"
            " WHERE contype = 'f' AND confrelid = 'djasync_job'::regclass AND conparentid = 0")}
        assert {"djasync_attempt", "djasync_group", "tests_jobnote"} <= referenced

    after = schedule("after", scratch)
    assert min(after["plain"]) > top_before
    with psycopg.connect(scratch, autocommit=True) as conn:
        assert partition_of(conn, after["plain"][0]) != "djasync_job_p0"
        # The unique key dedupes within the partition: the second schedule got the first job.
        assert after["unique"][0] == after["unique"][1]
    drain(scratch)
    with psycopg.connect(scratch, autocommit=True) as conn:
        ran = [*after["plain"], *after["members"], after["final"], after["unique"][0]]
        assert statuses(conn, ran) == {pk: "succeeded" for pk in ran}
        finished = dict(conn.execute(
            "SELECT id, finished_at FROM djasync_job WHERE id = ANY(%s)",
            [[*after["members"], after["final"]]]).fetchall())
        assert finished[after["final"]] >= max(finished[m] for m in after["members"])
        attempts = conn.execute("SELECT count(*) FROM djasync_attempt WHERE job_id = ANY(%s)",
                                [ran]).fetchone()[0]
        assert attempts == len(ran)

    # prune_jobs still deletes row by row on the partitioned table.
    manage("prune_jobs", "--older-than", "0", url=scratch)
    with psycopg.connect(scratch, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM djasync_job WHERE status = 'succeeded'"
                            ).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM djasync_job WHERE status = 'pending'"
                            ).fetchone()[0] == 2  # the two jobs for in 30 days


def test_a_range_is_added_while_a_job_holds_its_rows_and_an_old_range_is_dropped(scratch):
    before = schedule("before", scratch)
    with psycopg.connect(scratch, autocommit=True) as conn:
        with conn.transaction():
            conn.execute(recipe())
        parts = {row[0] for row in conn.execute(
            "SELECT inhrelid::regclass::text FROM pg_inherits"
            " WHERE inhparent = 'djasync_job'::regclass")}
        assert "djasync_job_p0" in parts and len(parts) >= 2

    after = schedule("after", scratch)
    held = threading.Event()
    release = threading.Event()

    def a_running_job() -> None:  # a job's transaction: its row locked, its writes pending
        with psycopg.connect(scratch) as job_conn:
            job_conn.execute("SELECT 1 FROM djasync_job WHERE id = %s FOR UPDATE",
                             [after["plain"][0]])
            job_conn.execute("UPDATE djasync_job SET attempts = attempts WHERE id = %s",
                             [after["plain"][1]])
            held.set()
            release.wait(30)
            job_conn.rollback()

    job = threading.Thread(target=a_running_job)
    job.start()
    try:
        assert held.wait(10)
        with psycopg.connect(scratch, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '5s'")
            started = time.monotonic()
            made = conn.execute("SELECT djasync_job_partitions_ahead(%s)",
                                [3_000_000]).fetchone()[0]
            took = time.monotonic() - started
            # Attached, not created as a partition: that would wait for the job (lock_timeout).
            assert made >= 1 and took < 2.0, (made, took)
            assert conn.execute("SELECT djasync_job_partitions_ahead(%s)",
                                [3_000_000]).fetchone()[0] == 0
    finally:
        release.set()
        job.join(30)

    with psycopg.connect(scratch, autocommit=True) as conn:
        # The old range still holds a pending job (the one for in 30 days): refused.
        with pytest.raises(psycopg.errors.RaiseException, match="still holds pending jobs"):
            conn.execute("SELECT djasync_job_drop_partition('djasync_job_p0')")
        conn.execute("UPDATE djasync_job SET status = 'cancelled', finished_at = now()"
                     " WHERE id = %s", [before["later"]])
    drain(scratch)
    with psycopg.connect(scratch, autocommit=True) as conn:
        old = [*before["plain"], *before["members"], before["final"], before["unique"][0]]
        assert conn.execute("SELECT count(*) FROM djasync_attempt WHERE job_id = ANY(%s)",
                            [old]).fetchone()[0] == len(old)
        dropped = conn.execute("SELECT djasync_job_drop_partition('djasync_job_p0')"
                               ).fetchone()[0]
        assert dropped == len(old) + 1  # and the cancelled one
        assert conn.execute("SELECT count(*) FROM djasync_job WHERE id = ANY(%s)",
                            [old]).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM djasync_attempt WHERE job_id = ANY(%s)",
                            [old]).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM djasync_group WHERE reference = 'g-before'"
                            ).fetchone()[0] == 0
        # The newer jobs and their group are untouched.
        new = [*after["plain"], after["final"]]
        assert set(statuses(conn, new).values()) == {"succeeded"}
        assert conn.execute("SELECT count(*) FROM djasync_group WHERE reference = 'g-after'"
                            ).fetchone()[0] == 1
