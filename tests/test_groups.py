"""Groups: fill, then run; a final job runs once every other job of the group is finished."""

import datetime

import pytest
from django.core.exceptions import ValidationError

import djasync
from djasync import executor
from djasync.exceptions import GroupClosed, GroupInUse
from djasync.models import Group, Job, Status
from djasync.scheduling import create_group
from tests import jobs

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_final_job_waits_until_every_other_job_of_the_group_is_finished():
    members = [djasync.schedule(jobs.add, args=[i, i], group="nightly") for i in range(3)]
    group = members[0].group
    assert all(job.group_id == group.pk for job in members)
    final = group.on_completion(djasync.schedule(jobs.echo, args=["all done"], priority=100))
    # Highest priority, yet it must not run before the members.
    order = [f.job_id for f in executor.drain()]
    assert order[-1] == final.pk and sorted(order[:-1]) == sorted(j.pk for j in members)


def test_a_failed_or_cancelled_member_still_completes_the_group():
    failing = djasync.schedule(jobs.always_raise, group="g", meta={"max_attempts": 1})
    cancelled = djasync.schedule(jobs.add, args=[1, 1], group="g")
    final = failing.group.on_completion(djasync.schedule(jobs.echo))
    djasync.deschedule(jobs.add, args=[1, 1])
    executor.drain()
    statuses = dict(Job.objects.values_list("pk", "status"))
    assert statuses == {failing.pk: Status.FAILED, cancelled.pk: Status.CANCELLED,
                        final.pk: Status.SUCCEEDED}


def test_a_running_group_takes_no_new_jobs_and_a_completed_one_starts_a_new_generation():
    first = djasync.schedule(jobs.add, args=[1, 1], group="batch")
    djasync.schedule(jobs.add, args=[2, 2], group="batch")
    executor.run_batch(1)  # one member finished, one pending: the group is running
    with pytest.raises(GroupClosed):
        djasync.schedule(jobs.add, args=[3, 3], group="batch")
    executor.drain()
    again = djasync.schedule(jobs.add, args=[4, 4], group="batch")
    assert again.group_id != first.group_id
    assert Group.objects.filter(reference="batch").count() == 2


def test_a_new_generation_cannot_be_created_while_one_is_unfinished():
    djasync.schedule(jobs.add, args=[1, 1], group="ref")
    with pytest.raises(GroupInUse):
        create_group("ref")


def test_group_progress_counts_members_by_status():
    a = djasync.schedule(jobs.add, args=[1, 1], group="p")
    djasync.schedule(jobs.always_raise, group="p", meta={"max_attempts": 1})
    djasync.schedule(jobs.add, args=[2, 2], group="p", run_after=datetime.timedelta(days=1))
    executor.drain()
    progress = Group.objects.get(pk=a.group_id).progress()
    assert (progress["total"], progress["succeeded"], progress["failed"], progress["pending"]) == (
        3, 1, 1, 1)
    assert not a.group.has_completed()


# -- the rules of django-async's models, kept on the ORM's path ----------------------------------


def test_a_group_created_with_its_final_job_holds_it_back_until_every_member_finished():
    final = djasync.schedule(jobs.echo, args=["all done"], priority=100)
    group = Group.objects.create(reference="made-first", final=final)
    members = [djasync.schedule(jobs.add, args=[i, i], group=group) for i in range(2)]
    members.append(djasync.schedule(jobs.add, args=[9, 9], group="made-first"))
    assert Job.objects.get(pk=final.pk).group_id == group.pk
    order = [f.job_id for f in executor.drain()]
    assert order[-1] == final.pk and sorted(order[:-1]) == sorted(j.pk for j in members)


def test_a_final_job_of_another_group_is_refused():
    member = djasync.schedule(jobs.add, args=[1, 1], group="one")
    with pytest.raises(ValidationError, match="belongs to group"):
        Group.objects.create(reference="two", final=member)
    assert not Group.objects.filter(reference="two").exists()


