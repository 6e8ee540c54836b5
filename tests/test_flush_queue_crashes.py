"""flush_queue has no supervisor: a job that kills its process is charged by the next run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from djasync import schedule
from djasync.models import Attempt, Job, Outcome, Status, Worker
from djasync.workers import IN_PROCESS_PREFIX, charge_dead_in_process_runs
from tests.daemon import ROOT, wait_for, worker_env
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)


def flush_queue(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "django", "flush_queue", "--settings", "tests.settings",
               *args]
    return subprocess.run(command, cwd=ROOT, env=worker_env(), capture_output=True, text=True,
                          timeout=60)


def test_a_job_that_kills_flush_queue_is_charged_a_crash_and_stops_blocking_later_runs():
    poison = schedule("tests.jobs.kill_self", ["poison"], meta={"max_attempts": 2}, priority=9)
    innocent = schedule("tests.jobs.write_ledger", ["innocent"])

    outcomes = [flush_queue().returncode for _ in range(2)]
    assert outcomes == [-9, -9]  # each run died on the poison job, before the innocent one
    assert not Ledger.objects.filter(key="innocent").exists()

    third = flush_queue()  # charges the second crash, refuses the poison job, runs the rest
    assert "1 jobs failed for good" in third.stderr, third.stderr
    poison.refresh_from_db()
    innocent.refresh_from_db()
    assert poison.status == Status.FAILED
    crashes = Attempt.objects.filter(job=poison, outcome=Outcome.CRASHED)
    assert crashes.count() == 2
    assert all(a.worker.startswith(IN_PROCESS_PREFIX) for a in crashes)
    assert innocent.status == Status.SUCCEEDED
    assert Ledger.objects.filter(key="poison").count() == 0  # rolled back each time
    assert Ledger.objects.filter(key="innocent").count() == 1


def test_a_flush_queue_run_that_ends_normally_charges_nothing_and_is_marked_stopped():
    job = schedule("tests.jobs.write_ledger", ["fine"])
    assert flush_queue().returncode == 0
    job.refresh_from_db()
    assert job.status == Status.SUCCEEDED
    assert list(job.attempt_set.values_list("outcome", flat=True)) == [Outcome.SUCCEEDED]
    run = Worker.objects.get(name__startswith=IN_PROCESS_PREFIX)
    assert run.stopped_at is not None and run.running == [] and run.jobs_done == 1
    assert charge_dead_in_process_runs() == 0


def test_a_live_flush_queue_run_is_not_charged_by_a_sweep(other_connection):
    """A registration counts as dead only once its session is gone, however old last_seen is."""
    job = schedule("tests.jobs.sleep", [30])
    process = subprocess.Popen(
        [sys.executable, "-m", "django", "flush_queue", "--settings", "tests.settings"],
        cwd=ROOT, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: Worker.objects.filter(name__startswith=IN_PROCESS_PREFIX,
                                               running=[job.pk]).exists(),
                 what="flush_queue to say it runs the job")
        other_connection.execute("UPDATE djasync_worker SET last_seen = now() - interval '1 day'")
        assert charge_dead_in_process_runs() == 0
        assert not Attempt.objects.filter(job=job).exists()
        process.kill()
        process.wait(10)
        # Its session ends with it (PostgreSQL notices the closed socket at once).
        wait_for(lambda: charge_dead_in_process_runs() == 1, what="the crash to be charged")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    attempt = Attempt.objects.get(job=job)
    assert attempt.outcome == Outcome.CRASHED
    assert Job.objects.get(pk=job.pk).status == Status.PENDING
