"""prune_jobs where it meets the application: rows of other apps that reference jobs.

Django's ``on_delete`` is honoured (CASCADE, SET_NULL, PROTECT, through attempts and groups too);
a job that something keeps (PROTECT, a foreign key Django does not know) is kept with a warning,
and never stops the others from being pruned, on this run or any later one.
"""

import datetime
import logging
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

import djasync
from djasync import pruning
from djasync.models import Attempt, Group, Job, Status
from tests import jobs
from tests.models import (
    AttemptReference,
    GroupGuard,
    JobGuard,
    JobNote,
    JobReference,
    ReferenceGuard,
)

pytestmark = pytest.mark.django_db(transaction=True)

MONTH = datetime.timedelta(days=30)


def _old_jobs(count: int, group: str | None = None, final: bool = False) -> list[Job]:
    """Run ``count`` jobs (and the group's final job) and make them look finished 40 days ago."""
    scheduled = [djasync.schedule(jobs.add, args=[i, i], group=group) for i in range(count)]
    if final:
        scheduled.append(scheduled[0].group.on_completion(djasync.schedule(jobs.echo)))
    call_command("flush_queue", stdout=StringIO(), stderr=StringIO())
    Job.objects.update(finished_at=timezone.now() - datetime.timedelta(days=40))
    assert set(Job.objects.values_list("status", flat=True)) == {Status.SUCCEEDED}
    return scheduled


@pytest.fixture(params=["foreign relations known", "no foreign relations"])
def path(request, monkeypatch):
    """Run a test through the ORM path and through the raw fast path."""
    if request.param == "no foreign relations":
        monkeypatch.setattr(pruning, "_foreign_relations", lambda: [])
    return request.param


def test_prune_deletes_old_jobs_with_their_attempts_and_emptied_groups(path):
    grouped = _old_jobs(2, group="g", final=True)
    single = djasync.schedule(jobs.add, args=[5, 5])
    assert pruning.prune(MONTH, batch_size=1) == 3
    assert list(Job.objects.values_list("pk", flat=True)) == [single.pk]
    assert not Attempt.objects.filter(job_id__in=[j.pk for j in grouped]).exists()
    assert Group.objects.count() == 0


def test_prune_deletes_the_application_rows_that_cascade_from_a_job():
    job, other = _old_jobs(2)
    JobReference.objects.create(job=job)
    AttemptReference.objects.create(attempt=Attempt.objects.get(job=other))
    assert pruning.prune(MONTH) == 2
    assert Job.objects.count() == 0
    assert JobReference.objects.count() == 0
    assert AttemptReference.objects.count() == 0


def test_prune_clears_a_set_null_reference_and_keeps_the_row():
    (job,) = _old_jobs(1)
    note = JobNote.objects.create(job=job)
    assert pruning.prune(MONTH) == 1
    note.refresh_from_db()
    assert note.job_id is None


def test_a_protected_job_is_kept_with_a_warning_and_the_others_are_pruned(caplog):
    kept, *others = _old_jobs(3)
    JobGuard.objects.create(job=kept)
    with caplog.at_level(logging.WARNING, logger="djasync.pruning"):
        assert pruning.prune(MONTH, batch_size=2) == 2
    assert list(Job.objects.values_list("pk", flat=True)) == [kept.pk]
    assert "1 old job" in caplog.text and "tests.JobGuard" in caplog.text
    assert pruning.prune(MONTH) == 0  # and again, without failing
    assert pruning.prune(MONTH, dry_run=True) == 0
    JobGuard.objects.all().delete()
    assert pruning.prune(MONTH) == 1


def test_a_job_protected_through_a_cascade_is_kept_and_the_batch_goes_on(caplog):
    old = _old_jobs(5)
    reference = JobReference.objects.create(job=old[2])
    ReferenceGuard.objects.create(reference=reference)
    with caplog.at_level(logging.WARNING, logger="djasync.pruning"):
        assert pruning.prune(MONTH, batch_size=2) == 4
        assert pruning.prune(MONTH, batch_size=2) == 0
    assert list(Job.objects.values_list("pk", flat=True)) == [old[2].pk]
    assert f"job={old[2].pk}" in caplog.text and "ReferenceGuard" in caplog.text


def test_a_protected_group_stays_while_its_jobs_are_pruned(caplog):
    _old_jobs(2, group="g")
    GroupGuard.objects.create(group=Group.objects.get())
    with caplog.at_level(logging.WARNING, logger="djasync.pruning"):
        assert pruning.prune(MONTH) == 2
    assert Job.objects.count() == 0
    assert Group.objects.count() == 1
    assert "GroupGuard" in caplog.text


def test_a_reference_django_does_not_know_keeps_only_its_own_job(path, caplog):
    old = _old_jobs(5)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE prune_outsider (job_id bigint NOT NULL"
                       " REFERENCES djasync_job (id) DEFERRABLE INITIALLY DEFERRED)")
        cursor.execute("INSERT INTO prune_outsider VALUES (%s)", [old[3].pk])
    try:
        with caplog.at_level(logging.WARNING, logger="djasync.pruning"):
            assert pruning.prune(MONTH, batch_size=2) == 4
            assert pruning.prune(MONTH, batch_size=2) == 0
        assert list(Job.objects.values_list("pk", flat=True)) == [old[3].pk]
        assert f"job={old[3].pk}" in caplog.text and "prune_outsider" in caplog.text
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE prune_outsider")


def test_prune_jobs_command_succeeds_when_a_job_is_protected():
    kept, _ = _old_jobs(2)
    JobGuard.objects.create(job=kept)
    out = StringIO()
    call_command("prune_jobs", "--older-than", "30", stdout=out, stderr=StringIO())
    assert "deleted 1 jobs" in out.getvalue()
