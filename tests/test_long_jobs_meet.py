"""Long jobs (meta atomic=False) where they meet batches, cancels, ``job()`` and shutdowns."""

import os
import signal
import time
from contextlib import contextmanager
from datetime import timedelta

import psycopg
import pytest
from django.db import connection, transaction
from django.utils import timezone

import djasync
from djasync import scheduling
from djasync.exceptions import DjasyncError
from djasync.models import Attempt, Job, Outcome, Status
from djasync.testing import run_jobs
from tests import jobs
from tests.daemon import short_lease_env, start_worker, stop, wait_for, worker_env
from tests.models import Ledger

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.daemon]


def ledger(key):
    return Ledger.objects.filter(key=key).count()


def skipped(log, job_id):
    """Whether the worker logged that it skipped this long job (it may no longer run)."""
    text = log.read_text() if log.exists() else ""
    return any("long job skipped" in line and f"id={job_id} " in line
               for line in text.splitlines())


def test_a_long_job_waiting_its_turn_in_a_batch_runs_once_when_another_worker_takes_it(
        tmp_path):
    gate1, pidfile = tmp_path / "gate1", tmp_path / "pid"
    first = djasync.schedule(jobs.long_job, args=["first", str(gate1), str(pidfile)],
                             meta={"atomic": False}, priority=1)
    second = djasync.schedule(jobs.long_job, args=["second"], meta={"atomic": False})
    env = short_lease_env(tmp_path)
    log1 = tmp_path / "w1.log"
    daemon1 = start_worker("--concurrency", "1", "--batch-size", "2",
                           "--settings", "lease_settings", log=log1, env=env)
    daemon2 = None
    try:
        wait_for(pidfile.exists, what="the first job of the batch to start")
        # Both jobs are in daemon 1's batch; the second waits for the first to end.
        daemon2 = start_worker("--concurrency", "1", "--settings", "lease_settings",
                               "--poll-interval", "0.3", log=tmp_path / "w2.log", env=env)
        wait_for(lambda: Job.objects.get(pk=second.pk).status == Status.SUCCEEDED, timeout=30,
                 what="the second job to run in the other daemon")
        gate1.touch()
        wait_for(lambda: Job.objects.get(pk=first.pk).status == Status.SUCCEEDED,
                 what="the first job to end")
        # Daemon 1 then comes to the second job: it must see that it ran elsewhere.
        wait_for(lambda: ledger("second") > 1 or skipped(log1, second.pk),
                 what="daemon 1 to come to the second job")
        assert ledger("second") == 1
        assert list(Job.objects.get(pk=second.pk).attempt_set.values_list(
            "outcome", flat=True)) == [Outcome.SUCCEEDED]
    finally:
        gate1.touch()
        for daemon in (daemon1, daemon2):
            if daemon is not None:
                assert stop(daemon) == 0


def test_a_long_job_cancelled_while_waiting_its_turn_in_a_batch_does_not_run(tmp_path):
    gate1, pidfile = tmp_path / "gate1", tmp_path / "pid"
    first = djasync.schedule(jobs.long_job, args=["first", str(gate1), str(pidfile)],
                             meta={"atomic": False}, priority=1)
    second = djasync.schedule(jobs.long_job, args=["second"], meta={"atomic": False})
    log = tmp_path / "w.log"
    daemon = start_worker("--concurrency", "1", "--batch-size", "2", log=log)
    try:
        wait_for(pidfile.exists, what="the first job of the batch to start")
        assert scheduling.cancel([second.pk]) == 1
        gate1.touch()
        wait_for(lambda: Job.objects.get(pk=first.pk).status == Status.SUCCEEDED,
                 what="the first job to end")
        wait_for(lambda: ledger("second") or skipped(log, second.pk),
                 what="the worker to come to the second job")
        assert (Job.objects.get(pk=second.pk).status, ledger("second")) == (
            Status.CANCELLED, 0)
    finally:
        gate1.touch()
        assert stop(daemon) == 0


def test_a_running_long_job_is_running_for_job_cancel_deschedule_and_retry_now(tmp_path):
    gate, pidfile = tmp_path / "gate", tmp_path / "pid"
    args = ["running", str(gate), str(pidfile)]
    job = djasync.schedule(jobs.long_job, args=args, meta={"atomic": False})
    daemon = start_worker("--concurrency", "1", log=tmp_path / "w.log")
    try:
        wait_for(pidfile.exists, what="the long job to start")
        with pytest.raises(DjasyncError, match="running it right now"):
            Job.objects.get(pk=job.pk)()
        assert scheduling.cancel([job.pk]) == 0
        assert djasync.deschedule(jobs.long_job, args=args) == 0
        assert scheduling.retry_now([job.pk]) == 0
        gate.touch()
        wait_for(lambda: Job.objects.get(pk=job.pk).status != Status.PENDING, what="the end")
        job.refresh_from_db()
        assert (job.status, ledger("running"), job.attempt_set.count()) == (
            Status.SUCCEEDED, 1, 1)
    finally:
        gate.touch()
        assert stop(daemon) == 0


