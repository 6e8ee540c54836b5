"""queue_health's report: counts per function (a Task by its path) and the time to drain."""

import datetime

import pytest
from django.utils import timezone

import djasync
from djasync import executor
from djasync.health import health
from djasync.models import Attempt, Outcome
from tests import jobs, tasks

pytestmark = pytest.mark.django_db(transaction=True)


def ran_for(seconds: float, *, hours_ago: float = 2) -> None:
    """Make every succeeded attempt so far have taken ``seconds``, ``hours_ago`` hours ago."""
    finished = timezone.now() - datetime.timedelta(hours=hours_ago)
    Attempt.objects.filter(outcome=Outcome.SUCCEEDED).update(
        finished_at=finished, started_at=finished - datetime.timedelta(seconds=seconds))


def test_health_counts_jobs_per_function_by_status_and_a_task_by_its_path():
    djasync.schedule(jobs.add, args=[1, 1])
    djasync.schedule(jobs.always_raise, meta={"max_attempts": 1})
    tasks.add.enqueue(1, 2)
    executor.drain()
    djasync.schedule(jobs.add, args=[2, 2])
    djasync.deschedule(jobs.add, args=[2, 2])
    djasync.schedule(jobs.add, args=[3, 3])
    tasks.add.enqueue(3, 4)
    functions = health()["functions"]
    assert functions == {
        "tests.jobs.add": {"pending": 1, "succeeded": 1, "failed": 0, "cancelled": 1},
        "tests.jobs.always_raise": {"pending": 0, "succeeded": 0, "failed": 1, "cancelled": 0},
        "tests.tasks.add": {"pending": 1, "succeeded": 1, "failed": 0, "cancelled": 0},
    }


def test_failing_and_slowest_lists_name_a_task_by_its_path():
    tasks.add.enqueue(1, 2)
    tasks.fail_once.enqueue("k")
    executor.drain()
    report = health()
    assert report["last_hour"]["failing_names"] == [{"name": "tests.tasks.fail_once",
                                                     "errors": 1}]
    assert [s["name"] for s in report["slowest_names"]] == ["tests.tasks.add"]


def test_the_drain_estimate_comes_from_run_times_even_when_nothing_ran_in_the_last_hour():
    djasync.schedule(jobs.add, args=[1, 1])
    executor.drain()
    ran_for(2.0)  # one job, two hours ago: no success in the last hour
    for i in range(3):
        djasync.schedule(jobs.add, args=[i, i])
    report = health()
    assert report["last_hour"]["succeeded"] == 0
    assert report["estimate"]["work_seconds"] == pytest.approx(6.0)
    assert report["estimated_drain_seconds"] == pytest.approx(6.0)  # no worker: one process


def test_a_function_that_never_ran_is_estimated_at_the_average_of_the_others():
    djasync.schedule(jobs.add, args=[1, 1])
    djasync.schedule(jobs.echo, args=["x"])
    executor.drain()
    Attempt.objects.filter(job__name="tests.jobs.add").update(
        started_at=timezone.now() - datetime.timedelta(seconds=1), finished_at=timezone.now())
    Attempt.objects.filter(job__name="tests.jobs.echo").update(
        started_at=timezone.now() - datetime.timedelta(seconds=3), finished_at=timezone.now())
    djasync.schedule(jobs.write_ledger, args=["a"])
    djasync.schedule(jobs.add, args=[5, 5])
    estimate = health()["estimate"]
    assert estimate["work_seconds"] == pytest.approx(2.0 + 1.0)
    assert estimate["functions_without_runs"] == ["tests.jobs.write_ledger"]


def test_with_no_run_at_all_there_is_no_estimate():
    djasync.schedule(jobs.add, args=[1, 1])
    report = health()
    assert report["estimated_drain_seconds"] is None
    assert report["estimate"]["functions_without_runs"] == ["tests.jobs.add"]


def test_running_counts_locked_rows_without_locking_any(other_connection):
    """The count reads each row's locker; it takes no lock of its own. An earlier version
    share-locked the due rows for its statement: a worker's claim at that moment passed them
    over and, finding nothing else, slept until its next poll. Here the count runs inside an
    open transaction, where any row lock it took would stay: a claim must still take the job
    it did not count, and a job locked in a subtransaction (flow control's claim of a job with
    a rate) counts as running."""
    import psycopg

    from djasync import health, sql
    from tests.conftest import conninfo

    held, free = (djasync.schedule(jobs.add, args=[n, n]).pk for n in range(2))
    with psycopg.connect(**conninfo()) as runner, psycopg.connect(**conninfo()) as looker:
        runner.execute("SAVEPOINT claim")
        runner.execute("SELECT 1 FROM djasync_job WHERE id = %s FOR NO KEY UPDATE", [held])
        assert looker.execute(health.RUNNING, {"limit": 100}).fetchone() == (1,)
        # The count's transaction is still open: the other job is a worker's to claim.
        claimed = other_connection.execute(
            sql.claim(by_queue=False, by_name_prefix=False), {"limit": 1, "now": None})
        assert [row[0] for row in claimed] == [free]
        looker.rollback()
        runner.rollback()
    assert health.running_count() == 0
