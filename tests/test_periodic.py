"""Periodic jobs: every slot enqueued exactly once, whatever the number of daemons."""

import datetime
import threading

import pytest
from django.core import checks
from django.test import override_settings
from django.utils import timezone

from djasync import conf, periodic
from djasync.exceptions import ImproperlyConfigured
from djasync.models import Job, PeriodicSlot, Status
from tests.daemon import start_worker, stop, wait_for, worker_env

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
