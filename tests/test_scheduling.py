"""schedule(): the job row is written in the caller's transaction, validated first."""

import datetime
import decimal
import uuid

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

import djasync
from djasync import executor
from djasync.exceptions import ForbiddenFunction, FunctionNotFound
from djasync.models import Job, Status, identity_of
from tests import jobs

pytestmark = pytest.mark.django_db(transaction=True)


def count_pending_seen_by(conn) -> int:
    return conn.execute("SELECT count(*) FROM djasync_job WHERE status = 'pending'").fetchone()[0]


def test_a_job_scheduled_in_a_rolled_back_transaction_never_exists():
    with pytest.raises(RuntimeError), transaction.atomic():
        djasync.schedule(jobs.add, args=[1, 2])
        assert Job.objects.count() == 1  # visible inside the transaction
        raise RuntimeError("request failed")
    assert Job.objects.count() == 0


def test_a_second_connection_sees_the_job_only_after_commit(other_connection):
    with transaction.atomic():
        djasync.schedule(jobs.add, args=[1, 2])
        assert count_pending_seen_by(other_connection) == 0
    assert count_pending_seen_by(other_connection) == 1


def test_the_notify_is_delivered_at_commit_and_not_on_rollback(other_connection):
    other_connection.execute("LISTEN djasync")
    with pytest.raises(RuntimeError), transaction.atomic():
        djasync.schedule(jobs.add, args=[1, 2], queue="rolled")
        raise RuntimeError
    with transaction.atomic():
        djasync.schedule(jobs.add, args=[1, 2], queue="mail")
        assert list(other_connection.notifies(timeout=0.2, stop_after=1)) == []
    received = list(other_connection.notifies(timeout=5, stop_after=1))
    assert [(n.channel, n.payload) for n in received] == [("djasync", "mail")]


def test_outside_a_transaction_schedule_commits_at_once_and_notifies(other_connection):
    """Autocommit: one statement, its own transaction; the NOTIFY comes with its commit."""
    other_connection.execute("LISTEN djasync")
    djasync.schedule_many([djasync.JobSpec(jobs.add, [1, 2], queue="mail"),
                           djasync.JobSpec(jobs.add, [3, 4], queue="sms")])
    assert not connection.in_atomic_block
    assert count_pending_seen_by(other_connection) == 2
    received = list(other_connection.notifies(timeout=5, stop_after=2))
    assert sorted(n.payload for n in received) == ["mail", "sms"]


def test_schedule_stores_name_arguments_and_defaults():
    job = djasync.schedule("tests.jobs.add", args=(1, 2), kwargs=None)
    job.refresh_from_db()
    assert (job.name, job.args, job.kwargs, job.queue, job.priority, job.status) == (
        "tests.jobs.add", [1, 2], {}, "default", 0, Status.PENDING)
    assert job.identity == identity_of("tests.jobs.add", [1, 2], {})
    assert abs((job.run_after - timezone.now()).total_seconds()) < 5


def test_a_callable_is_stored_by_its_dotted_name_including_classmethods():
    assert djasync.schedule(jobs.echo).name == "tests.jobs.echo"
    assert djasync.schedule(jobs.Maths.double, args=[2]).name == "tests.jobs.Maths.double"


def test_dates_decimals_and_uuids_are_stored_through_djangos_encoder():
    value = uuid.UUID(int=5)
    job = djasync.schedule(jobs.echo, args=[decimal.Decimal("1.5"), value],
                           kwargs={"when": datetime.date(2024, 2, 3)})
    job.refresh_from_db()
    assert job.args == ["1.5", str(value)]
    assert job.kwargs == {"when": "2024-02-03"}


def test_a_non_json_argument_is_refused_with_its_name():
    with pytest.raises(TypeError, match=r"kwargs\['conn'\] \(object\)"):
        djasync.schedule(jobs.echo, kwargs={"conn": object()})
    with pytest.raises(TypeError, match=r"args\[1\] \(set\)"):
        djasync.schedule(jobs.echo, args=[1, {2}])
    assert Job.objects.count() == 0


