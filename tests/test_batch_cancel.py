"""A job claimed by a worker's open transaction is running, also for its batch-mates: its row
is locked by that very session, so SKIP LOCKED does not skip it, and it must be left out by id.
``cancel()``, ``deschedule()``, ``retry_now()`` (the admin's actions too) and ``job()`` from a
job of the batch treat it exactly as a job another worker runs: not cancelled (0), not run."""

from __future__ import annotations

import pytest
from django.db import transaction

import djasync
from djasync import executor, scheduling
from djasync.models import Job, Status
from tests import finish_jobs, jobs
from tests.daemon import run_worker
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)


def notes() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, note in Ledger.objects.order_by("id").values_list("key", "note"):
        found.setdefault(key, []).append(note)
    return found


def status(job_id: int) -> str:
    return Job.objects.get(pk=job_id).status


def run_one_batch_of(size: int, how: str) -> None:
    if how == "worker":
        executor.run_batches(size, lambda batch: True)
    elif how == "run_batch":
        executor.run_batch(size)
    else:  # inside a caller's transaction (a test, a request): the nested path
        with transaction.atomic():
            executor.run_batch(size)


HOW = ["worker", "run_batch", "in-a-transaction"]


@pytest.mark.parametrize("how", HOW)
def test_a_batch_mate_cancelled_by_a_job_of_its_batch_is_not_cancelled_and_runs_once(how):
    mate = djasync.schedule(jobs.write_ledger, args=["mate"]).pk
    djasync.schedule(finish_jobs.cancel_jobs, args=["canceller", [mate]], priority=1)
    run_one_batch_of(3, how)
    assert notes() == {"canceller": ["0"], "mate": [""]}
    assert status(mate) == Status.SUCCEEDED


@pytest.mark.parametrize("how", HOW)
def test_a_job_cannot_cancel_itself_while_it_runs(how):
    job = djasync.schedule(finish_jobs.cancel_self, args=["self"]).pk
    djasync.schedule(jobs.write_ledger, args=["other"])
    run_one_batch_of(2, how)
    assert notes() == {"self": ["0"], "other": [""]}
    assert status(job) == Status.SUCCEEDED


@pytest.mark.parametrize("how", HOW)
def test_a_job_that_deschedules_itself_or_a_batch_mate_cancels_neither(how):
    mate = djasync.schedule(jobs.write_ledger, args=["mate"]).pk
    itself = djasync.schedule(finish_jobs.deschedule_then_write, priority=2,
                              args=["itself", "tests.finish_jobs.deschedule_then_write",
                                    ["itself", "tests.finish_jobs.deschedule_then_write"]]).pk
    other = djasync.schedule(finish_jobs.deschedule_then_write, priority=1,
                             args=["other", "tests.jobs.write_ledger", ["mate"]]).pk
    run_one_batch_of(3, how)
    assert notes() == {"itself": ["0"], "other": ["0"], "mate": [""]}
    assert [status(i) for i in (itself, other, mate)] == [Status.SUCCEEDED] * 3


@pytest.mark.parametrize("how", HOW)
def test_retry_now_on_a_batch_mate_leaves_it_alone(how):
    mate = djasync.schedule(jobs.write_ledger, args=["mate"]).pk
    djasync.schedule(finish_jobs.retry_jobs, args=["retrier", [mate]], priority=1)
    run_one_batch_of(2, how)
    assert notes() == {"retrier": ["0"], "mate": [""]}
    assert status(mate) == Status.SUCCEEDED
    assert Job.objects.get(pk=mate).attempt_set.count() == 1


@pytest.mark.parametrize("how", HOW)
def test_calling_a_batch_mate_is_refused_as_it_is_running_and_it_runs_once(how):
    mate = djasync.schedule(jobs.write_ledger, args=["mate"]).pk
    djasync.schedule(finish_jobs.call_job, args=["caller", mate], priority=1)
    run_one_batch_of(2, how)
    found = notes()
    assert found["mate"] == [""], found  # once
    assert found["caller"][0].startswith("refused:") and "running" in found["caller"][0]
    assert status(mate) == Status.SUCCEEDED
    assert Job.objects.get(pk=mate).attempt_set.count() == 1


def test_once_the_batch_has_committed_its_jobs_can_be_cancelled_again():
    djasync.schedule(jobs.write_ledger, args=["first"])
    executor.run_batches(3, lambda batch: True)
    assert executor.running_here() == frozenset()
    later = djasync.schedule(jobs.write_ledger, args=["later"]).pk
    assert scheduling.cancel([later]) == 1


@pytest.mark.daemon
def test_the_daemon_with_batches_never_runs_a_job_its_batch_mate_cancelled_successfully():
    """--batch-size 3: each canceller is claimed with the jobs it cancels. A cancel that
    reports success must mean the job never runs; one that runs must have been refused."""
    for n in range(4):
        mates = [djasync.schedule(jobs.write_ledger, args=[f"mate-{n}-{i}"]).pk
                 for i in range(2)]
        djasync.schedule(finish_jobs.cancel_jobs, args=[f"canceller-{n}", mates],
                         priority=1, run_after=None)
        djasync.schedule(finish_jobs.cancel_self, args=[f"self-{n}"])
    result = run_worker("--concurrency", "1", "--batch-size", "3", "--burst", timeout=120)
    assert result.returncode == 0, result.stderr
    found = notes()
    for n in range(4):
        cancelled = int(found[f"canceller-{n}"][0])
        mates = Job.objects.filter(args__0__startswith=f"mate-{n}-")
        ran = [found.get(job.args[0], []) for job in mates]
        # Each mate either ran once and succeeded, or was cancelled and never ran.
        assert sum(1 for r in ran if not r) == cancelled
        assert all(len(r) <= 1 for r in ran)
        assert sorted(job.status for job in mates) == sorted(
            [Status.CANCELLED] * cancelled + [Status.SUCCEEDED] * (2 - cancelled))
        assert found[f"self-{n}"] == ["0"]
    assert not Job.objects.filter(status=Status.CANCELLED,
                                  name="tests.finish_jobs.cancel_self").exists()
