"""Unique jobs: at most one pending job per key, enforced by PostgreSQL."""

import threading

import pytest
from django.db import connection

import djasync
from djasync import executor
from djasync.models import Job, Status
from tests import jobs

pytestmark = pytest.mark.django_db(transaction=True)


def test_scheduling_a_unique_job_twice_returns_the_pending_one():
    first = djasync.schedule(jobs.add, args=[1, 2], unique=True)
    again = djasync.schedule(jobs.add, args=[1, 2], unique=True)
    other = djasync.schedule(jobs.add, args=[2, 1], unique=True)
    assert again.pk == first.pk and other.pk != first.pk
    assert Job.objects.count() == 2


def test_a_key_names_the_uniqueness_whatever_the_arguments():
    first = djasync.schedule(jobs.add, args=[1, 2], unique="sync-user-7")
    assert djasync.schedule(jobs.echo, args=["x"], unique="sync-user-7").pk == first.pk


def test_once_the_job_has_run_the_key_is_free_again():
    first = djasync.schedule(jobs.add, args=[1, 2], unique=True)
    executor.run_batch()
    assert Job.objects.get(pk=first.pk).status == Status.SUCCEEDED
    second = djasync.schedule(jobs.add, args=[1, 2], unique=True)
    assert second.pk != first.pk and second.status == Status.PENDING


def test_non_unique_jobs_are_not_affected():
    djasync.schedule(jobs.add, args=[1, 2], unique=True)
    djasync.schedule(jobs.add, args=[1, 2])
    assert Job.objects.count() == 2


def test_concurrent_schedulers_of_the_same_key_end_with_one_job(other_connection):
    with other_connection.transaction():
        (held,) = other_connection.execute(
            "INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, "
            "status, attempts, identity, created_at, worker, unique_key) VALUES "
            "('tests.jobs.add', '[1, 2]', '{}', '{}', 'default', 0, now(), 'pending', 0, '', "
            "now(), '', 'race') RETURNING id").fetchone()
        result: dict = {}

        def schedule_in_another_thread():
            try:
                result["job"] = djasync.schedule(jobs.add, args=[9, 9], unique="race")
            finally:
                connection.close()

        thread = threading.Thread(target=schedule_in_another_thread)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive()  # PostgreSQL makes it wait for the first insert's fate
    thread.join(timeout=20)
    assert result["job"].pk == held
    assert Job.objects.filter(unique_key="race").count() == 1


@pytest.mark.parametrize("bad", ["", "k" * 256, 5])
def test_a_bad_unique_key_is_refused(bad):
    with pytest.raises(ValueError, match="unique"):
        djasync.schedule(jobs.add, args=[1, 2], unique=bad)
