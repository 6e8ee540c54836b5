"""Periodic jobs: every slot enqueued exactly once, whatever the number of daemons."""

import datetime
import threading
import zoneinfo
from io import StringIO

import pytest
from cronsim import CronSim
from django.core import checks
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from djasync import conf, periodic, pruning
from djasync.exceptions import ImproperlyConfigured
from djasync.models import Job, PeriodicSlot, Status
from tests.daemon import start_worker, stop, wait_for, worker_env
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)

EVERY_MINUTE = {"cron": "* * * * *", "function": "tests.jobs.write_ledger",
                "args": ["tick"], "name": "ticker"}


def test_slots_follow_the_cron_expression():
    entry = periodic.parse([{"cron": "*/15 * * * *", "function": "tests.jobs.add"}])[0]
    now = datetime.datetime(2026, 1, 1, 10, 31, 20, tzinfo=datetime.UTC)
    assert entry.latest_slot(now) == datetime.datetime(2026, 1, 1, 10, 30, tzinfo=datetime.UTC)
    assert entry.next_slot(now) == datetime.datetime(2026, 1, 1, 10, 45, tzinfo=datetime.UTC)
    on_slot = datetime.datetime(2026, 1, 1, 10, 45, tzinfo=datetime.UTC)
    assert entry.latest_slot(on_slot) == on_slot


@pytest.mark.parametrize("bad, message", [
    ("nope", "must be a list"),
    ([{"cron": "* * *", "function": "tests.jobs.add"}], "bad cron"),
    ([{"function": "tests.jobs.add"}], "needs 'cron' and 'function'"),
    ([{"cron": "* * * * *", "function": "tests.jobs.add", "every": 5}], "unknown key"),
    ([{"cron": "* * * * *", "function": "tests.jobs.add"}] * 2, "used twice"),
])
def test_bad_periodic_settings_are_refused(bad, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        conf.load({"PERIODIC": bad})


def test_a_periodic_function_that_is_not_allowed_is_a_system_check_error():
    with override_settings(DJASYNC={"PERIODIC": [{"cron": "* * * * *", "function": "os.system"}]}):
        errors = [m for m in checks.run_checks() if m.id == "djasync.E004"]
    assert len(errors) == 1 and "os.system" in errors[0].msg


def test_a_slot_is_enqueued_once_even_when_many_schedulers_race():
    entry = periodic.parse([EVERY_MINUTE])[0]
    slot = entry.latest_slot(timezone.now())
    results = []

    def enqueue():
        from django.db import connection

        try:
            results.append(periodic.enqueue_slot(entry, slot))
        finally:
            connection.close()

    threads = [threading.Thread(target=enqueue) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == [False] * 7 + [True]
    assert Job.objects.filter(name="tests.jobs.write_ledger").count() == 1
    assert PeriodicSlot.objects.get().slot == slot


def test_at_start_only_the_latest_missed_slot_runs_once():
    scheduler = periodic.Scheduler(periodic.parse([EVERY_MINUTE]))
    now = timezone.now()
    scheduler.start(now)
    scheduler.start(now + datetime.timedelta(seconds=1))  # a restart in the same minute
    assert Job.objects.count() == 1
    later = now + datetime.timedelta(minutes=10)  # ten missed slots
    scheduler.start(later)
    assert Job.objects.count() == 2
    assert scheduler.tick(later) <= 60


def test_two_daemons_enqueue_each_slot_once_and_run_it(tmp_path):
    settings_file = tmp_path / "periodic_settings.py"
    settings_file.write_text(
        "from tests.settings import *  # noqa\n"
        "DJASYNC = {**DJASYNC, 'PERIODIC': [{'cron': '* * * * *', "
        "'function': 'tests.jobs.write_ledger', 'args': ['tick'], 'name': 'ticker'}]}\n"
    )
    env = worker_env(PYTHONPATH=f"{tmp_path}:{worker_env()['PYTHONPATH']}")
    daemons = [start_worker("--concurrency", "1", "--settings", "periodic_settings",
                            log=tmp_path / f"w{i}.log", env=env) for i in range(2)]
    try:
        wait_for(lambda: Job.objects.filter(name="tests.jobs.write_ledger",
                                            status=Status.SUCCEEDED).exists(),
                 timeout=30, what="the periodic job to run")
        for i in range(2):
            wait_for(lambda i=i: "worker ready" in (tmp_path / f"w{i}.log").read_text(),
                     what="both daemons ready")
        assert Job.objects.filter(name="tests.jobs.write_ledger").count() == 1
        assert PeriodicSlot.objects.filter(name="ticker").count() == 1
    finally:
        for daemon in daemons:
            assert stop(daemon) == 0


# -- periodic meets prune, USE_TZ = False and daylight saving time ---------------------------

MONTHLY = {"cron": "0 0 1 * *", "function": "tests.jobs.write_ledger", "args": ["monthly"],
           "name": "monthly"}
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def _flush() -> None:
    call_command("flush_queue", stdout=StringIO(), stderr=StringIO())


def _slots(name: str) -> list[datetime.datetime]:
    return list(PeriodicSlot.objects.filter(name=name).order_by("slot")
                .values_list("slot", flat=True))


def test_a_slot_older_than_the_prune_age_does_not_run_again_after_a_restart():
    march_31 = datetime.datetime(2026, 3, 31, 12, tzinfo=datetime.UTC)
    periodic.Scheduler(periodic.parse([MONTHLY])).start(march_31)
    _flush()
    Job.objects.update(finished_at=timezone.now() - datetime.timedelta(days=40))
    assert pruning.prune(datetime.timedelta(days=30)) == 1
    periodic.Scheduler(periodic.parse([MONTHLY])).start(march_31 + datetime.timedelta(hours=1))
    _flush()
    assert Ledger.objects.filter(key="monthly").count() == 1
    assert _slots("monthly") == [datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC)]


def test_prune_keeps_only_the_newest_slot_record_of_each_periodic_name():
    for month in (1, 2, 3):
        for name in ("monthly", "other"):
            PeriodicSlot.objects.create(
                name=name, slot=datetime.datetime(2026, month, 1, tzinfo=datetime.UTC))
    pruning.prune(datetime.timedelta(days=30))
    assert _slots("monthly") == [datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC)]
    assert _slots("other") == [datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC)]


