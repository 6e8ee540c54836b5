"""End to end: djasync-worker as a subprocess, killed, signalled, and checked on the rows."""

import datetime
import json
import os
import signal
import socket
import statistics
import time

import pytest
from django.db import connection
from django.db.models import Count

import djasync
from djasync.models import Attempt, Job, Outcome, Status
from tests import jobs
from tests.daemon import run_worker, start_worker, stop, wait_for, worker_env
from tests.models import Ledger

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.daemon]


def statuses() -> dict[str, int]:
    return dict(Job.objects.values_list("status").annotate(n=Count("id")))


def ledger_counts() -> dict[str, int]:
    return dict(Ledger.objects.values_list("key").annotate(n=Count("id")))


def test_burst_drains_the_queue_with_four_children_and_exits_0():
    djasync.schedule_many([djasync.JobSpec(jobs.write_ledger, [f"k{i}"]) for i in range(300)])
    result = run_worker("--concurrency", "4", "--burst")
    assert result.returncode == 0, result.stderr
    assert statuses() == {Status.SUCCEEDED: 300}
    assert ledger_counts() == {f"k{i}": 1 for i in range(300)}
    workers_used = set(Attempt.objects.values_list("worker", flat=True))
    assert len(workers_used) >= 2, workers_used  # the children really shared the work


