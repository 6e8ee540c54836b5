"""Management commands: flush_queue, queue_health, prune_jobs."""

import datetime
import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

import djasync
from djasync import scheduling
from djasync.models import Attempt, Group, Job, Status
from tests import jobs
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_flush_queue_on_an_empty_queue_says_so():
    assert run("flush_queue").strip() == "No jobs to execute"


def test_flush_queue_runs_every_due_job_and_prints_a_line_each_and_a_summary():
    for i in range(3):
        djasync.schedule(jobs.write_ledger, args=[f"k{i}"])
    djasync.schedule(jobs.add, args=[1, 1], run_after=datetime.timedelta(hours=1))
    output = run("flush_queue").splitlines()
    assert len(output) == 4 and all("tests.jobs.write_ledger attempt 1 ok" in o for o in output[:3])
    assert output[-1] == ("3 attempts: 3 succeeded, 0 failed and will be retried, "
                          "0 failed for good")
    assert Ledger.objects.count() == 3


def test_flush_queue_keeps_going_after_a_failure_and_exits_with_an_error():
    djasync.schedule(jobs.always_raise, priority=5, meta={"max_attempts": 1})
    djasync.schedule(jobs.write_ledger, args=["after"])
    with pytest.raises(CommandError, match="1 jobs failed for good"):
        run("flush_queue")
    assert Ledger.objects.count() == 1


def test_flush_queue_exits_0_when_failed_attempts_are_retried():
    djasync.schedule(jobs.always_raise, priority=5, run_after=None)
    out = StringIO()
    # The test backoff is 0, so the retries are due at once: stop after two attempts.
    call_command("flush_queue", "--jobs", "2", stdout=out)
    assert out.getvalue().splitlines()[-1] == (
        "2 attempts: 0 succeeded, 2 failed and will be retried, 0 failed for good")


def test_flush_queue_fail_fast_stops_and_fails_at_the_first_failed_attempt_even_a_retried_one():
    failing = djasync.schedule(jobs.always_raise, priority=5)
    djasync.schedule(jobs.write_ledger, args=["after"])
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError, match=(
            rf"job {failing.pk} \(tests.jobs.always_raise\) attempt 1 failed \(a retry is "
            r"scheduled\): ValueError: this job always fails")):
        call_command("flush_queue", "--fail-fast", stdout=out, stderr=err)
    assert "1 failed and will be retried" in out.getvalue()
    assert "Traceback (most recent call last)" in err.getvalue()
    assert 'raise ValueError("this job always fails")' in err.getvalue()
    assert Ledger.objects.count() == 0
    assert Job.objects.get(pk=failing.pk).status == Status.PENDING


def test_flush_queue_jobs_limit_queue_and_filter():
    for i in range(5):
        djasync.schedule(jobs.write_ledger, args=[f"d{i}"])
    djasync.schedule(jobs.write_ledger, args=["mail"], queue="mail")
    djasync.schedule(jobs.add, args=[1, 2], queue="mail")
    assert run("flush_queue", "--jobs", "2").splitlines()[-1].startswith("2 attempts")
    run("flush_queue", "--queue", "mail", "--filter", "tests.jobs.add")
    assert Job.objects.get(name="tests.jobs.add").status == Status.SUCCEEDED
    assert Job.objects.get(args=["mail"]).status == Status.PENDING
    run("flush_queue", "-q", "mail")
    assert Ledger.objects.count() == 3


@pytest.mark.parametrize("limits", [False, True], ids=["plain claim", "claim with LIMITS"])
@pytest.mark.parametrize("queues", [[], ["default"], ["default", "emails"]],
                         ids=["every queue", "one queue", "two queues"])
def test_flush_queue_filter_selects_task_jobs_by_their_tasks_path(queues, limits):
    from django.test import override_settings

    from tests import tasks
    from tests.settings import DJASYNC

    chosen = tasks.write_ledger.enqueue("task")
    other_task = tasks.add.enqueue(1, 2)
    plain = djasync.schedule(jobs.write_ledger, args=["plain"])
    options = [arg for queue in queues for arg in ("-q", queue)]
    settings = {**DJASYNC, "LIMITS": {"solo": {"concurrency": 1}}} if limits else DJASYNC
    with override_settings(DJASYNC=settings):
        out = run("flush_queue", *options, "-f", "tests.tasks.write")
    assert out.splitlines()[-1].startswith("1 attempts")
    statuses = dict(Job.objects.values_list("id", "status"))
    assert statuses == {int(chosen.id): Status.SUCCEEDED, int(other_task.id): Status.PENDING,
                        plain.pk: Status.PENDING}
    # The raw function name still matches, and a prefix of it selects every Task job.
    with override_settings(DJASYNC=settings):
        run("flush_queue", *options, "-f", "djasync.backends")
    assert Job.objects.get(pk=other_task.id).status == Status.SUCCEEDED
    assert Job.objects.get(pk=plain.pk).status == Status.PENDING


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--queue", "bad queue"], "queue name"),
])
def test_flush_queue_refuses_bad_options(args, message):
    with pytest.raises(CommandError, match=message):
        run("flush_queue", *args)