def test_a_slot_at_or_before_the_newest_recorded_one_is_never_enqueued():
    entry = periodic.parse([MONTHLY])[0]
    april = datetime.datetime(2026, 4, 1, tzinfo=datetime.UTC)
    assert periodic.enqueue_slot(entry, april)
    # A daemon whose clock is behind, or whose tick came late, must not add the older slot:
    # only the most recent missed slot runs.
    assert not periodic.enqueue_slot(entry, datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC))
    assert not periodic.enqueue_slot(entry, april)
    assert Job.objects.count() == 1


@override_settings(USE_TZ=False, TIME_ZONE="Europe/Berlin")
def test_periodic_jobs_are_enqueued_when_use_tz_is_off():
    scheduler = periodic.Scheduler(periodic.parse([EVERY_MINUTE]))
    now = timezone.now()
    assert timezone.is_naive(now)
    scheduler.start(now)
    assert Job.objects.count() == 1
    wait = scheduler.tick(now + datetime.timedelta(minutes=1))
    assert wait is not None and 0 < wait <= 60
    assert Job.objects.count() == 2
    # The slot is stored as the local wall-clock minute of TIME_ZONE (naive under USE_TZ=False).
    assert _slots("ticker")[0] == now.replace(second=0, microsecond=0)
    assert scheduler.tick(now + datetime.timedelta(minutes=1, seconds=1)) <= 60
    assert Job.objects.count() == 2