def test_a_long_job_killed_at_the_shutdown_timeout_is_not_charged_and_is_free_at_once(
        tmp_path):
    gate, pidfile = tmp_path / "gate", tmp_path / "pid"
    job = djasync.schedule(jobs.long_job, args=["cut", str(gate), str(pidfile)],
                           meta={"atomic": False})
    daemon = start_worker("--concurrency", "1", "--shutdown-timeout", "0.5",
                          log=tmp_path / "w1.log")
    try:
        wait_for(pidfile.exists, what="the long job to start")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        job.refresh_from_db()
        # Not charged, and claimable now rather than when its (60 s) lease ends.
        assert (job.status, job.attempt_set.count(), job.lease_owner, job.lease_expires) == (
            Status.PENDING, 0, "", None)
        gate.touch()
        pidfile.unlink()
        second = start_worker("--concurrency", "1", log=tmp_path / "w2.log")
        try:
            wait_for(lambda: Job.objects.get(pk=job.pk).status == Status.SUCCEEDED,
                     timeout=10, what="the job to run again at once")
        finally:
            assert stop(second) == 0
        assert list(job.attempt_set.values_list("outcome", flat=True)) == [Outcome.SUCCEEDED]
    finally:
        gate.touch()
        if daemon.poll() is None:
            os.kill(daemon.pid, signal.SIGKILL)


def lease_live_at_start():
    """A long job: report whether its lease was live when it started (read on its own
    connection, outside any transaction, before the first renewal)."""
    from djasync.executor import current_job

    with connection.cursor() as cursor:
        cursor.execute("SELECT lease_expires > clock_timestamp() FROM djasync_job WHERE id = %s",
                       [current_job().id])
        return cursor.fetchone()[0]


def test_a_long_job_whose_batch_mates_took_longer_than_a_lease_starts_with_a_live_lease(
        tmp_path):
    # The long job comes first in the batch (higher priority), but it runs after the claim
    # commits, so after the atomic job, which runs in the claiming transaction for twice the
    # lease.
    slow = djasync.schedule(jobs.sleep, args=[2.0])
    long = djasync.schedule(lease_live_at_start, meta={"atomic": False}, priority=1)
    daemon = start_worker("--concurrency", "1", "--batch-size", "2",
                          "--settings", "lease_settings", log=tmp_path / "w.log",
                          env=short_lease_env(tmp_path))
    try:
        wait_for(lambda: Job.objects.get(pk=long.pk).status == Status.SUCCEEDED, timeout=30,
                 what="the long job to end")
        assert Job.objects.get(pk=long.pk).result is True
        assert Job.objects.get(pk=slow.pk).status == Status.SUCCEEDED
        assert list(Job.objects.get(pk=long.pk).attempt_set.values_list(
            "outcome", flat=True)) == [Outcome.SUCCEEDED]
    finally:
        assert stop(daemon) == 0


def read_timeouts():
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('statement_timeout'), "
                       "current_setting('idle_in_transaction_session_timeout')")
        return cursor.fetchone()


def test_run_jobs_gives_the_test_transaction_its_own_timeouts_back():
    djasync.schedule(jobs.add, args=[1, 2], meta={"timeout": 3})
    with transaction.atomic():  # the test's own transaction, as in a TestCase
        before = read_timeouts()
        [finished] = run_jobs()
        assert finished.outcome == Outcome.SUCCEEDED
        assert read_timeouts() == before


def test_a_long_job_under_run_jobs_runs_without_a_lease_renewer(settings, caplog):
    # Inside the test's transaction the job's row stays locked by that transaction, and its
    # lease is not visible to any other connection: a renewer could only wait on the lock or
    # (as it did) find no lease and report it lost.
    settings.DJASYNC = {**settings.DJASYNC, "LEASE_SECONDS": 1}
    job = djasync.schedule(jobs.sleep, args=[1.0, "slept"], meta={"atomic": False})
    with transaction.atomic():  # the test's own transaction, as in a TransactionTestCase
        with connection.cursor() as cursor:  # fail, rather than hang, if it waits for ever
            cursor.execute("SET LOCAL idle_in_transaction_session_timeout = '8s'")
        started = time.monotonic()
        [finished] = run_jobs()
        assert time.monotonic() - started < 5
        assert finished.outcome == Outcome.SUCCEEDED
    job.refresh_from_db()
    assert (job.status, job.lease_owner, job.lease_expires, ledger("slept")) == (
        Status.SUCCEEDED, "", None, 1)
    assert not [r for r in caplog.records if "lease" in r.getMessage()]