def test_queue_health_json_reports_counts_errors_and_age():
    djasync.schedule(jobs.add, args=[1, 1])
    djasync.schedule(jobs.always_raise, meta={"max_attempts": 1})
    djasync.schedule(jobs.add, args=[1, 1], run_after=datetime.timedelta(hours=1))
    due = djasync.schedule(jobs.add, args=[2, 2], queue="other", priority=-1)
    Job.objects.filter(pk=due.pk).update(run_after=timezone.now() - datetime.timedelta(minutes=5))
    with pytest.raises(CommandError):
        run("flush_queue", "--jobs", "2")
    report = json.loads(run("queue_health", "--json"))
    assert report["jobs"] == {"pending": 2, "succeeded": 1, "failed": 1, "cancelled": 0}
    assert (report["due"], report["scheduled"], report["running"]) == (1, 1, 0)
    assert report["oldest_due_age_seconds"] >= 299
    assert report["last_hour"]["errors"] == 1
    assert report["last_hour"]["failing_names"] == [{"name": "tests.jobs.always_raise",
                                                     "errors": 1}]
    assert report["queues"]["other"]["pending"] == 1
    assert [s["name"] for s in report["slowest_names"]] == ["tests.jobs.add"]


def test_queue_health_counts_a_locked_job_as_running(other_connection):
    from djasync import sql

    djasync.schedule(jobs.add, args=[1, 1])
    with other_connection.transaction():
        other_connection.execute(sql.claim(by_queue=False, by_name_prefix=False),
                                 {"limit": 1, "now": None})
        assert json.loads(run("queue_health", "--json"))["running"] == 1
    assert json.loads(run("queue_health", "--json"))["running"] == 0


def test_queue_health_text_is_readable():
    djasync.schedule(jobs.add, args=[1, 1])
    text = run("queue_health")
    assert text.startswith("jobs: 1 pending (1 due, 0 running, 0 scheduled)")


def _age(job: Job, days: float) -> None:
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - datetime.timedelta(days=days))


def test_prune_jobs_deletes_old_finished_jobs_and_their_attempts_only():
    old_ok = djasync.schedule(jobs.add, args=[1, 1])
    old_failed = djasync.schedule(jobs.always_raise, meta={"max_attempts": 1})
    young = djasync.schedule(jobs.add, args=[2, 2])
    pending = djasync.schedule(jobs.add, args=[3, 3], run_after=datetime.timedelta(days=1))
    with pytest.raises(CommandError):
        run("flush_queue")
    _age(old_ok, 40)
    _age(old_failed, 40)
    assert "would delete 2 jobs" in run("prune_jobs", "--older-than", "30", "--dry-run")
    assert "deleted 1 jobs" in run("prune_jobs", "--older-than", "30", "--status", "succeeded")
    assert "deleted 1 jobs" in run("prune_jobs", "--older-than", "30")
    assert set(Job.objects.values_list("pk", flat=True)) == {young.pk, pending.pk}
    assert set(Attempt.objects.values_list("job_id", flat=True)) == {young.pk}


def test_cancelled_jobs_are_finished_then_and_pruned_like_the_others():
    cancelled = djasync.schedule(jobs.add, args=[1, 1])
    descheduled = djasync.schedule(jobs.add, args=[2, 2])
    before = timezone.now()
    assert scheduling.cancel([cancelled.pk]) == 1
    assert djasync.deschedule(jobs.add, args=[2, 2]) == 1
    for job in (cancelled, descheduled):
        job.refresh_from_db()
        assert job.status == Status.CANCELLED and job.finished_at >= before
    assert "deleted 0 jobs" in run("prune_jobs", "--older-than", "30")
    _age(cancelled, 40)
    assert "deleted 1 jobs" in run("prune_jobs", "--older-than", "30", "--status", "cancelled")
    assert list(Job.objects.values_list("pk", flat=True)) == [descheduled.pk]


def test_prune_jobs_keeps_a_group_until_all_of_it_is_old():
    a = djasync.schedule(jobs.add, args=[1, 1], group="g")
    b = djasync.schedule(jobs.add, args=[2, 2], group="g")
    run("flush_queue")
    _age(a, 40)
    assert "deleted 0 jobs" in run("prune_jobs", "--older-than", "30")
    _age(b, 40)
    assert "deleted 2 jobs" in run("prune_jobs", "--older-than", "30")
    assert Group.objects.count() == 0


def test_prune_jobs_deletes_the_rows_of_workers_stopped_before_its_cutoff():
    from djasync.models import Worker

    now = timezone.now()
    for name, days in (("old", 40), ("young", 1)):
        Worker.objects.create(name=name, hostname="h", pid=1, concurrency=1,
                              last_seen=now - datetime.timedelta(days=days),
                              stopped_at=now - datetime.timedelta(days=days))
    assert "deleted 1 rows of workers" in run("prune_jobs", "--older-than", "30")
    assert list(Worker.objects.values_list("name", flat=True)) == ["young"]


def test_prune_jobs_refuses_bad_options():
    with pytest.raises(CommandError, match="--older-than"):
        run("prune_jobs")
    with pytest.raises(CommandError, match="invalid choice"):
        run("prune_jobs", "--older-than", "1", "--status", "pending")
