"""Flow control: concurrency limits and rates by key, and paused queues, enforced in the claim.

::

    DJASYNC = {"LIMITS": {
        "stripe": {"concurrency": 2, "rate": "100/m"},   # one counter
        "tenant:*": {"concurrency": 1},                   # one counter per key "tenant:…"
        "queue:mail": {"rate": "10/s"},                   # every job of queue "mail"
    }}
    schedule(charge, [order.id], limits=["stripe", f"tenant:{order.tenant_id}"])

A key's concurrency slots are advisory locks taken by the transaction that claims the job
(``djasync_claim_limited``, migrations 0010, 0013 and 0015-0017), so they end exactly when
that transaction or its session ends; a long job holds them at session level on the connection
that runs it. A rate
of N per window is N token rows per key, one taken and stamped per start in the claiming
transaction. Jobs without keys (the column ``limits`` is NULL) are claimed as before; with no
``LIMITS`` configured the claim is the plain one, unchanged. See docs/howto/flow-control.md.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.db import connection, transaction

from djasync.exceptions import DjasyncError, ImproperlyConfigured

#: A key: 1-200 printable characters, no control characters (the claim separates slot tags
#: with one). ``"name:*"`` in ``LIMITS`` is a pattern: one counter per key ``name:…``.
KEY = re.compile(r"[^\x00-\x1f\x7f]{1,200}")
RATE = re.compile(r"\s*([1-9][0-9]*)\s*/\s*(s|m|h)\s*")
WINDOW_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}
#: The most tokens (starts per window) a rate may ask for: each is a row.
RATE_MAX = 100_000
CONCURRENCY_MAX = 10_000
#: Seconds a process trusts its copy of the paused queues (the plain claim's; the claim with
#: limits configured reads the table itself).
PAUSED_TTL_SECONDS = 0.5


class UnknownLimit(DjasyncError):
    """A job names a flow-control key that no entry of ``DJASYNC["LIMITS"]`` matches."""


@dataclass(frozen=True)
class Limit:
    #: At most this many jobs holding the key run at once (None: no such limit).
    concurrency: int | None = None
    #: At most ``rate`` jobs holding the key start in any window of ``per`` seconds.
    rate: int | None = None
    per: float | None = None
    #: The text of the rate, as configured ("100/m").
    rate_text: str = ""


def parse(raw: Any) -> dict[str, Limit]:
    """Validate ``DJASYNC["LIMITS"]`` and return it as :class:`Limit` values by key."""
    if not isinstance(raw, dict):
        raise ImproperlyConfigured(
            f"DJASYNC['LIMITS'] must be a dict of key -> {{'concurrency': N, 'rate': 'N/s|m|h'}}"
            f", not {type(raw).__name__}.")
    limits: dict[str, Limit] = {}
    for key, entry in raw.items():
        where = f"DJASYNC['LIMITS'][{key!r}]"
        if not isinstance(key, str) or not KEY.fullmatch(key) or (
                "*" in key and not (key.endswith(":*") and key.count("*") == 1 and len(key) > 2)):
            raise ImproperlyConfigured(
                f"{where}: a key is 1-200 printable characters; a pattern is 'name:*'.")
        if not isinstance(entry, dict) or not entry:
            raise ImproperlyConfigured(
                f"{where} must be a dict with 'concurrency' and/or 'rate'.")
        unknown = sorted(str(k) for k in set(entry) - {"concurrency", "rate"})
        if unknown:
            raise ImproperlyConfigured(
                f"{where} has unknown key(s) {', '.join(unknown)}; known: concurrency, rate.")
        concurrency = entry.get("concurrency")
        if concurrency is not None and (
                isinstance(concurrency, bool) or not isinstance(concurrency, int)
                or not 1 <= concurrency <= CONCURRENCY_MAX):
            raise ImproperlyConfigured(
                f"{where}['concurrency'] must be an integer 1..{CONCURRENCY_MAX}, "
                f"not {concurrency!r}.")
        rate, per, text = None, None, ""
        if entry.get("rate") is not None:
            text = entry["rate"]
            match = RATE.fullmatch(text) if isinstance(text, str) else None
            if match is None or int(match[1]) > RATE_MAX:
                raise ImproperlyConfigured(
                    f"{where}['rate'] must be 'N/s', 'N/m' or 'N/h' with N in 1..{RATE_MAX}, "
                    f"not {text!r}.")
            rate, per = int(match[1]), WINDOW_SECONDS[match[2]]
        if concurrency is None and rate is None:
            raise ImproperlyConfigured(f"{where} sets neither 'concurrency' nor 'rate'.")
        limits[key] = Limit(concurrency, rate, per, text)
    return limits


def matching(key: str, limits: dict[str, Limit]) -> tuple[str, Limit] | None:
    """The entry of ``limits`` that governs ``key`` (the key itself, else its pattern)."""
    if key in limits:
        return key, limits[key]
    if ":" in key:
        pattern = key.split(":", 1)[0] + ":*"
        if pattern in limits:
            return pattern, limits[pattern]
    return None


def keys_for(requested: Iterable[str] | None, queue: str,
             limits: dict[str, Limit]) -> list[str] | None:
    """The keys a job scheduled with ``limits=requested`` into ``queue`` holds (``queue:<q>``
    added if configured), checked; None for none."""
    if requested is None:
        requested = ()
    elif isinstance(requested, str):
        raise TypeError("limits must be a list of keys, not a string")
    keys: list[str] = []
    for key in requested:
        if not isinstance(key, str) or not KEY.fullmatch(key) or "*" in key:
            raise ValueError(f"limit key {key!r} is invalid: use 1-200 printable characters, "
                             "no '*'")
        if matching(key, limits) is None:
            raise UnknownLimit(
                f"limit key {key!r} matches no entry of DJASYNC['LIMITS'] "
                f"(configured: {', '.join(sorted(limits)) or 'none'})")
        if key not in keys:
            keys.append(key)
    own = f"queue:{queue}"
    if own in limits and own not in keys:
        keys.append(own)
    return keys or None


def ensure_tokens(keys: Iterable[str], limits: dict[str, Limit]) -> None:
    """Make the rate tokens of these keys (in the caller's transaction): N rows per key with
    a rate, made once (a later, larger N adds the missing ones)."""
    rated = [(key, limit.rate) for key in keys
             if (found := matching(key, limits)) and (limit := found[1]).rate]
    if not rated:
        return
    with connection.cursor() as cursor:
        for key, rate in rated:
            cursor.execute(_MAKE_TOKENS, {"key": key, "rate": rate})


_MAKE_TOKENS = """
INSERT INTO djasync_ratetoken (key, slot, used_at)
SELECT %(key)s, s, '-infinity' FROM generate_series(0, %(rate)s - 1) AS s
 WHERE NOT EXISTS (SELECT 1 FROM djasync_ratetoken
                    WHERE key = %(key)s AND slot = %(rate)s - 1)
ON CONFLICT (key, slot) DO NOTHING
"""


@cache
def claim_config(limits_id: int, limits: tuple[tuple[str, Limit], ...]) -> dict[str, Any]:
    """The claim function's arrays for a configuration (cached per settings object)."""
    return {
        "cfg_keys": [key for key, _ in limits],
        "cfg_concurrency": [limit.concurrency or 0 for _, limit in limits],
        "cfg_rate": [limit.rate or 0 for _, limit in limits],
        "cfg_per": [limit.per or 0.0 for _, limit in limits],
    }


def config_params() -> dict[str, Any]:
    from djasync import conf

    limits = conf.get().LIMITS
    return claim_config(id(limits), tuple(limits.items()))


def enabled() -> bool:
    """Whether any limit is configured (then the claim is ``djasync_claim_limited``)."""
    from djasync import conf

    return bool(conf.get().LIMITS)


# -- Long jobs: their slots are held by their session while they run -------------------------

def take_session_slots(keys: Any) -> str | None:
    """Take a slot of every key of a long job about to start, at session level; return the
    key that is full (then none is held), or None."""
    params = config_params()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT djasync_take_session_slots(%s::jsonb, %s::text[], %s::integer[])",
            [_json_text(keys), params["cfg_keys"], params["cfg_concurrency"]])
        (full,) = cursor.fetchone()
    global _holding_session_slots
    _holding_session_slots = full is None
    return full


