"""The write path where features meet: groups with running members, unique keys under
REPEATABLE READ, dropped connections, and a primary/replica router.

Each test plays the other side (a worker, another scheduler, the server) on a connection of its
own, and orders the steps by holding that connection's transaction open.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from django.core.signals import request_started
from django.db import close_old_connections, connection, connections, transaction
from django.test import override_settings

import djasync
from djasync import sql
from djasync.exceptions import DjasyncError, GroupClosed, GroupInUse, UniqueJobNotVisible
from djasync.models import Group, Job, Status
from djasync.scheduling import JobSpec, cancel, create_group
from tests import jobs
from tests.conftest import conninfo

pytestmark = pytest.mark.django_db(transaction=True)

#: The claim a worker sends (any queue, any function).
CLAIM = sql.claim(by_queue=False, by_name_prefix=False)


def claimable(conn: psycopg.Connection) -> list[int]:
    """The ids a worker claiming now would take (its transaction rolled back at once)."""
    with conn.transaction(force_rollback=True):
        rows = conn.execute(CLAIM.replace("LIMIT 1", "LIMIT 100"), {"now": None}).fetchall()
    return [row[0] for row in rows]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def waiting_on_a_lock(conn: psycopg.Connection) -> bool:
    """Whether some other session of this database is waiting for a row lock."""
    (count,) = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock'").fetchone()
    return bool(count)


class InThread:
    """Run ``function`` in a thread (with its own Django connection); keep its outcome."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = function()
            except BaseException as exc:
                self.error = exc
            finally:
                connection.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "the thread did not finish"


# Item 6: adding a member and a member finishing are serialised with the final's claim.

@pytest.mark.parametrize("by_reference", [False, True])
def test_a_member_added_while_the_only_other_member_runs_keeps_the_final_waiting(
        other_connection, by_reference):
    member = djasync.schedule(jobs.add, args=[1, 1], group="nightly")
    group = member.group
    final = group.on_completion(djasync.schedule(jobs.echo, args=["done"]))
    worker = other_connection
    worker.execute("BEGIN")  # a worker runs the member: its row locked, still pending
    assert worker.execute(CLAIM, {"now": None}).fetchone()[0] == member.pk
    with psycopg.connect(**conninfo(), autocommit=True) as second_worker:
        with transaction.atomic():
            added = djasync.schedule(jobs.add, args=[2, 2],
                                     group="nightly" if by_reference else group)
            assert added.group_id == group.pk
            # The member finishes while the added one is not committed yet.
            worker.execute("UPDATE djasync_job SET status = 'succeeded', finished_at = now()"
                           " WHERE id = %s", [member.pk])
            worker.execute("COMMIT")
            assert final.pk not in claimable(second_worker)
        assert claimable(second_worker) == [added.pk]  # the added member first, then the final


def test_a_member_added_while_the_final_runs_waits_for_it_and_is_refused(other_connection):
    group = create_group("solo")
    final = group.on_completion(djasync.schedule(jobs.echo, args=["done"]))
    worker = other_connection
    worker.execute("BEGIN")
    assert worker.execute(CLAIM, {"now": None}).fetchone()[0] == final.pk
    adding = InThread(lambda: djasync.schedule(jobs.add, args=[1, 1], group=group))
    with psycopg.connect(**conninfo(), autocommit=True) as observer:
        wait_until(lambda: waiting_on_a_lock(observer) or not adding.thread.is_alive(),
                   "the scheduler waits for the running final")
    worker.execute("UPDATE djasync_job SET status = 'succeeded', finished_at = now()"
                   " WHERE id = %s", [final.pk])
    worker.execute("COMMIT")
    adding.join()
    assert isinstance(adding.error, GroupClosed), adding.error or adding.result
    assert Job.objects.filter(group=group).count() == 1