@pytest.mark.parametrize("bad, error", [
    ({"retries": 3}, "unknown meta key"),
    ({"max_attempts": 0}, "max_attempts"),
    ({"timeout": -1}, "timeout"),
    ({"atomic": "no"}, "must be True or False"),
    ("x", "must be a dict"),
])
def test_bad_meta_is_refused(bad, error):
    with pytest.raises((ValueError, TypeError), match=error):
        djasync.schedule(jobs.add, args=[1, 2], meta=bad)


def test_unknown_meta_key_lists_the_known_ones():
    with pytest.raises(ValueError, match="max_attempts.*timeout.*atomic.*backoff"):
        djasync.schedule(jobs.add, meta={"retry": 1})


@pytest.mark.parametrize("backoff, error", [
    (-1, r"meta\['backoff'\] must be a number of seconds in \[0, 2592000\]"),
    (30 * 86400 + 1, r"meta\['backoff'\] must be a number of seconds"),
    (float("nan"), r"meta\['backoff'\] must be a number of seconds"),
    (False, r"meta\['backoff'\] must be a number of seconds"),
    ([1, 2], r"meta\['backoff'\] must be a number of seconds"),
    ("tests.jobs.hourly_backoff", r"belongs in the DJASYNC\['BACKOFF'\] setting"),
    ({}, r"or a dict \{'base': seconds"),
    ({"max": 60}, r"or a dict \{'base': seconds"),
    ({"base": 1, "cap": 60}, r"or a dict \{'base': seconds"),
    ({"base": "1"}, r"meta\['backoff'\]\['base'\] must be a number in \[0, 2592000\]"),
    ({"base": 1, "factor": 0}, r"meta\['backoff'\]\['factor'\] must be a number in \[1, 100\]"),
    ({"base": 1, "factor": float("inf")}, r"meta\['backoff'\]\['factor'\]"),
    ({"base": 1, "max": -1}, r"meta\['backoff'\]\['max'\]"),
])
def test_a_bad_backoff_in_meta_is_refused_and_nothing_is_written(backoff, error):
    with pytest.raises(ValueError, match=error):
        djasync.schedule(jobs.always_raise, meta={"backoff": backoff})
    assert not Job.objects.exists()


@pytest.mark.parametrize("backoff, delays", [
    (90, [90, 90, 90]),
    (0, [0, 0, 0]),
    ({"base": 60}, [60, 120, 240]),  # factor 2 by default
    ({"base": 60, "factor": 10, "max": 3600}, [60, 600, 3600]),
    ({"base": 2, "factor": 1.5, "max": 1e6}, [2, 3, 4.5]),
])
def test_a_backoff_in_meta_sets_when_each_retry_runs(backoff, delays):
    with override_settings(DJASYNC={}):  # the default 60·n^1.6, which meta overrides
        job = djasync.schedule(jobs.always_raise, meta={"backoff": backoff, "max_attempts": 4})
        seen = retry_delays(job, len(delays))
    assert seen == pytest.approx(delays, abs=0.5)


def retry_delays(job, count):
    """Fail the job ``count`` times; return the seconds each retry was put off by."""
    seen = []
    for _ in range(count):
        job.refresh_from_db()
        [finished] = executor.run_batch(now=job.run_after)
        failed_at = timezone.now()
        job.refresh_from_db()
        assert (finished.status, finished.run_after) == (Status.PENDING, job.run_after)
        # The stored run_after is the failure's time plus the delay (the attempt takes ms).
        seen.append((job.run_after - failed_at).total_seconds())
    return seen


def test_a_huge_backoff_power_is_capped_at_its_max_instead_of_overflowing():
    from djasync.validation import backoff_seconds

    assert backoff_seconds({"base": 1, "factor": 100, "max": 7}, 1000) == 7.0
    assert backoff_seconds({"base": 1, "factor": 100}, 1000) == 30 * 86400
    assert backoff_seconds({"base": 0, "factor": 100}, 1000) == 0.0