def holds_session_slots() -> bool:
    """Whether this process's connection holds a long job's slots now (taken by
    :func:`take_session_slots`, not yet given back): its worker must stop the job if
    PostgreSQL ends that session, since the slots end with it."""
    return _holding_session_slots


_holding_session_slots = False


def release_session_slots() -> None:
    """Give back the slots a long job held (after its outcome is written), and wake the
    workers, whose jobs may wait on them. A lost connection gave them back already."""
    global _holding_session_slots
    _holding_session_slots = False
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT djasync_release_session_slots(), pg_notify(%s, '*')",
                           [_channel()])
    except Exception:  # the session is gone: so are its slots
        connection.close()


def _channel() -> str:
    from djasync.conf import NOTIFY_CHANNEL

    return NOTIFY_CHANNEL


def _json_text(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


# -- Paused queues ---------------------------------------------------------------------------

def pause_queue(name: str) -> bool:
    """Stop every worker claiming jobs of queue ``name`` (running jobs finish); return whether
    it was running. Persistent: it stays paused across restarts until resumed."""
    from djasync.models import PausedQueue
    from djasync.validation import check_queue_name

    check_queue_name(name)
    _, created = PausedQueue.objects.get_or_create(queue=name)
    _forget_paused()
    return created


def resume_queue(name: str) -> bool:
    """Let workers claim jobs of queue ``name`` again; return whether it was paused."""
    from djasync.conf import NOTIFY_CHANNEL
    from djasync.models import PausedQueue
    from djasync.validation import check_queue_name

    check_queue_name(name)
    with transaction.atomic():
        deleted, _ = PausedQueue.objects.filter(queue=name).delete()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [NOTIFY_CHANNEL, name])
    _forget_paused()
    return bool(deleted)