def test_a_daemon_with_use_tz_off_enqueues_and_runs_periodic_jobs(tmp_path):
    settings_file = tmp_path / "naive_settings.py"
    settings_file.write_text(
        "from tests.settings import *  # noqa\n"
        "USE_TZ = False\n"
        "TIME_ZONE = 'Europe/Berlin'\n"
        "DJASYNC = {**DJASYNC, 'PERIODIC': [{'cron': '* * * * *', "
        "'function': 'tests.jobs.write_ledger', 'args': ['tick'], 'name': 'ticker'}]}\n"
    )
    env = worker_env(PYTHONPATH=f"{tmp_path}:{worker_env()['PYTHONPATH']}")
    log = tmp_path / "w.log"
    daemon = start_worker("--concurrency", "1", "--settings", "naive_settings", log=log, env=env)
    try:
        wait_for(lambda: Job.objects.filter(name="tests.jobs.write_ledger",
                                            status=Status.SUCCEEDED).exists(),
                 timeout=30, what="the periodic job to run under USE_TZ = False")
        assert Ledger.objects.filter(key="tick").count() == 1
    finally:
        assert stop(daemon) == 0
    assert "cannot enqueue periodic jobs" not in log.read_text()

def test_latest_slot_inside_the_repeated_autumn_hour_is_not_an_hour_back():
    hourly, quarterly = periodic.parse([
        {"cron": "0 * * * *", "function": "tests.jobs.add", "name": "hourly"},
        {"cron": "*/15 * * * *", "function": "tests.jobs.add", "name": "quarterly"},
    ])
    with override_settings(TIME_ZONE="Europe/Berlin"):
        # 02:30 the second time (CET, fold=1) is 01:30 UTC.
        now = datetime.datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN, fold=1)
        assert hourly.latest_slot(now) == datetime.datetime(2026, 10, 25, 1, tzinfo=datetime.UTC)
        assert quarterly.latest_slot(now) == datetime.datetime(
            2026, 10, 25, 1, 30, tzinfo=datetime.UTC)
        first = datetime.datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN, fold=0)  # 00:30 UTC
        assert hourly.latest_slot(first) == datetime.datetime(2026, 10, 25, 0, tzinfo=datetime.UTC)
        utc_now = now.astimezone(datetime.UTC)
        assert hourly.latest_slot(utc_now) == hourly.latest_slot(now)


def test_a_slot_missed_in_the_repeated_autumn_hour_is_caught_up_at_start():
    hourly = {"cron": "0 * * * *", "function": "tests.jobs.add", "args": [1, 1], "name": "hourly"}
    with override_settings(TIME_ZONE="Europe/Berlin"):
        # The daemon enqueued 02:00 CEST (00:00 UTC), stopped, and starts again at 02:30 CET:
        # 02:00 CET (01:00 UTC) was missed and must run now.
        periodic.Scheduler(periodic.parse([hourly])).start(
            datetime.datetime(2026, 10, 25, 0, 10, tzinfo=datetime.UTC))
        periodic.Scheduler(periodic.parse([hourly])).start(
            datetime.datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN, fold=1))
    assert _slots("hourly") == [datetime.datetime(2026, 10, 25, 0, tzinfo=datetime.UTC),
                                datetime.datetime(2026, 10, 25, 1, tzinfo=datetime.UTC)]
    assert Job.objects.count() == 2



def test_a_daemon_started_in_the_repeated_autumn_hour_does_not_spin_on_a_past_slot():
    daily = {"cron": "30 2 * * *", "function": "tests.jobs.add", "args": [1, 1], "name": "daily"}
    with override_settings(TIME_ZONE="Europe/Berlin"):
        scheduler = periodic.Scheduler(periodic.parse([daily]))
        # 02:10 CET, the second pass (01:10 UTC). In UTC: adding to a local time resets fold.
        now = datetime.datetime(2026, 10, 25, 2, 10, tzinfo=BERLIN, fold=1).astimezone(
            datetime.UTC)
        scheduler.start(now)
        # 02:30 CEST ran before the clocks went back; the next one is tomorrow's, not 02:30 CET.
        wait = scheduler.tick(now + datetime.timedelta(seconds=1))
    assert wait is not None and wait > 23 * 3600
    assert _slots("daily") == [datetime.datetime(2026, 10, 25, 0, 30, tzinfo=datetime.UTC)]