def test_a_hand_written_row_with_a_bad_backoff_fails_for_good():
    job = djasync.schedule(jobs.always_raise)
    Job.objects.filter(pk=job.pk).update(meta={"backoff": "os.system"})
    [finished] = executor.run_batch()
    assert finished.status == Status.FAILED and "bad meta" in finished.error


def test_run_after_accepts_aware_datetimes_and_timedeltas_and_refuses_naive_ones():
    soon = djasync.schedule(jobs.add, args=[1, 1], run_after=datetime.timedelta(hours=1))
    assert soon.run_after > timezone.now() + datetime.timedelta(minutes=59)
    at = timezone.now() + datetime.timedelta(days=2)
    assert djasync.schedule(jobs.add, args=[1, 1], run_after=at).run_after == at
    with pytest.raises(ValueError, match="naive datetime"):
        djasync.schedule(jobs.add, run_after=datetime.datetime(2030, 1, 1))
    with pytest.raises(TypeError, match="run_after"):
        djasync.schedule(jobs.add, run_after="tomorrow")


@pytest.mark.parametrize("priority, error", [(101, ValueError), (-101, ValueError),
                                             ("1", TypeError), (True, TypeError)])
def test_priority_outside_its_range_is_refused(priority, error):
    with pytest.raises(error):
        djasync.schedule(jobs.add, priority=priority)


@pytest.mark.parametrize("queue", ["", " x", "a" * 101, "bad queue", None.__class__.__name__ + "!"])
def test_bad_queue_names_are_refused(queue):
    with pytest.raises(ValueError, match="queue name"):
        djasync.schedule(jobs.add, queue=queue)


@pytest.mark.parametrize("name, error", [
    ("os.system", ForbiddenFunction),
    ("subprocess.run", ForbiddenFunction),
    ("builtins.eval", ForbiddenFunction),
    ("print", ForbiddenFunction),
    ("tests.jobs.missing", FunctionNotFound),
    ("tests.jobs._private", ForbiddenFunction),
    ("tests.jobs.os.system", ForbiddenFunction),
    ("tests.nosuchmodule.f", FunctionNotFound),
])
def test_a_name_that_is_not_an_allowed_callable_is_refused(name, error):
    with pytest.raises(error):
        djasync.schedule(name)
    assert Job.objects.count() == 0


def test_lambdas_cannot_be_scheduled():
    with pytest.raises(ForbiddenFunction, match="module-level function"):
        djasync.schedule(lambda: 1)


def test_schedule_many_inserts_all_jobs_or_none():
    created = djasync.schedule_many([djasync.JobSpec(jobs.add, [i, i]) for i in range(50)])
    assert len({job.pk for job in created}) == 50
    assert Job.objects.count() == 50
    with pytest.raises(TypeError):
        djasync.schedule_many([djasync.JobSpec(jobs.add, [1, 1]),
                               djasync.JobSpec(jobs.add, [object()])])
    assert Job.objects.count() == 50


def test_deschedule_cancels_matching_pending_jobs_only():
    target = djasync.schedule(jobs.add, args=[1, 2])
    other_args = djasync.schedule(jobs.add, args=[2, 1])
    done = djasync.schedule(jobs.add, args=[1, 2])
    Job.objects.filter(pk=done.pk).update(status=Status.SUCCEEDED)
    assert djasync.deschedule("tests.jobs.add", args=[1, 2]) == 1
    statuses = dict(Job.objects.values_list("pk", "status"))
    assert statuses == {target.pk: Status.CANCELLED, other_args.pk: Status.PENDING,
                        done.pk: Status.SUCCEEDED}


def test_deschedule_matches_kwargs_whatever_their_order():
    djasync.schedule(jobs.echo, kwargs={"a": 1, "b": 2})
    assert djasync.deschedule(jobs.echo, kwargs={"b": 2, "a": 1}) == 1


# -- many jobs at once: written with COPY (djasync.scheduling.COPY_FROM and more) ----------