def test_a_member_added_while_the_final_is_being_set_keeps_the_final_waiting(other_connection):
    member = djasync.schedule(jobs.add, args=[1, 1], group="nightly")
    group = member.group
    final = djasync.schedule(jobs.echo, args=["done"])
    worker = other_connection
    worker.execute("BEGIN")  # the member runs
    assert worker.execute(CLAIM, {"now": None}).fetchone()[0] == member.pk
    with psycopg.connect(**conninfo(), autocommit=True) as setter:
        setter.execute("BEGIN")  # another transaction makes ``final`` the group's final job
        setter.execute("UPDATE djasync_job SET group_id = %s WHERE id = %s", [group.pk, final.pk])
        setter.execute("UPDATE djasync_group SET final_id = %s WHERE id = %s",
                       [final.pk, group.pk])
        added_id: list[int] = []
        release = threading.Event()

        def add() -> None:
            with transaction.atomic():
                added_id.append(djasync.schedule(jobs.add, args=[2, 2], group=group).pk)
                release.wait(20)

        adding = InThread(add)
        with psycopg.connect(**conninfo(), autocommit=True) as observer:
            wait_until(lambda: waiting_on_a_lock(observer) or bool(added_id),
                       "the scheduler waits for the final job being set (or adds at once)")
        setter.execute("COMMIT")
        wait_until(lambda: bool(added_id), "the member is added")
        worker.execute("UPDATE djasync_job SET status = 'succeeded', finished_at = now()"
                       " WHERE id = %s", [member.pk])
        worker.execute("COMMIT")
        assert final.pk not in claimable(setter)
        release.set()
        adding.join()
        assert adding.error is None
        assert claimable(setter) == added_id


# Item 7: a unique key under REPEATABLE READ.

INSERT_HOLDER = (
    "INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, status,"
    " attempts, identity, created_at, worker, unique_key) VALUES ('tests.jobs.add', '[1, 2]',"
    " '{}', '{}', 'default', 0, now(), 'pending', 0, '', now(), '', %s) RETURNING id")


def begin(level: str) -> None:
    """Set this transaction's isolation level and take its snapshot."""
    with connection.cursor() as cursor:
        cursor.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
        cursor.execute("SELECT 1")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_unique_key_taken_after_the_snapshot_raises_under_repeatable_read(
        other_connection, level):
    with transaction.atomic():
        begin(level)
        other_connection.execute(INSERT_HOLDER, ["key"])
        with pytest.raises(UniqueJobNotVisible, match="'key'.*snapshot"):
            djasync.schedule(jobs.add, args=[3, 4], unique="key")
    assert Job.objects.filter(unique_key="key").count() == 1


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_unique_key_taken_before_the_snapshot_returns_its_job_under_repeatable_read(
        other_connection, level):
    (held,) = other_connection.execute(INSERT_HOLDER, ["key"]).fetchone()
    with transaction.atomic():
        begin(level)
        assert djasync.schedule(jobs.add, args=[3, 4], unique="key").pk == held


# Item 11: CONN_HEALTH_CHECKS.

@pytest.fixture
def health_checks(transactional_db: None) -> Iterator[None]:
    """CONN_HEALTH_CHECKS on, persistent connections (what health checks are for), and a
    request begun: Django checks the connection at its first use in the request."""
    saved = {key: connection.settings_dict[key] for key in ("CONN_HEALTH_CHECKS", "CONN_MAX_AGE")}
    connection.settings_dict.update(CONN_HEALTH_CHECKS=True, CONN_MAX_AGE=None)
    connection.close()
    connection.ensure_connection()
    try:
        request_started.send(sender=None)
        yield
    finally:
        connection.settings_dict.update(saved)
        connection.close()


def drop_django_connection(other: psycopg.Connection) -> None:
    pid = connection.connection.info.backend_pid
    other.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_until(lambda: not other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                         [pid]).fetchall(), "the server dropped the connection")


def test_an_orm_query_recovers_from_a_dropped_connection_with_health_checks(
        health_checks, other_connection):
    drop_django_connection(other_connection)
    assert Job.objects.count() == 0


@pytest.mark.parametrize("how", ["schedule", "schedule_many", "schedule_many_copy", "group",
                                 "unique"])
def test_scheduling_recovers_from_a_dropped_connection_with_health_checks(
        health_checks, other_connection, how):
    drop_django_connection(other_connection)
    if how == "schedule":
        djasync.schedule(jobs.add, args=[1, 1])
    elif how == "schedule_many":
        djasync.schedule_many([JobSpec(jobs.add, args=[i, i]) for i in range(3)])
    elif how == "schedule_many_copy":
        djasync.schedule_many([JobSpec(jobs.add, args=[i, i]) for i in range(300)])
    elif how == "group":
        djasync.schedule(jobs.add, args=[1, 1], group="g")
    else:
        djasync.schedule(jobs.add, args=[1, 1], unique=True)
    assert Job.objects.count() >= 1


def test_running_a_job_now_recovers_from_a_dropped_connection_with_health_checks(
        health_checks, other_connection):
    job = djasync.schedule(jobs.add, args=[1, 2])
    close_old_connections()  # a new request
    drop_django_connection(other_connection)
    assert job() == 3


# Item 12: Django's documented primary/replica router.