def test_batched_mode_runs_each_job_exactly_once_even_when_a_job_kills_its_batch():
    """--batch-size 10: ten jobs per transaction, each in its own savepoint, one COMMIT. A
    failing job's writes roll back alone; a job that kills its process rolls its whole batch
    back, and those jobs run again (once: their first run never committed)."""
    good = [djasync.JobSpec(jobs.write_ledger, [f"k{i}"]) for i in range(300)]
    failing = [djasync.JobSpec(jobs.write_then_raise, [f"bad{i}"], meta={"max_attempts": 2})
               for i in range(20)]
    mixed = [spec for i, spec in enumerate(good)
             for spec in ([spec, failing[i // 15]] if i % 15 == 7 else [spec])]
    # The poison sits mid-batch: jobs before it in its batch ran, then their batch died.
    mixed.insert(105, djasync.JobSpec(jobs.kill_self, ["poison"], meta={"max_attempts": 2}))
    djasync.schedule_many(mixed)  # a failing job in every other batch or so
    poison = Job.objects.get(name="tests.jobs.kill_self")
    result = run_worker("--concurrency", "2", "--batch-size", "10", "--burst", timeout=120)
    assert result.returncode == 0, result.stderr
    assert statuses() == {Status.SUCCEEDED: 300, Status.FAILED: 21}
    assert ledger_counts() == {f"k{i}": 1 for i in range(300)}  # no bad*, no poison row
    succeeded = Attempt.objects.filter(outcome=Outcome.SUCCEEDED)
    assert succeeded.count() == 300 and succeeded.values("job").distinct().count() == 300
    assert list(poison.attempt_set.values_list("outcome", flat=True)) == [Outcome.CRASHED] * 2
    failed_attempts = Attempt.objects.filter(job__name="tests.jobs.write_then_raise")
    assert set(failed_attempts.values_list("outcome", flat=True)) == {Outcome.ERROR}
    assert failed_attempts.count() == 40
    # No innocent job was charged a crash, though the poison rolled back whole batches.
    assert not Attempt.objects.filter(outcome=Outcome.CRASHED).exclude(job=poison).exists()
    # Jobs of one batch share a transaction: the attempts show up to ten per worker commit.
    assert Job.objects.filter(status=Status.SUCCEEDED).values("worker").distinct().count() >= 2


def test_two_daemons_on_the_same_queue_never_run_a_job_twice(tmp_path):
    djasync.schedule_many([djasync.JobSpec(jobs.write_ledger, [f"k{i}"]) for i in range(600)])
    daemons = [start_worker("--concurrency", "3", "--burst", log=tmp_path / f"w{i}.log")
               for i in range(2)]
    codes = [d.wait(timeout=90) for d in daemons]
    assert codes == [0, 0], [(tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(2)]
    counts = ledger_counts()
    assert len(counts) == 600 and set(counts.values()) == {1}
    assert statuses() == {Status.SUCCEEDED: 600}
    assert Attempt.objects.count() == 600


def test_kill_9_of_a_child_mid_job_reruns_the_job_and_its_effect_exists_once(tmp_path):
    pidfile = tmp_path / "pid"
    job = djasync.schedule(jobs.record_pid_then_sleep, args=[str(pidfile), 1.5, "victim"])
    daemon = start_worker("--concurrency", "2", log=tmp_path / "w.log")
    try:
        child_pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="job"))
        pidfile.unlink()
        os.kill(child_pid, signal.SIGKILL)
        wait_for(lambda: Job.objects.get(pk=job.pk).status == Status.SUCCEEDED, timeout=30,
                 what="the re-run to succeed")
        assert ledger_counts() == {"victim": 1}
        outcomes = list(job.attempt_set.values_list("outcome", flat=True))
        assert outcomes == [Outcome.CRASHED, Outcome.SUCCEEDED]
        crashed = job.attempt_set.get(outcome=Outcome.CRASHED)
        assert "SIGKILL" in crashed.exception_message and crashed.worker.endswith(str(child_pid))
        # The daemon replaced the child and keeps serving.
        later = djasync.schedule(jobs.write_ledger, args=["after"])
        wait_for(lambda: Job.objects.get(pk=later.pk).status == Status.SUCCEEDED, what="later")
        assert daemon.poll() is None
    finally:
        assert stop(daemon) == 0


@pytest.mark.parametrize("poison", ["tests.jobs.kill_self", "tests.jobs.exit_hard"])
def test_a_job_that_kills_its_process_is_failed_after_max_attempts_and_others_succeed(poison):
    djasync.schedule_many([djasync.JobSpec(jobs.write_ledger, [f"k{i}"]) for i in range(30)])
    bad = djasync.schedule(poison, meta={"max_attempts": 3}, priority=1)
    result = run_worker("--concurrency", "2", "--burst")
    assert result.returncode == 0, result.stderr
    bad.refresh_from_db()
    assert bad.status == Status.FAILED
    assert list(bad.attempt_set.values_list("outcome", flat=True)) == [Outcome.CRASHED] * 3
    assert statuses() == {Status.SUCCEEDED: 30, Status.FAILED: 1}
    # No innocent job was charged a crash.
    assert not Attempt.objects.exclude(job=bad).exclude(outcome=Outcome.SUCCEEDED).exists()


def test_a_job_running_past_its_timeout_is_killed_recorded_and_retried():
    job = djasync.schedule(jobs.busy_loop, args=[30], meta={"timeout": 0.5, "max_attempts": 2})
    started = time.monotonic()
    result = run_worker("--concurrency", "1", "--burst")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20
    job.refresh_from_db()
    assert job.status == Status.FAILED
    assert list(job.attempt_set.values_list("outcome", flat=True)) == [Outcome.TIMED_OUT] * 2


def test_sigterm_lets_the_running_job_finish_and_exits_0(tmp_path):
    pidfile = tmp_path / "pid"
    job = djasync.schedule(jobs.record_pid_then_sleep, args=[str(pidfile), 1.0, "graceful"])
    daemon = start_worker("--concurrency", "2", "--shutdown-timeout", "20",
                          log=tmp_path / "w.log")
    wait_for(pidfile.exists, what="the job to start")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=20) == 0
    job.refresh_from_db()
    assert job.status == Status.SUCCEEDED and ledger_counts() == {"graceful": 1}


def test_a_job_still_running_at_the_shutdown_deadline_rolls_back_and_stays_queued(tmp_path):
    pidfile = tmp_path / "pid"
    job = djasync.schedule(jobs.record_pid_then_sleep, args=[str(pidfile), 30, "cut"])
    daemon = start_worker("--concurrency", "1", "--shutdown-timeout", "0.5",
                          log=tmp_path / "w.log")
    wait_for(pidfile.exists, what="the job to start")
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=20) == 0
    assert time.monotonic() - started < 10
    job.refresh_from_db()
    assert (job.status, Ledger.objects.count(), job.attempt_set.count()) == (
        Status.PENDING, 0, 0)


def test_a_second_signal_stops_at_once(tmp_path):
    pidfile = tmp_path / "pid"
    job = djasync.schedule(jobs.record_pid_then_sleep, args=[str(pidfile), 30, "cut"])
    daemon = start_worker("--concurrency", "1", "--shutdown-timeout", "60",
                          log=tmp_path / "w.log")
    wait_for(pidfile.exists, what="the job to start")
    daemon.send_signal(signal.SIGINT)
    wait_for(lambda: "stopping after the running jobs" in (tmp_path / "w.log").read_text(),
             what="the first signal to be handled")
    started = time.monotonic()
    daemon.send_signal(signal.SIGINT)
    assert daemon.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    job.refresh_from_db()
    assert (job.status, Ledger.objects.count()) == (Status.PENDING, 0)


def test_an_idle_daemon_starts_a_new_job_within_milliseconds(tmp_path):
    daemon = start_worker("--concurrency", "2", "--poll-interval", "30", log=tmp_path / "w.log")
    try:
        wait_for(lambda: "worker ready" in (tmp_path / "w.log").read_text(), what="ready")
        delays = []
        for i in range(10):
            job = djasync.schedule(jobs.add, args=[i, i])  # autocommit: committed on return
            committed = datetime.datetime.now(datetime.UTC)
            job = wait_for(lambda j=job: Job.objects.filter(pk=j.pk, status=Status.SUCCEEDED)
                           .first(), what="the job to run")
            delays.append((job.started_at - committed).total_seconds())
        assert statistics.median(delays) < 0.05, delays
        assert max(delays) < 0.5, delays
    finally:
        assert stop(daemon) == 0


def test_a_job_whose_run_after_comes_due_runs_then_without_waiting_for_a_poll(tmp_path):
    daemon = start_worker("--concurrency", "1", "--poll-interval", "60", log=tmp_path / "w.log")
    try:
        wait_for(lambda: "worker ready" in (tmp_path / "w.log").read_text(), what="ready")
        job = djasync.schedule(jobs.add, args=[1, 1], run_after=datetime.timedelta(seconds=1))
        job = wait_for(lambda: Job.objects.filter(pk=job.pk, status=Status.SUCCEEDED).first(),
                       timeout=10, what="the delayed job")
        late = (job.started_at - job.run_after).total_seconds()
        assert 0 <= late < 0.5, late
    finally:
        assert stop(daemon) == 0


def test_the_daemon_survives_pg_terminate_backend_of_its_connections(tmp_path, other_connection):
    daemon = start_worker("--concurrency", "2", "--poll-interval", "1", log=tmp_path / "w.log")
    try:
        first = djasync.schedule(jobs.write_ledger, args=["before"])
        wait_for(lambda: Job.objects.get(pk=first.pk).status == Status.SUCCEEDED, what="first")
        with connection.cursor() as cursor:  # spare this test's own connection
            cursor.execute("SELECT pg_backend_pid()")
            (ours,) = cursor.fetchone()
        killed = other_connection.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid NOT IN (pg_backend_pid(), %s) "
            "AND backend_type = 'client backend'", [ours]).fetchone()[0]
        assert killed >= 2
        later = djasync.schedule(jobs.write_ledger, args=["after"])
        wait_for(lambda: Job.objects.get(pk=later.pk).status == Status.SUCCEEDED, timeout=30,
                 what="a job after the connections were cut")
        assert ledger_counts() == {"before": 1, "after": 1}
        assert daemon.poll() is None
    finally:
        assert stop(daemon) == 0


