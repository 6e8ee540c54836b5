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


def test_the_heartbeat_writes_a_deleted_row_again_when_asked():
    row = workers.register("w-gone", hostname="h", pid=7, concurrency=3, queues=["a"])
    again = {"hostname": "h", "pid": 7, "concurrency": 3, "queues": ["a"],
             "started_at": row.started_at}
    Worker.objects.filter(name="w-gone").delete()
    workers.heartbeat("w-gone", running=[], jobs_done=4)  # without ``again``: nothing
    assert not Worker.objects.filter(name="w-gone").exists()
    workers.heartbeat("w-gone", running=[5], jobs_done=4, again=again)
    back = Worker.objects.get(name="w-gone")
    assert (back.hostname, back.pid, back.concurrency, back.queues, back.started_at,
            back.running, back.jobs_done, back.stopped_at) == (
        "h", 7, 3, ["a"], row.started_at, [5], 4, None)


@pytest.mark.daemon
def test_a_running_daemon_whose_row_is_deleted_registers_again(tmp_path):
    """Deleted by hand, or by a prune that took the daemon for dead: the next heartbeat
    writes the row again, so that queue_health, the admin and other daemons see it."""
    from tests.daemon import start_worker, stop, wait_for

    log = tmp_path / "worker.log"
    worker = start_worker("--concurrency", "2", "--queue", "q1", log=log)
    try:
        first = wait_for(lambda: Worker.objects.filter(pid=worker.pid).first(),
                         what="the worker's row")
        Worker.objects.filter(pk=first.pk).delete()
        again = wait_for(lambda: Worker.objects.filter(name=first.name).first(),
                         timeout=workers.HEARTBEAT_SECONDS * 3, what="the row written again",
                         interval=0.1)
        assert (again.pid, again.hostname, again.concurrency, again.queues, again.started_at,
                again.stopped_at) == (worker.pid, first.hostname, 2, ["q1"], first.started_at,
                                      None)
        assert "this worker's row was gone" in log.read_text()
    finally:
        assert stop(worker) == 0, log.read_text()[-3000:]
    assert Worker.objects.get(name=first.name).stopped_at is not None  # and marked stopped
