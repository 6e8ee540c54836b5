"""The connection budget: the worker daemons registered as alive against max_connections."""

from __future__ import annotations

import datetime
import math

import pytest
from django.utils import timezone

from djasync import budget
from djasync.models import Worker
from djasync.workers import IN_PROCESS_PREFIX
from tests.daemon import run_worker

pytestmark = pytest.mark.django_db(transaction=True)


def register(name: str, concurrency: int, **fields) -> Worker:
    return Worker.objects.create(name=name, hostname="h", pid=1, concurrency=concurrency,
                                 **fields)


def test_the_budget_counts_the_daemons_registered_as_alive_and_this_one():
    now = timezone.now()
    register("alive", 4)
    register(f"{IN_PROCESS_PREFIX}h:1/ab", 1)  # a flush_queue run: its connection and its watch
    register("stopped", 50, stopped_at=now)
    register("stale", 50, last_seen=now - datetime.timedelta(hours=1))
    register("me", 7)  # this daemon's own row is counted as this daemon, once
    found = budget.measure("me", 7)
    assert (found.others, found.others_need, found.own_need) == (2, 4 + 2 + 2, 7 + 2)
    assert found.need == 17
    assert found.allowed == found.max_connections - found.reserved > 0
    assert found.in_use >= 1 and not found.pooled


def test_the_worker_warns_in_one_line_at_start_when_the_daemons_approach_max_connections():
    allowed = budget.measure("probe", 0).allowed
    # Other daemons registered as alive that, with this one's three, pass 80% of the budget.
    register("host-a:1:aaaaaa", math.ceil(budget.WARN_FRACTION * allowed / 2))
    register("host-b:1:bbbbbb", math.ceil(budget.WARN_FRACTION * allowed / 2))
    result = run_worker("--concurrency", "1", "--burst", timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "connection budget" in line]
    assert len(lines) == 1, result.stderr
    assert "WARNING" in lines[0] and "2 other daemon(s) registered as alive" in lines[0]
    assert f"non-superusers (max_connections={budget.measure('x', 0).max_connections}" in lines[0]


def test_the_worker_says_nothing_about_the_budget_when_the_daemons_fit():
    register("host-a:1:aaaaaa", 2)
    result = run_worker("--concurrency", "1", "--burst", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "connection budget" not in result.stderr