class PrimaryReplicaRouter:
    """The router of Django's multi-db documentation: reads from the replica."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "replica"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        return db == "default"


@pytest.fixture
def replica(transactional_db: None) -> Iterator[None]:
    """A "replica" alias on the test database, with a connection of its own (what
    ``TEST: {"MIRROR": "default"}`` gives a replica in tests), and the router that reads from
    it. Made here rather than in the settings, so no other test knows of it."""
    wrapper = connections["default"].__class__(dict(connections["default"].settings_dict),
                                               alias="replica")
    connections["replica"] = wrapper
    try:
        with override_settings(
                DATABASE_ROUTERS=[f"{__name__}.{PrimaryReplicaRouter.__qualname__}"]):
            yield
    finally:
        wrapper.close()
        del connections["replica"]


def test_a_group_reference_twice_in_one_transaction_is_one_group_with_a_replica(replica):
    with transaction.atomic():
        first = djasync.schedule(jobs.add, args=[1, 1], group="ref")
        second = djasync.schedule(jobs.add, args=[2, 2], group="ref")
        assert second.group_id == first.group_id
    assert Group.objects.using("default").count() == 1


def test_a_new_generation_is_refused_in_the_transaction_that_filled_one_with_a_replica(replica):
    with transaction.atomic():
        djasync.schedule(jobs.add, args=[1, 1], group="ref")
        with pytest.raises(GroupInUse):
            create_group("ref")


def test_a_group_that_started_in_this_transaction_is_closed_with_a_replica(replica):
    group = Group.objects.create(reference="g")
    with transaction.atomic():
        member = djasync.schedule(jobs.add, args=[1, 1], group=group)
        djasync.schedule(jobs.add, args=[2, 2], group=group)
        cancel([member.pk])  # a member finished, in this transaction
        with pytest.raises(GroupClosed):
            djasync.schedule(jobs.add, args=[3, 3], group=group)


@pytest.mark.timeout(30)
def test_a_unique_key_twice_in_one_transaction_is_one_job_with_a_replica(replica):
    with transaction.atomic():
        first = djasync.schedule(jobs.add, args=[1, 1], unique="key")
        assert djasync.schedule(jobs.add, args=[2, 2], unique="key").pk == first.pk


def test_group_progress_counts_uncommitted_members_of_a_group_read_from_the_primary(replica):
    with transaction.atomic():
        group = djasync.schedule(jobs.add, args=[1, 1], group="ref").group
        assert group.progress()[Status.PENDING] == 1
        assert not group.has_completed()


def test_job_call_on_a_job_scheduled_in_this_transaction_works_with_a_replica(replica):
    with transaction.atomic():
        job = djasync.schedule(jobs.add, args=[2, 3])
        assert job() == 5
        member = djasync.schedule(jobs.add, args=[1, 1], group="g")
        final = member.group.on_completion(djasync.schedule(jobs.add, args=[0, 0]))
        with pytest.raises(DjasyncError, match="other jobs of the group are pending"):
            final()
    assert Job.objects.using("default").get(pk=job.pk).status == Status.SUCCEEDED


# Siblings: a new generation made twice at once, and a bad job that wrote a group.

def test_two_transactions_starting_a_reference_at_once_make_one_group():
    result: dict[str, Any] = {}
    with transaction.atomic():
        mine = djasync.schedule(jobs.add, args=[1, 1], group="fresh")
        other = InThread(lambda: djasync.schedule(jobs.add, args=[2, 2], group="fresh"))
        with psycopg.connect(**conninfo(), autocommit=True) as observer:
            wait_until(lambda: waiting_on_a_lock(observer) or not other.thread.is_alive(),
                       "the other transaction waits to start the reference")
        result["mine"] = mine
    other.join()
    assert other.error is None
    assert other.result.group_id == result["mine"].group_id
    assert Group.objects.filter(reference="fresh").count() == 1


def test_a_bad_job_after_a_new_group_writes_no_group():
    with pytest.raises(ValueError):
        djasync.schedule_many([JobSpec(jobs.add, args=[1, 1], group="new"),
                               JobSpec(jobs.add, args=[2, 2], priority=1000)])
    assert not Group.objects.exists()
    assert not Job.objects.exists()


def test_a_refused_group_leaves_the_callers_transaction_usable():
    member = djasync.schedule(jobs.add, args=[1, 1], group="g")
    cancel([member.pk])
    with transaction.atomic():
        with pytest.raises(GroupClosed):
            djasync.schedule(jobs.add, args=[3, 3], group=Group.objects.get())
        assert djasync.schedule(jobs.add, args=[4, 4]).pk is not None
    assert Job.objects.count() == 2