def test_retry_now_leaves_a_job_that_made_the_most_attempts_allowed_as_it_is():
    worn = djasync.schedule(jobs.add, args=[1, 2], meta={"max_attempts": 1000})
    almost = djasync.schedule(jobs.add, args=[2, 3], meta={"max_attempts": 999})
    now = timezone.now()
    for job, made in ((worn, 1000), (almost, 999)):
        Attempt.objects.bulk_create(
            Attempt(job=job, number=n, started_at=now, finished_at=now, outcome=Outcome.ERROR)
            for n in range(1, made + 1))
        Job.objects.filter(pk=job.pk).update(status=Status.FAILED, attempts=made)
    assert scheduling.retry_now([worn.pk, almost.pk]) == 1
    worn.refresh_from_db()
    assert (worn.status, worn.meta) == (Status.FAILED, {"max_attempts": 1000})
    # The other gets its 1,000th attempt, and it runs.
    assert Job.objects.get(pk=almost.pk)() == 5
    assert Job.objects.get(pk=almost.pk).meta == {"max_attempts": 1000}


def kill_after_commit():
    """Kill this worker process once the batch's COMMIT has returned (an on_commit
    callback), before the child tells its supervisor that the batch ended."""
    transaction.on_commit(lambda: os.kill(os.getpid(), signal.SIGKILL))


def test_a_child_killed_after_its_commit_charges_no_phantom_crash_to_the_job_it_ran(tmp_path):
    # One batch: the first job kills the process after the COMMIT; the second, the last one
    # published as running, failed and waits for its retry (pending) when the child dies.
    killer = djasync.schedule(kill_after_commit, priority=1)
    failing = djasync.schedule(jobs.always_raise, meta={"backoff": 3600})
    log = tmp_path / "w.log"
    daemon = start_worker("--concurrency", "1", "--batch-size", "2", log=log)
    try:
        wait_for(lambda: "lost its process" in log.read_text() or "died" in log.read_text(),
                 what="the child to die")
        wait_for(lambda: "child started" in log.read_text().split("died", 1)[-1],
                 what="the supervisor to have dealt with the death")
        failing.refresh_from_db()
        assert list(failing.attempt_set.values_list("outcome", flat=True)) == [Outcome.ERROR]
        assert failing.status == Status.PENDING
        assert list(Job.objects.get(pk=killer.pk).attempt_set.values_list(
            "outcome", flat=True)) == [Outcome.SUCCEEDED]
    finally:
        assert stop(daemon) == 0


def test_a_long_job_whose_session_ended_while_it_ran_still_records_its_outcome():
    """The outcome write meets a dead connection: it is written on a new one, not lost with
    the lease left behind (a run nobody would count)."""
    job = djasync.schedule(jobs.long_job_losing_its_session, ["cut"], meta={"atomic": False})
    from djasync import executor

    [finished] = executor.run_batch()
    assert finished.outcome == Outcome.SUCCEEDED
    job.refresh_from_db()
    assert job.status == Status.SUCCEEDED and job.result == "cut"
    assert (job.lease_owner, job.lease_expires) == ("", None)
    assert list(job.attempt_set.values_list("outcome", flat=True)) == [Outcome.SUCCEEDED]
    assert ledger("cut") == 1


def test_a_dead_workers_lease_left_behind_by_an_unwritten_outcome_is_charged_when_freed():
    """A dead process's leases: the job it was running is charged by its watcher; any other
    lease it still held is a run whose outcome was never written, recorded as lost before the
    lease is freed (freeing it silently let the job run again with the run uncounted)."""
    from djasync import leases

    running = djasync.schedule(jobs.long_job, ["a"], meta={"atomic": False})
    left_behind = djasync.schedule(jobs.long_job, ["b"], meta={"atomic": False})
    later = timezone.now() + timezone.timedelta(minutes=5)
    for job, token in ((running, "1"), (left_behind, "2")):
        Job.objects.filter(pk=job.pk).update(lease_owner=f"host:42/{token}", lease_expires=later)
    other = djasync.schedule(jobs.long_job, ["c"], meta={"atomic": False})
    Job.objects.filter(pk=other.pk).update(lease_owner="host:421/3", lease_expires=later)

    leases.free_leases_of_dead("host:42", charged=running.pk)

    assert not Attempt.objects.filter(job=running).exists()  # its watcher charges it
    [lost] = Attempt.objects.filter(job=left_behind)
    assert lost.outcome == Outcome.CRASHED and "could not write" in lost.exception_message
    assert Job.objects.filter(pk__in=[running.pk, left_behind.pk], lease_expires=None).count() == 2
    assert Job.objects.get(pk=other.pk).lease_owner == "host:421/3"  # another process's