def paused_queues() -> list[str]:
    """The paused queues (read at most every ``PAUSED_TTL_SECONDS`` per process)."""
    global _paused
    now = time.monotonic()
    if _paused is None or now - _paused[0] > PAUSED_TTL_SECONDS:
        with connection.cursor() as cursor:
            cursor.execute("SELECT queue FROM djasync_pausedqueue ORDER BY queue")
            _paused = (now, [row[0] for row in cursor.fetchall()])
    return _paused[1]


def paused_read_at() -> float:
    return _paused[0] if _paused is not None else 0.0


def _forget_paused() -> None:
    global _paused
    _paused = None


_paused: tuple[float, list[str]] | None = None


# -- What is in use ------------------------------------------------------------------------

def usage() -> list[dict[str, Any]]:
    """Each configured limit's use: running (slots held now), waiting (due jobs holding it),
    and for a rate, starts in the current window. A pattern's figures add up its keys."""
    from djasync import conf

    limits = conf.get().LIMITS
    if not limits:
        return []
    rows: list[dict[str, Any]] = []
    with connection.cursor() as cursor:
        cursor.execute(_WAITING_KEYS)
        waiting = dict(cursor.fetchall())
        cursor.execute(_HELD_SLOTS)
        held = {int(h): int(n) for h, n in cursor.fetchall()}
        cursor.execute(_TOKENS_USED)
        used = {(key, float(per)): int(n) for key, per, n in cursor.fetchall()}
        cursor.execute("SELECT k, hashtext('djasync.limit:' || k) FROM unnest(%s::text[]) k",
                       [sorted(set(waiting) | set(limits) | {key for key, _ in used})])
        hashes = dict(cursor.fetchall())
    for entry, limit in sorted(limits.items()):
        keys = ([k for k in hashes if k.startswith(entry[:-1])] if entry.endswith(":*")
                else [entry])
        rows.append({
            "key": entry, "concurrency": limit.concurrency, "rate": limit.rate_text,
            "running": sum(held.get(hashes[k], 0) for k in keys if k in hashes),
            "waiting": sum(waiting.get(k, 0) for k in keys),
            "rate_used": sum(_rate_used(used, k, limit) for k in keys) if limit.rate else None,
        })
    return rows


def _rate_used(used: dict[tuple[str, float], int], key: str, limit: Limit) -> int:
    return used.get((key, float(limit.per or 0)), 0)


_WAITING_KEYS = """
SELECT k, count(*) FROM djasync_job j, jsonb_array_elements_text(j.limits) k
 WHERE j.status = 'pending' AND j.limits IS NOT NULL AND j.run_after <= now()
 GROUP BY k
"""
#: Slots held now, by the key's hash (an advisory lock's classid is its first int4, as oid).
_HELD_SLOTS = """
SELECT CASE WHEN classid::bigint >= 2147483648 THEN classid::bigint - 4294967296
            ELSE classid::bigint END, count(*)
  FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted
 GROUP BY 1
"""
_TOKENS_USED = """
SELECT t.key, w.per, count(*)
  FROM djasync_ratetoken t, (VALUES (1.0::float8), (60.0), (3600.0)) AS w(per)
 WHERE t.used_at > clock_timestamp() - make_interval(secs => w.per)
 GROUP BY 1, 2
"""