@pytest.mark.parametrize("night, cron, expected", [
    # Autumn: 03:00 CEST -> 02:00 CET on 25 October 2026 (01:00 UTC).
    ((2026, 10, 24, 23), "*/15 * * * *", [(2026, 10, 24, 23, m) for m in (0, 15, 30, 45)] + [
        (2026, 10, 25, h, m) for h in range(3) for m in (0, 15, 30, 45)]),
    ((2026, 10, 24, 23), "0 * * * *", [(2026, 10, 24, 23, 0)] + [
        (2026, 10, 25, h, 0) for h in range(3)]),
    # A daily job at a wall time that happens twice runs once, the first time.
    # (The first slot is the day before's, enqueued at start.)
    ((2026, 10, 24, 23), "30 2 * * *", [(2026, 10, 24, 0, 30), (2026, 10, 25, 0, 30)]),
    # Spring: 02:00 CET -> 03:00 CEST on 29 March 2026 (01:00 UTC); 02:xx does not exist.
    ((2026, 3, 28, 23), "*/15 * * * *", [(2026, 3, 28, 23, m) for m in (0, 15, 30, 45)] + [
        (2026, 3, 29, h, m) for h in range(3) for m in (0, 15, 30, 45)]),
    ((2026, 3, 28, 23), "0 * * * *", [(2026, 3, 28, 23, 0)] + [
        (2026, 3, 29, h, 0) for h in range(3)]),
    # A daily job in the skipped hour runs once, when the clock jumps (03:00 CEST).
    ((2026, 3, 28, 23), "30 2 * * *", [(2026, 3, 28, 1, 30), (2026, 3, 29, 1, 0)]),
])
def test_ticks_across_a_daylight_saving_change_enqueue_each_slot_once(night, cron, expected):
    start = datetime.datetime(*night, tzinfo=datetime.UTC)
    entry = {"cron": cron, "function": "tests.jobs.add", "args": [1, 1], "name": "dst"}
    with override_settings(TIME_ZONE="Europe/Berlin"):
        scheduler = periodic.Scheduler(periodic.parse([entry]))
        scheduler.start(start)
        # A tick at every due moment and every 7 minutes in between, for four hours.
        now = start
        while now < start + datetime.timedelta(hours=4):
            wait = scheduler.tick(now)
            assert wait is not None and wait > 0  # zero would make the supervisor spin
            now += min(datetime.timedelta(seconds=wait) or datetime.timedelta(seconds=1),
                       datetime.timedelta(minutes=7))
    assert _slots("dst") == [datetime.datetime(*t, tzinfo=datetime.UTC) for t in expected]
    assert Job.objects.count() == len(expected)


@pytest.mark.parametrize("zone, night", [
    ("Europe/Berlin", (2026, 3, 29)), ("Europe/Berlin", (2026, 10, 25)),
    ("America/New_York", (2026, 3, 8)), ("America/New_York", (2026, 11, 1)),
])
def test_latest_and_next_slot_agree_with_a_forward_walk_across_a_dst_change(zone, night):
    crons = ["0 * * * *", "*/15 * * * *", "30 2 * * *", "45 1 * * *", "*/7 * * * *"]
    start = datetime.datetime(*night, tzinfo=datetime.UTC) - datetime.timedelta(hours=6)
    with override_settings(TIME_ZONE=zone):
        for cron in crons:
            entry = periodic.Periodic("x", cron, "tests.jobs.add")
            walk = CronSim(cron, timezone.localtime(start - datetime.timedelta(days=2)))
            slots = []
            while not slots or slots[-1] < start + datetime.timedelta(days=3):
                slots.append(next(walk).astimezone(datetime.UTC))
            for minutes in range(0, 24 * 60, 5):
                now = start + datetime.timedelta(minutes=minutes, seconds=13)
                assert entry.latest_slot(now) == max(s for s in slots if s <= now), (cron, now)
                assert entry.next_slot(now) == min(s for s in slots if s > now), (cron, now)