def test_queue_health_lists_a_running_daemon(tmp_path):
    from io import StringIO

    from django.core.management import call_command

    daemon = start_worker("--concurrency", "3", log=tmp_path / "w.log")
    try:
        def listed():
            out = StringIO()
            call_command("queue_health", "--json", stdout=out)
            alive = [w for w in json.loads(out.getvalue())["workers"] if w["alive"]]
            return alive
        [worker] = wait_for(listed, what="the daemon in queue_health")
        assert (worker["pid"], worker["concurrency"]) == (daemon.pid, 3)
    finally:
        assert stop(daemon) == 0
    out = StringIO()
    call_command("queue_health", "--json", stdout=out)
    assert [w["alive"] for w in json.loads(out.getvalue())["workers"]] == [False]


def test_sd_notify_messages_reach_the_notify_socket(tmp_path, request):
    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    request.addfinalizer(server.close)
    server.bind(address)
    server.settimeout(30)
    djasync.schedule_many([djasync.JobSpec(jobs.add, [i, i]) for i in range(20)])
    env = worker_env(NOTIFY_SOCKET=address, WATCHDOG_USEC="200000")
    result = run_worker("--concurrency", "2", "--burst", env=env)
    assert result.returncode == 0, result.stderr
    server.settimeout(0.5)
    messages = []
    try:
        while True:
            messages.append(server.recv(4096).decode())
    except TimeoutError:
        pass
    text = "\n".join(messages)
    assert messages[0].startswith("READY=1\nSTATUS=2 children"), messages
    assert "WATCHDOG=1" in text
    assert "STOPPING=1" in messages[-1]