def test_creating_a_group_while_the_newest_of_its_reference_has_pending_jobs_is_refused():
    djasync.schedule(jobs.add, args=[1, 1], group="ref")
    with pytest.raises(ValidationError, match="still has pending jobs") as refused:
        Group.objects.create(reference="ref")
    assert isinstance(refused.value, GroupInUse)
    with pytest.raises(ValidationError):
        Group(reference="ref").full_clean()
    executor.drain()
    Group.objects.create(reference="ref")  # every job finished: a new generation may start
    assert Group.objects.filter(reference="ref").count() == 2


def test_putting_a_job_into_a_group_that_started_running_is_refused_by_save_and_full_clean():
    first = djasync.schedule(jobs.add, args=[1, 1], group="batch")
    djasync.schedule(jobs.add, args=[2, 2], group="batch")
    executor.run_batch(1)  # one member finished: the group is running
    late = djasync.schedule(jobs.add, args=[3, 3])
    late.group = first.group
    with pytest.raises(ValidationError, match="has started running") as refused:
        late.full_clean()
    assert "__all__" in refused.value.message_dict
    with pytest.raises(GroupClosed):
        late.save()
    assert Job.objects.get(pk=late.pk).group_id is None


def test_a_job_saved_in_a_group_that_has_not_started_is_accepted_and_so_is_a_resave():
    member = djasync.schedule(jobs.add, args=[1, 1], group="open")
    other = djasync.schedule(jobs.add, args=[2, 2])
    other.group = member.group
    other.full_clean()
    other.save()
    executor.drain()
    member = Job.objects.get(pk=member.pk)  # finished, in a now complete group
    member.priority = 5
    member.save()  # it keeps its group: nothing to check


@pytest.mark.parametrize("by", ["reference", "group"])
def test_a_group_whose_long_final_job_is_running_takes_no_new_job(tmp_path, by):
    """A long final job (``atomic: False``) runs under a lease, with no row lock to wait for:
    a job added to its group while it ran was accepted, and ran after the final job (whose
    group was then complete before it). It must be refused as for an atomic final job."""
    import threading

    from django.db import connection

    gate, pidfile = tmp_path / "gate", tmp_path / "pid"
    group = create_group("solo")
    final = group.on_completion(djasync.schedule(
        jobs.long_job, ["final", str(gate), str(pidfile)], meta={"atomic": False}))
    ran: list = []

    def worker():
        try:
            ran.extend(executor.run_batch())
        finally:
            connection.close()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=60)
        while not pidfile.exists():
            assert datetime.datetime.now() < deadline, "the final job did not start"
            thread.join(0.05)
        with pytest.raises(GroupClosed):
            djasync.schedule(jobs.echo, ["late"], group="solo" if by == "reference" else group)
    finally:
        gate.touch()
        thread.join(60)
    assert [f.job_id for f in ran] == [final.pk]
    assert list(Job.objects.filter(group=group).values_list("pk", "status")) == [
        (final.pk, Status.SUCCEEDED)]


def test_a_group_whose_long_final_job_lost_its_run_takes_no_new_job():
    """The final job's run was cut off (its worker froze or died; its lease ran out) after
    committing part of its work: the group has started running. A job added then ran after
    that part of the final's work (found by the model-based test)."""
    from django.utils import timezone

    group = create_group("lost")
    final = group.on_completion(djasync.schedule(jobs.long_job, ["final"],
                                                 meta={"atomic": False}))
    Job.objects.filter(pk=final.pk).update(
        lease_owner="lost-host:1/abc",
        lease_expires=timezone.now() - datetime.timedelta(seconds=1))
    for target in ("lost", group):
        with pytest.raises(GroupClosed):
            djasync.schedule(jobs.echo, ["late"], group=target)
    [finished] = executor.drain()
    assert finished.job_id == final.pk and finished.status == Status.SUCCEEDED
    assert list(Job.objects.filter(group=group).values_list("pk", flat=True)) == [final.pk]
