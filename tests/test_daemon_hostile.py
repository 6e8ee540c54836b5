"""Through the real daemon: rows written by hand with hostile contents, and a crash whose
database session someone else ended before the supervisor could count it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psycopg
import pytest

import djasync
from djasync.attempts import LATE_NOTE
from djasync.models import Attempt, Job, Outcome, Status
from tests import jobs
from tests.daemon import run_worker, start_worker, stop, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.daemon]

INSERT_ROW = """
INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, status, attempts,
                         identity, created_at, worker)
VALUES (%s, %s::jsonb, '{}', %s::jsonb, 'default', 10, now(), 'pending', %s, '', now(), '')
RETURNING id
"""

BIG_ARRAY = json.dumps(list(range(1_000_000)))  # ~7 MB of JSON
HUGE_INT = "1" + "0" * 5000  # jsonb keeps it; Python refuses to parse over 4,300 digits
DEEP = "[" * 12_000 + "]" * 12_000  # jsonb keeps it; Python's parser runs out of recursion

#: (function, args JSON, meta JSON, attempts column, expected status, reason in the attempt)
HOSTILE = {
    "huge args, the job runs": ("tests.jobs.count_args", BIG_ARRAY, "{}", 0,
                                Status.SUCCEEDED, ""),
    "huge args, wrong arity": ("tests.jobs.add", BIG_ARRAY, '{"max_attempts": 1}', 0,
                               Status.FAILED, "takes 2 positional arguments but 1000000"),
    "args with a 5,001-digit integer": ("tests.jobs.echo", f"[{HUGE_INT}]", "{}", 0,
                                        Status.FAILED, "args cannot be read: ValueError"),
    "args nested 12,000 deep": ("tests.jobs.echo", DEEP, "{}", 0,
                                Status.FAILED, "args cannot be read: RecursionError"),
    "malformed args (an object)": ("tests.jobs.echo", '{"a": 1}', "{}", 0,
                                   Status.FAILED, "args must be a JSON array"),
    "meta a 5,001-digit integer": ("tests.jobs.echo", "[]", f'{{"max_attempts": {HUGE_INT}}}',
                                   0, Status.FAILED, "meta cannot be read: ValueError"),
    "meta not an object": ("tests.jobs.echo", "[]", "[1]", 0,
                           Status.FAILED, "meta must be a dict"),
    "unknown function": ("tests.jobs.no_such_function", "[]", "{}", 0, Status.FAILED, "no_such"),
    "os.system": ("os.system", '["touch /tmp/djasync-pwned"]', "{}", 0,
                  Status.FAILED, "not in an allowed module"),
    "subprocess.run": ("subprocess.run", '[["true"]]', "{}", 0,
                       Status.FAILED, "not in an allowed module"),
    "builtins.eval": ("builtins.eval", '["1"]', "{}", 0, Status.FAILED, "not in an allowed module"),
    # A hand-written attempts column is not trusted: attempts are counted from attempt rows.
    "absurd attempts column": ("tests.jobs.echo", "[]", '{"max_attempts": 3}', 2_147_483_647,
                               Status.SUCCEEDED, ""),
    **{f"max_attempts {shown}": ("tests.jobs.echo", "[]", f'{{"max_attempts": {value}}}', 0,
                                 Status.FAILED, "meta['max_attempts'] must be an integer 1..1000")
       for shown, value in [("negative", "-1"), ("zero", "0"), ("a fraction", "1.5"),
                            ("a string", '"3"'), ("null", "null"), ("absurd", "1e30"),
                            ("1e400", "1e400"), ("true", "true")]},
    "timeout 1e400": ("tests.jobs.echo", "[]", '{"timeout": 1e400}', 0,
                      Status.FAILED, "meta['timeout'] must be a number of seconds"),
    "timeout negative": ("tests.jobs.echo", "[]", '{"timeout": -5}', 0,
                         Status.FAILED, "meta['timeout'] must be a number of seconds"),
}


def test_hand_written_hostile_rows_are_failed_with_their_reason_and_the_worker_serves_on(
        other_connection):
    ids = {}
    for label, (name, args, meta, attempts, _, _) in HOSTILE.items():
        (ids[label],) = other_connection.execute(INSERT_ROW, [name, args, meta, attempts]
                                                 ).fetchone()
    # A negative attempts column is refused where it is written.
    with pytest.raises(psycopg.errors.CheckViolation):
        other_connection.execute(INSERT_ROW, ["tests.jobs.echo", "[]", "{}", -1])
    after = djasync.schedule(jobs.write_ledger, args=["after"], priority=-10)

    result = run_worker("--concurrency", "1", "--burst", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not os.path.exists("/tmp/djasync-pwned")
    for label, (_, _, _, _, status, reason) in HOSTILE.items():
        job = Job.objects.only("status").get(pk=ids[label])
        messages = list(Attempt.objects.filter(job_id=ids[label])
                        .values_list("exception_message", flat=True))
        assert job.status == status, (label, messages)
        assert len(messages) == 1, (label, messages)
        assert reason in messages[0], (label, messages)
    assert Job.objects.only("result").get(pk=ids["huge args, the job runs"]).result == 1_000_000
    assert Job.objects.only("attempts").get(pk=ids["absurd attempts column"]).attempts == 1
    after.refresh_from_db()
    assert after.status == Status.SUCCEEDED  # the worker kept serving


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_crash_counted_after_its_session_was_ended_is_still_recorded_and_marked_late(
        tmp_path, other_connection):
    """The one way a poison job runs more than max_attempts: its dead child's session (which
    the supervisor keeps open until the crash is written, holding the job's lock) is ended by
    someone else first. The job runs again; the crash is still written, marked late."""
    runs = tmp_path / "runs"
    job = djasync.schedule(jobs.stop_parent_then_die, args=[str(runs)],
                           meta={"max_attempts": 1})
    first = start_worker("--concurrency", "1", "--poll-interval", "0.2", log=tmp_path / "a.log")
    second = None
    try:
        wait_for(lambda: _state(first.pid) == "T", what="the job to freeze its supervisor")
        # Its dead child's session still holds the job: end it, as pg_terminate_backend or a
        # restart of PostgreSQL would.
        # (Held for over a second: the daemon's database agent is idle in a transaction of its
        # own for an instant between its statements.)
        held = wait_for(lambda: other_connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'idle in transaction'"
            " AND state_change < clock_timestamp() - interval '1 second'").fetchall(),
            what="the held session")
        assert len(held) == 1, held
        other_connection.execute("SELECT pg_terminate_backend(%s)", [held[0][0]])
        # Another daemon takes the job, uncounted so far: it runs again, dies, is counted, and
        # its next claim fails the job (max_attempts 1).
        second = start_worker("--concurrency", "1", "--poll-interval", "0.2",
                              log=tmp_path / "b.log")
        wait_for(lambda: Job.objects.get(pk=job.pk).status == Status.FAILED, timeout=30,
                 what="the second daemon to fail the job")
        os.kill(first.pid, signal.SIGCONT)
        wait_for(lambda: Attempt.objects.filter(job=job).count() == 2, timeout=20,
                 what="the first crash to be written, late")
        pids = runs.read_text().split()
        attempts = list(job.attempt_set.order_by("id").values_list(
            "outcome", "worker", "exception_message"))
        assert len(pids) == 2  # it ran twice, and both runs are recorded
        assert [a[0] for a in attempts] == [Outcome.CRASHED] * 2
        late = [a for a in attempts if LATE_NOTE in a[2]]
        assert len(late) == 1 and late[0][1].endswith(f":{pids[0]}"), attempts
        # Both daemons serve on.
        after = djasync.schedule(jobs.write_ledger, args=["after"])
        wait_for(lambda: Job.objects.get(pk=after.pk).status == Status.SUCCEEDED, what="after")
    finally:
        with_code = []
        for daemon in (first, second):
            if daemon is not None:
                os.kill(daemon.pid, signal.SIGCONT)
                with_code.append(stop(daemon))
    assert with_code == [0, 0], [(tmp_path / n).read_text()[-2000:] for n in ("a.log", "b.log")]


def test_a_job_that_calls_sys_exit_fails_within_its_attempts_and_the_worker_goes_on():
    """sys.exit() (SystemExit) inside a job used to end the child with no crash counted (its
    current job was cleared on the way out), so the job ran again and again, for ever."""
    exiting = djasync.schedule(jobs.exit_process_politely, args=["x"],
                               meta={"max_attempts": 2, "backoff": 0})
    after = djasync.schedule(jobs.add, args=[1, 2])
    result = run_worker("--concurrency", "1", "--burst")
    assert result.returncode == 0, result.stderr
    exiting.refresh_from_db()
    assert exiting.status == Status.FAILED
    assert list(Attempt.objects.filter(job=exiting).values_list("outcome", "exception_type")) == [
        (Outcome.ERROR, "builtins.SystemExit")] * 2
    assert Job.objects.get(pk=after.pk).status == Status.SUCCEEDED
    assert "child died" not in result.stderr