TRICKY = ["tab\there", "new\nline", "back\\slash \\N", "quote ' \" ", "é ü 🎉", "", "\\.", "\r"]


def many_specs(n, **options):
    return [djasync.JobSpec(jobs.echo, [i, TRICKY[i % len(TRICKY)]],
                            {"k": TRICKY[(i + 3) % len(TRICKY)]},
                            queue=("mail", "sms", "default")[i % 3], priority=i % 7 - 3,
                            **options) for i in range(n)]


def test_many_jobs_are_stored_exactly_in_order_with_one_notify_per_queue(other_connection):
    from djasync.scheduling import COPY_FROM

    n = COPY_FROM + 50
    other_connection.execute("LISTEN djasync")
    created = djasync.schedule_many(many_specs(n, meta={"max_attempts": 2}))
    assert not connection.in_atomic_block
    assert count_pending_seen_by(other_connection) == n  # committed
    ids = [job.pk for job in created]
    assert ids == sorted(ids) and len(set(ids)) == n  # ids increase in the order given
    stored = {job.pk: job for job in Job.objects.all()}
    for i, job in enumerate(created):
        row = stored[job.pk]
        assert (row.name, row.args, row.kwargs, row.meta, row.queue, row.priority) == (
            "tests.jobs.echo", [i, TRICKY[i % len(TRICKY)]], {"k": TRICKY[(i + 3) % len(TRICKY)]},
            {"max_attempts": 2}, ("mail", "sms", "default")[i % 3], i % 7 - 3)
        assert (row.status, row.attempts, row.identity, row.run_after, row.created_at) == (
            Status.PENDING, 0, job.identity, job.run_after, job.created_at)
        assert not job._state.adding
    received = list(other_connection.notifies(timeout=5, stop_after=3))
    assert sorted(n.payload for n in received) == ["default", "mail", "sms"]
    assert list(other_connection.notifies(timeout=0.2, stop_after=1)) == []
    # And the worker runs them as written.
    finished = executor.drain(max_jobs=len(TRICKY))
    assert [f.result for f in finished] == [
        {"args": [i, TRICKY[i % len(TRICKY)]], "kwargs": {"k": TRICKY[(i + 3) % len(TRICKY)]}}
        for i in sorted(range(n), key=lambda i: (-(i % 7 - 3), i))[:len(TRICKY)]]


def test_many_jobs_in_a_rolled_back_transaction_leave_nothing_and_wake_nobody(
        other_connection):
    from djasync.scheduling import COPY_FROM

    other_connection.execute("LISTEN djasync")
    with pytest.raises(RuntimeError), transaction.atomic():
        djasync.schedule_many(many_specs(COPY_FROM))
        assert count_pending_seen_by(other_connection) == 0  # not before the commit
        raise RuntimeError
    assert Job.objects.count() == 0
    assert list(other_connection.notifies(timeout=0.3, stop_after=1)) == []


def test_many_jobs_mixing_groups_and_unique_keys(other_connection):
    from djasync.scheduling import COPY_FROM

    existing = djasync.schedule(jobs.add, args=[0, 0], unique="only-one")
    specs = [*many_specs(COPY_FROM, group="batch-7"),
             djasync.JobSpec(jobs.add, [1, 1], unique="only-one"),
             djasync.JobSpec(jobs.add, [2, 2], unique="another")]
    created = djasync.schedule_many(specs)
    assert created[-2].pk == existing.pk  # the pending holder of the key is returned
    grouped = Job.objects.filter(group__reference="batch-7")
    assert grouped.count() == COPY_FROM
    assert set(grouped.values_list("pk", flat=True)) == {job.pk for job in created[:COPY_FROM]}
    assert Job.objects.filter(unique_key="another").count() == 1
    assert count_pending_seen_by(other_connection) == COPY_FROM + 2


def test_schedules_docstring_documents_every_meta_key():
    from djasync.validation import META_KEYS

    doc = djasync.schedule.__doc__ or ""
    assert [key for key in META_KEYS if f"``{key}``" not in doc] == []
