"""Periodic jobs: cron expressions in settings, each slot enqueued exactly once.

Declare them in the ``DJASYNC`` setting::

    DJASYNC = {"PERIODIC": [
        {"cron": "*/15 * * * *", "function": "shop.jobs.sync_stock"},
        {"cron": "0 3 * * *", "function": "shop.jobs.nightly_report", "kwargs": {"full": True},
         "queue": "reports", "name": "nightly"},
    ]}

Every running ``djasync-worker`` tries to enqueue each slot when it comes due; a row per
(name, slot) with a primary key decides which one does, in the same transaction as the job. So
a slot is enqueued exactly once however many daemons run, with no leader to elect.

Missed slots (no daemon ran): at start-up only the most recent missed slot is enqueued, once;
older ones are skipped. A slot at or before the newest one recorded for its name is never
enqueued, and ``prune_jobs`` keeps that newest record, so a restart never repeats a slot however
long ago it was. Cron expressions are read in ``settings.TIME_ZONE`` (also under ``USE_TZ =
False``); slots are instants, so the repeated autumn hour and the skipped spring hour run each
slot once.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

from cronsim import CronSim, CronSimError
from django.db import connection, transaction
from django.utils import timezone

from djasync.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)

KEYS = {"cron", "function", "name", "args", "kwargs", "queue", "priority", "meta", "limits"}


@dataclass(frozen=True)
class Periodic:
    name: str
    cron: str
    function: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: Flow-control keys of its jobs (checked against ``DJASYNC["LIMITS"]`` when enqueued).
    limits: tuple[str, ...] = ()

    def latest_slot(self, now: datetime.datetime) -> datetime.datetime:
        """The most recent slot at or before ``now`` (in UTC)."""
        now = _instant(now)
        # The second is added in UTC: arithmetic on a local datetime resets ``fold``, which
        # inside the repeated autumn hour would walk back from the first pass, an hour early.
        after_now = timezone.localtime(now.replace(microsecond=0) + datetime.timedelta(seconds=1))
        slot = next(CronSim(self.cron, after_now, reverse=True))
        if slot > now:
            # Not seen, but the forward walk below needs a start at or before ``now``: step
            # back past any daylight saving shift.
            earlier = timezone.localtime(now - datetime.timedelta(hours=3))
            slot = next(CronSim(self.cron, earlier, reverse=True))
        # cronsim's reverse walk is not reliable around the fold anyway (from the second pass
        # it skips "30 2 * * *" of the first pass, a day too far back); its forward walk is what
        # tick() follows, so walk forward to the last slot at or before ``now``.
        for following in CronSim(self.cron, slot):
            if following > now:
                break
            slot = following
        return slot.astimezone(datetime.UTC)

    def next_slot(self, now: datetime.datetime) -> datetime.datetime:
        """The first slot after ``now`` (in UTC)."""
        now = _instant(now)
        # cronsim can answer a slot already past: from 02:00 CET (the repeated hour's second
        # pass), "30 2 * * *" gives 02:30 CEST, an hour before. Taken as due, it would make
        # tick() return 0 until 02:30 CET: the supervisor spinning for half an hour.
        for slot in CronSim(self.cron, timezone.localtime(now)):
            if slot > now:
                return slot.astimezone(datetime.UTC)
        raise AssertionError("unreachable: CronSim iterates forever")  # pragma: no cover


def _instant(moment: datetime.datetime) -> datetime.datetime:
    """Return ``moment`` as an aware UTC datetime (a naive one is in ``TIME_ZONE``).

    Naive datetimes are what ``timezone.now()`` returns under ``USE_TZ = False``. Slots are kept
    in UTC because Python compares two datetimes of the same zone by wall time, ignoring
    ``fold``: 02:00 CET would sort before 02:30 CEST.
    """
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment)
    return moment.astimezone(datetime.UTC)


def parse(raw: Any) -> tuple[Periodic, ...]:
    """Validate ``DJASYNC["PERIODIC"]`` (a list of dicts) and return its entries."""
    if not isinstance(raw, list | tuple):
        raise ImproperlyConfigured("DJASYNC['PERIODIC'] must be a list of dicts.")
    entries: dict[str, Periodic] = {}
    for index, item in enumerate(raw):
        where = f"DJASYNC['PERIODIC'][{index}]"
        if not isinstance(item, dict):
            raise ImproperlyConfigured(f"{where} must be a dict.")
        unknown = sorted(set(item) - KEYS)
        if unknown:
            known = ", ".join(sorted(KEYS))
            raise ImproperlyConfigured(
                f"{where} has unknown key(s) {', '.join(unknown)}; known: {known}."
            )
        if not isinstance(item.get("cron"), str) or not isinstance(item.get("function"), str):
            raise ImproperlyConfigured(f"{where} needs 'cron' and 'function' strings.")
        try:
            CronSim(item["cron"], timezone.now())
        except CronSimError as exc:
            raise ImproperlyConfigured(f"{where}: bad cron {item['cron']!r}: {exc}") from None
        name = item.get("name") or item["function"]
        if not isinstance(name, str) or len(name) > 200:
            raise ImproperlyConfigured(f"{where}: 'name' must be a string of at most 200 chars.")
        if name in entries:
            raise ImproperlyConfigured(
                f"{where}: name {name!r} is used twice; give one of them a distinct 'name'."
            )
        keys = item.get("limits") or ()
        if not isinstance(keys, list | tuple) or not all(isinstance(k, str) for k in keys):
            raise ImproperlyConfigured(f"{where}: 'limits' must be a list of limit keys.")
        entries[name] = Periodic(
            name, item["cron"], item["function"], list(item.get("args") or []),
            dict(item.get("kwargs") or {}), item.get("queue"), item.get("priority"),
            dict(item.get("meta") or {}), tuple(keys),
        )
    return tuple(entries.values())


def enqueue_slot(entry: Periodic, slot: datetime.datetime) -> bool:
    """Enqueue ``entry``'s job for ``slot`` unless some daemon already did; return if we did."""
    from djasync.scheduling import schedule

    with transaction.atomic():
        with connection.cursor() as cursor:
            # Only a slot after the newest recorded one is new: an older one was either enqueued
            # or skipped as a missed slot (a late tick, a clock behind, a restart).
            cursor.execute(
                "INSERT INTO djasync_periodicslot (name, slot, created_at)"
                " SELECT %(name)s, %(slot)s, now() WHERE NOT EXISTS ("
                "   SELECT 1 FROM djasync_periodicslot WHERE name = %(name)s AND slot >= %(slot)s)"
                " ON CONFLICT (name, slot) DO NOTHING RETURNING 1",
                {"name": entry.name, "slot": slot},
            )
            if cursor.fetchone() is None:
                return False
        schedule(entry.function, entry.args, entry.kwargs, meta=entry.meta or None,
                 queue=entry.queue, priority=entry.priority, limits=entry.limits or None)
    logger.info("periodic job enqueued name=%s slot=%s", entry.name, slot.isoformat())
    return True


class Scheduler:
    """Keeps each entry's next slot; the supervisor calls :meth:`tick` from its loop."""

    def __init__(self, entries: tuple[Periodic, ...]) -> None:
        self.entries = entries
        self.next: dict[str, datetime.datetime] = {}

    def start(self, now: datetime.datetime) -> None:
        """Enqueue the most recent missed slot of each entry (once), then wait for the next."""
        now = _instant(now)
        for entry in self.entries:
            enqueue_slot(entry, entry.latest_slot(now))
            self.next[entry.name] = entry.next_slot(now)

    def tick(self, now: datetime.datetime) -> float | None:
        """Enqueue the slots that came due; return seconds until the next one (or None)."""
        now = _instant(now)
        for entry in self.entries:
            due = self.next.get(entry.name)
            if due is None:
                continue
            if due <= now:
                enqueue_slot(entry, due)
                self.next[entry.name] = entry.next_slot(now)
        if not self.next:
            return None
        return max(0.0, (min(self.next.values()) - now).total_seconds())
