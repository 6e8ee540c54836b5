"""Long jobs (meta atomic=False): outside any transaction, under a renewed and fenced lease."""

import os
import signal

import pytest

import djasync
from djasync import executor
from djasync.models import Job, Outcome, Status
from tests import jobs
from tests.daemon import short_lease_env, start_worker, stop, wait_for
from tests.models import Ledger

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.daemon]


def test_a_non_atomic_job_commits_its_writes_as_it_goes_and_then_succeeds(tmp_path,
                                                                          other_connection):
    gate = tmp_path / "gate"
    job = djasync.schedule(jobs.long_job, args=["long", str(gate)], meta={"atomic": False})
    daemon = start_worker("--concurrency", "1", log=tmp_path / "w.log")
    try:
        # Its write is visible to another connection while it still runs: no transaction.
        wait_for(lambda: other_connection.execute(
            "SELECT count(*) FROM tests_ledger WHERE key = 'long'").fetchone()[0] == 1,
            what="the running job's committed write")
        row = other_connection.execute(
            "SELECT status, lease_owner <> '', lease_expires > now() FROM djasync_job "
            "WHERE id = %s", [job.pk]).fetchone()
        assert row == ("pending", True, True)
        gate.touch()
        wait_for(lambda: Job.objects.get(pk=job.pk).status == Status.SUCCEEDED, what="success")
        job.refresh_from_db()
        assert (job.lease_owner, job.lease_expires, job.attempts) == ("", None, 1)
    finally:
        assert stop(daemon) == 0


def test_kill_9_of_its_child_records_a_crash_and_frees_the_job_at_once(tmp_path):
    gate, pidfile = tmp_path / "gate", tmp_path / "pid"
    job = djasync.schedule(jobs.long_job, args=["k", str(gate), str(pidfile)],
                           meta={"atomic": False})
    daemon = start_worker("--concurrency", "1", log=tmp_path / "w.log")
    try:
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="start"))
        pidfile.unlink()
        gate.touch()  # the re-run will finish at once
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: Job.objects.get(pk=job.pk).status == Status.SUCCEEDED, timeout=30,
                 what="the re-run")
        assert list(job.attempt_set.values_list("outcome", flat=True)) == [
            Outcome.CRASHED, Outcome.SUCCEEDED]
        # At-least-once: the first run's committed write stays, the re-run adds its own.
        assert sorted(Ledger.objects.values_list("note", flat=True)) == ["attempt 1",
                                                                          "attempt 2"]
    finally:
        assert stop(daemon) == 0


def test_a_frozen_worker_loses_its_lease_and_cannot_complete_the_rerun_job(tmp_path):
    gate, pidfile = tmp_path / "gate", tmp_path / "pid"
    job = djasync.schedule(jobs.long_job, args=["frozen", str(gate), str(pidfile)],
                           meta={"atomic": False})
    env = short_lease_env(tmp_path)
    first = start_worker("--concurrency", "1", "--settings", "lease_settings",
                         log=tmp_path / "w1.log", env=env)
    second = None
    try:
        frozen_pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(),
                                  what="the first run"))
        os.kill(frozen_pid, signal.SIGSTOP)  # lease renewals stop with it
        pidfile.unlink()
        second = start_worker("--concurrency", "1", "--settings", "lease_settings",
                              "--poll-interval", "0.3", log=tmp_path / "w2.log", env=env)
        rerun_pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), timeout=30,
                                 what="the re-run after the lease expired"))
        assert rerun_pid != frozen_pid
        gate.touch()
        wait_for(lambda: Job.objects.get(pk=job.pk).status == Status.SUCCEEDED, what="success")
        os.kill(frozen_pid, signal.SIGCONT)  # wakes, finishes, and is fenced off
        wait_for(lambda: "outcome discarded" in (tmp_path / "w1.log").read_text(),
                 what="the late finisher to be fenced")
        job.refresh_from_db()
        assert job.result == rerun_pid
        outcomes = list(job.attempt_set.values_list("outcome", flat=True))
        assert outcomes == [Outcome.CRASHED, Outcome.SUCCEEDED]
        assert "lease expired" in job.attempt_set.first().exception_message
    finally:
        os.kill(frozen_pid, signal.SIGCONT) if first.poll() is None else None
        for daemon in (first, second):
            if daemon is not None:
                assert stop(daemon) == 0


def test_flush_queue_runs_a_non_atomic_job_in_process_too():
    job = djasync.schedule(jobs.long_job, args=["inline"], meta={"atomic": False})
    [finished] = executor.drain()
    assert (finished.outcome, Job.objects.get(pk=job.pk).status) == (
        Outcome.SUCCEEDED, Status.SUCCEEDED)
