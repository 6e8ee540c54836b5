"""The chaos checker's flow-control checks (F1-F3, chaos/checker.py) on crafted runs: each one
finds what it must (an over-run, a start while paused, a full window) and nothing else.

The tables are chaos migrations 0003's and 0004's, made in the test's transaction (rolled back
after).
"""

from __future__ import annotations

import datetime
import importlib

import pytest
from django.db import connection

from chaos import checker

pytestmark = pytest.mark.django_db

T0 = datetime.datetime(2026, 12, 6, 3, 0, tzinfo=datetime.UTC)


@pytest.fixture
def conn():
    with connection.cursor() as cursor:
        for name in ("0003_flow_control", "0004_flow_run_backend"):
            cursor.execute(importlib.import_module(f"chaos.migrations.{name}").TABLES)
    return connection.connection  # the psycopg connection, inside the test's transaction


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def run(conn, tenant: str, started: float, seen: float, *, finished: bool = True,
        queue: str = "default", rated: bool = False, kind: str = "atomic",
        backend: int | None = None) -> int:
    (run_id,) = conn.execute(
        "INSERT INTO chaos_flowrun (job_key, tenant, rated, queue, kind, pid, backend, "
        "started, seen, finished) VALUES (%s, %s, %s, %s, %s, 1, %s, %s, %s, %s) RETURNING id",
        [f"k{started}", tenant, rated, queue, kind, backend, at(started), at(seen),
         at(seen) if finished else None]).fetchone()
    return run_id


def check(conn, pauses=(), **limits):
    violations: list[str] = []
    found = checker.check_flow(conn, list(pauses), violations, **limits)
    return found, violations


def test_three_runs_of_a_key_at_once_are_an_over_run_and_two_are_not(conn):
    run(conn, "tenant:0", 0.0, 1.0)
    run(conn, "tenant:0", 0.5, 1.5)
    run(conn, "tenant:0", 1.0, 2.0)  # starts as the first ends: no overlap
    run(conn, "tenant:1", 0.0, 3.0)
    found, violations = check(conn)
    assert found["max_overlap_by_key"] == {"tenant:0": 2, "tenant:1": 1}
    assert violations == []
    run(conn, "tenant:0", 0.7, 0.8)
    found, violations = check(conn)
    assert found["max_overlap_by_key"]["tenant:0"] == 3
    assert [v[:3] for v in violations] == ["F1:"]
    assert found["over_runs"][0]["key"] == "tenant:0"
    assert len(found["over_runs"][0]["runs_then"]) == 3
    # Checked against the limit the workers enforced, the same runs pass.
    assert check(conn, concurrency=3)[1] == []


def test_a_killed_run_counts_until_its_last_mark_and_no_longer(conn):
    run(conn, "tenant:0", 0.0, 1.0, finished=False)  # killed: last seen at 1.0
    run(conn, "tenant:0", 0.5, 2.0)
    run(conn, "tenant:0", 1.0, 2.0)  # starts at the killed run's last mark: no over-run
    found, violations = check(conn)
    assert found["max_overlap"] == 2 and violations == []
    # Had it run on to its next mark it might have overlapped: reported, not a violation.
    assert found["max_overlap_if_cut_runs_ran_to_their_next_mark"] == 3
    run(conn, "tenant:0", 0.9, 1.2)  # while the killed run was still seen running
    found, violations = check(conn)
    assert found["max_overlap"] == 3 and [v[:3] for v in violations] == ["F1:"]


def test_a_run_whose_session_the_chaos_ended_counts_until_that_end_not_its_last_mark(conn):
    """Seed 1001: pg_terminate_backend ended a job's session (its slot free at once); its
    child ran on 4 ms, until its supervisor killed it, and marked meanwhile; another run of the
    key started in between. The slot was free: no over-run."""
    run(conn, "tenant:0", 0.0, 3.0)
    run(conn, "tenant:0", 0.0, 1.0045, finished=False, backend=77)  # its session: 1.001
    run(conn, "tenant:0", 1.003, 2.0)
    conn.execute("INSERT INTO chaos_sessionend VALUES (77, %s), (78, %s)", [at(1.001), at(0.9)])
    found, violations = check(conn)
    assert found["max_overlap"] == 2 and violations == []
    assert found["runs_ended_with_their_session"] == 1
    # Not for a run that finished, nor a session end of another backend or before the run.
    run(conn, "tenant:1", 0.0, 3.0)
    run(conn, "tenant:1", 0.0, 1.5, backend=77)  # finished: its end is its own
    run(conn, "tenant:1", 1.0, 2.0, finished=False, backend=78)  # 78 ended before it started
    found, violations = check(conn)
    assert found["max_overlap_by_key"]["tenant:1"] == 3 and [v[:3] for v in violations] == ["F1:"]
    assert found["runs_ended_with_their_session"] == 1


def test_a_run_of_the_paused_queue_may_start_within_the_grace_and_not_after(conn):
    pause = (at(10), at(20))
    run(conn, "tenant:0", 10.9, 11.0, queue="flow")  # within 1 s of the pause
    run(conn, "tenant:1", 15.0, 15.1, queue="default")  # another queue
    run(conn, "tenant:2", 20.0, 20.1, queue="flow")  # at the resume
    found, violations = check(conn, [pause])
    assert violations == []
    assert found["pauses"][0]["last_start_after_pause_s"] == 0.9
    assert found["pauses"][0]["first_start_after_resume_s"] == 0.0
    run(conn, "tenant:3", 11.2, 11.3, queue="flow")
    found, violations = check(conn, [pause])
    assert [v[:3] for v in violations] == ["F2:"]
    assert found["pauses"][0]["started_while_paused"][0][0] == "k11.2"


def stamp(conn, seconds: float, xid: int = 1, key: str = "api") -> None:
    conn.execute("INSERT INTO chaos_tokenlog (key, slot, used_at, xid) VALUES (%s, 0, %s, %s)",
                 [key, at(seconds), xid])


def test_no_window_of_the_rate_holds_more_than_n_stamps(conn):
    rate = checker.FLOW_RATE
    for n in range(rate):
        stamp(conn, n * 0.01)
    stamp(conn, 1.0)  # a window is [stamp, stamp + 1 s): this one opens the next
    stamp(conn, 0.5, key="other")
    found, violations = check(conn)
    assert found["rate"]["max_in_a_window"] == rate and violations == []
    stamp(conn, 0.999)
    found, violations = check(conn)
    assert found["rate"]["max_in_a_window"] == rate + 1
    assert [v[:3] for v in violations] == ["F3:"]
    assert check(conn, burst=1)[1] == []


def test_every_committed_rated_run_has_a_stamp_of_its_claim(conn):
    first = run(conn, "tenant:0", 0.0, 0.1, rated=True)
    second = run(conn, "tenant:1", 0.0, 0.1, rated=True)
    unrated = run(conn, "tenant:2", 0.0, 0.1)
    stamp(conn, 0.0, xid=7)
    for run_id, xid in ((first, 7), (unrated, 8)):
        conn.execute("INSERT INTO chaos_flowcommit (run_id, xid) VALUES (%s, %s)",
                     [run_id, xid])
    assert check(conn)[1] == []
    # A batch of two rated runs whose claim stamped one token.
    conn.execute("INSERT INTO chaos_flowcommit (run_id, xid) VALUES (%s, 7)", [second])
    found, violations = check(conn)
    assert [v[:3] for v in violations] == ["F3:"]
    assert found["rate"]["committed_runs_without_token"] == [[7, 2, 1]]