def test_queue_health_counts_a_long_job_running_under_a_live_lease_as_running():
    from djasync import health

    job = djasync.schedule(jobs.long_job, ["x"], meta={"atomic": False})
    assert health.running_count() == 0
    minute = timezone.timedelta(minutes=1)
    Job.objects.filter(pk=job.pk).update(lease_owner="host:1/a",
                                         lease_expires=timezone.now() + minute)
    assert health.running_count() == 1
    Job.objects.filter(pk=job.pk).update(lease_expires=timezone.now() - minute)
    assert health.running_count() == 0  # its worker died or froze: waiting again


@contextmanager
def isolation_level(level):
    """Django's default connection at this ``isolation_level`` (its OPTIONS, as a project
    sets it) inside the block."""
    from djasync import executor

    options = connection.settings_dict.setdefault("OPTIONS", {})
    missing = object()
    saved = options.get("isolation_level", missing)
    connection.close()
    options["isolation_level"] = psycopg.IsolationLevel[level]
    try:
        yield
    finally:
        connection.close()
        executor.close_fresh_counter()  # the recount's own connection (executor._recount)
        if saved is missing:
            del options["isolation_level"]
        else:
            options["isolation_level"] = saved


def expired_lease(job):
    """``job``'s worker froze (or died with its host) mid-run: its lease ran out."""
    Job.objects.filter(pk=job.pk).update(
        lease_owner="frozen-host:7/abc", lease_expires=timezone.now() - timedelta(seconds=1))


@pytest.mark.parametrize("level", ["READ_COMMITTED", "REPEATABLE_READ"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_long_job_whose_lease_expired_on_its_last_attempt_is_failed_and_not_run_again(
        level, batch):
    """The run that lost its lease used the job's only attempt: the claim that finds the
    lease expired records that attempt as lost, and then must fail the job, not run it a
    second time (2 attempts of max 1). Under REPEATABLE READ the recount near max_attempts
    asked a connection of its own, which did not see the lost attempt this very transaction
    had just written."""
    from djasync import executor

    job = djasync.schedule(jobs.write_ledger, ["long"], meta={"atomic": False,
                                                             "max_attempts": 1})
    mates = [djasync.schedule(jobs.write_ledger, [f"mate{i}"]) for i in range(batch - 1)]
    expired_lease(job)
    with isolation_level(level):
        if batch == 1:
            executor.drain()
        else:
            executor.run_batch(batch)
    job.refresh_from_db()
    assert ledger("long") == 0
    assert job.status == Status.FAILED
    assert list(job.attempt_set.values_list("outcome", flat=True)) == [Outcome.CRASHED]
    assert (job.lease_owner, job.lease_expires) == ("", None)
    assert all(ledger(f"mate{i}") == 1 for i in range(len(mates)))


@pytest.mark.parametrize("level", ["READ_COMMITTED", "REPEATABLE_READ"])
def test_a_long_job_whose_lease_expired_with_attempts_left_runs_once_more(level):
    from djasync import executor

    job = djasync.schedule(jobs.write_ledger, ["long"], meta={"atomic": False,
                                                             "max_attempts": 2})
    expired_lease(job)
    with isolation_level(level):
        assert [f.outcome for f in executor.drain()] == [Outcome.SUCCEEDED]
    job.refresh_from_db()
    assert ledger("long") == 1 and job.status == Status.SUCCEEDED
    assert list(job.attempt_set.order_by("number").values_list("outcome", "number")) == [
        (Outcome.CRASHED, 1), (Outcome.SUCCEEDED, 2)]


@pytest.mark.parametrize("level", ["READ_COMMITTED", "REPEATABLE_READ"])
def test_the_daemon_fails_a_long_job_whose_lease_expired_on_its_last_attempt(tmp_path, level):
    """The same through the worker's batches (``--batch-size 3``) and its isolation level."""
    job = djasync.schedule(jobs.write_ledger, ["long"], meta={"atomic": False,
                                                             "max_attempts": 1})
    for i in range(2):
        djasync.schedule(jobs.write_ledger, [f"mate{i}"])
    expired_lease(job)
    log = tmp_path / "w.log"
    daemon = start_worker("--settings", "tests.settings_rr", "--batch-size", "3", "--burst",
                          log=log, env=worker_env(DJASYNC_TEST_ISOLATION=level))
    assert daemon.wait(timeout=120) == 0, log.read_text()[-3000:]
    job.refresh_from_db()
    assert ledger("long") == 0 and job.status == Status.FAILED, log.read_text()[-3000:]
    assert list(job.attempt_set.values_list("outcome", flat=True)) == [Outcome.CRASHED]
    assert ledger("mate0") == ledger("mate1") == 1