def test_max_jobs_per_child_replaces_children_to_bound_memory():
    djasync.schedule_many([djasync.JobSpec(jobs.add, [i, i]) for i in range(30)])
    result = run_worker("--concurrency", "1", "--max-jobs-per-child", "5", "--burst")
    assert result.returncode == 0, result.stderr
    assert statuses() == {Status.SUCCEEDED: 30}
    children = set(Attempt.objects.values_list("worker", flat=True))
    assert len(children) == 6, children


def test_jobs_found_only_by_polling_raise_one_warning_and_still_run(tmp_path, other_connection):
    log = tmp_path / "w.log"
    daemon = start_worker("--concurrency", "1", "--poll-interval", "0.2", log=log)
    try:
        wait_for(lambda: "worker ready" in log.read_text(), what="ready")
        for i in range(5):
            # Written without NOTIFY, as if a PgBouncer in transaction mode dropped it.
            other_connection.execute(
                "INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, "
                "status, attempts, identity, created_at, worker) VALUES ('tests.jobs.add', "
                "'[1, 2]', '{}', '{}', 'default', 0, now(), 'pending', 0, '', now(), '')")
            wait_for(lambda n=i + 1: Job.objects.filter(status=Status.SUCCEEDED).count() == n,
                     what=f"polled job {i}")
        text = log.read_text()
        assert text.count("notifications are not arriving") == 1, text[-3000:]
    finally:
        assert stop(daemon) == 0


def test_json_log_lines_carry_the_job_fields_but_never_its_arguments():
    djasync.schedule(jobs.echo, args=["secret-token-123"], queue="mail")
    result = run_worker("--concurrency", "1", "--burst", "--log-format", "json",
                        "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [done] = [line for line in lines if line.get("outcome") == "succeeded"]
    assert (done["job_name"], done["queue"], done["attempt"]) == ("tests.jobs.echo", "mail", 1)
    assert done["duration"] >= 0 and done["job_id"] > 0
    assert "secret-token-123" not in result.stderr


def test_at_the_default_level_the_worker_logs_one_line_per_finished_job_plain_or_task():
    from tests import tasks

    plain = djasync.schedule(jobs.add, args=[1, 2])
    task_id = int(tasks.add.enqueue(3, 4).id)
    result = run_worker("--concurrency", "1", "--burst", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    # Django's own "Task ... state=RUNNING/SUCCESSFUL" lines are left out: one rule for both.
    about_jobs = [(line["level"], line["message"].split(" id=")[0], line.get("job_id"),
                   line.get("job_name")) for line in lines if "job_id" in line or
                  line["logger"] == "django.tasks"]
    assert sorted(about_jobs, key=lambda line: line[2] or 0) == [
        ("info", "job succeeded", plain.pk, "tests.jobs.add"),
        ("info", "job succeeded", task_id, "tests.tasks.add")]
    assert all(line["time"].endswith("+00:00") for line in lines)
