"""The worker table: a row per daemon start, deleted once it stopped long enough ago."""

import datetime

import pytest
from django.utils import timezone

from djasync import workers
from djasync.models import Worker

pytestmark = pytest.mark.django_db(transaction=True)


def worker(name: str, *, stopped_days_ago: float | None = None,
           seen_days_ago: float = 0) -> Worker:
    now = timezone.now()
    return Worker.objects.create(
        name=name, hostname="h", pid=1, concurrency=1,
        last_seen=now - datetime.timedelta(days=seen_days_ago),
        stopped_at=(None if stopped_days_ago is None
                    else now - datetime.timedelta(days=stopped_days_ago)))


def names() -> list[str]:
    return sorted(Worker.objects.values_list("name", flat=True))


def test_a_daemon_start_deletes_the_rows_of_daemons_stopped_over_a_week_ago():
    worker("old", stopped_days_ago=8, seen_days_ago=8)
    worker("recent", stopped_days_ago=2, seen_days_ago=2)
    worker("alive")
    workers.register("new", hostname="h", pid=2, concurrency=1, queues=[])
    assert names() == ["alive", "new", "recent"]


def test_prune_stopped_keeps_live_and_recently_silent_rows_and_unmarked_flush_queue_runs():
    worker("stopped", stopped_days_ago=0.5, seen_days_ago=0.5)
    worker("killed-long-ago", seen_days_ago=3)        # never marked stopped
    worker("frozen-for-hours", seen_days_ago=0.2)     # may wake up: kept a day at least
    worker(f"{workers.IN_PROCESS_PREFIX}h:1/x", seen_days_ago=3)  # charged first, then pruned
    worker("alive")
    assert workers.prune_stopped(datetime.timedelta(0)) == 2
    assert names() == ["alive", "flush_queue@h:1/x", "frozen-for-hours"]


def test_many_daemon_starts_leave_the_table_no_bigger_than_the_retention_allows():
    for i in range(5):
        worker(f"w{i}", stopped_days_ago=30 + i, seen_days_ago=30 + i)
    workers.register("w-new", hostname="h", pid=2, concurrency=1, queues=[])
    assert names() == ["w-new"]
