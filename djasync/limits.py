"""Flow control: concurrency limits and rates by key, and paused queues, enforced in the claim.

::

    DJASYNC = {"LIMITS": {
        "stripe": {"concurrency": 2, "rate": "100/m"},   # one counter
        "tenant:*": {"concurrency": 1},                   # one counter per key "tenant:…"
        "queue:mail": {"rate": "10/s"},                   # every job of queue "mail"
    }}
    schedule(charge, [order.id], limits=["stripe", f"tenant:{order.tenant_id}"])

A key's concurrency slots are advisory locks taken by the transaction that claims the job
(``djasync_claim_limited``, migrations 0010, 0013 and 0015-0018), so they end exactly when
that transaction or its session ends; a long job holds them at session level on the connection
that runs it (behind a pooler, in a transaction of a connection of its own: see below). A rate
of N per window is N token rows per key, one taken and stamped per start in the claiming
transaction. Jobs without keys (the column ``limits`` is NULL) are claimed as before; with no
``LIMITS`` configured the claim is the plain one, unchanged. See docs/howto/flow-control.md.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.db import connection, transaction

from djasync.exceptions import DjasyncError, ImproperlyConfigured

logger = logging.getLogger(__name__)

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
#
# Straight to PostgreSQL, a long job's slots are session-level advisory locks on the
# connection that runs it (djasync_take_session_slots): they end with that session, and the
# worker's fence stops the job if it ends. Behind a connection pooler in transaction mode
# (PgBouncer) that session is not ours: a session-level lock stays on whichever server
# connection ran the statement, which goes back to the pool (its next client would find the
# slot "its own"), and the release runs on another one (freeing nothing, or another job's
# slots). So there the slots are transaction-level advisory locks taken in a transaction kept
# open for the job's run, on a connection of its own (:class:`_SlotHolder`): straight to
# PostgreSQL through ``DJASYNC["LISTEN_URL"]`` when it is set, else through the pooler, which
# pins one server connection to that transaction until it ends, or until its client goes
# (PgBouncer then closes that server connection, and PostgreSQL frees the locks). The
# worker's fence watches that connection instead (:data:`ON_SLOT_CONNECTION`).

#: Take the slots at session level only if the session is the one the connection was opened
#: with (a pooler answers the connection with a backend key of its own): whether it is, and
#: the full key. The same round trip as before on a direct connection.
_TAKE_IF_DIRECT = """
SELECT pg_backend_pid() = %(pid)s,
       CASE WHEN pg_backend_pid() = %(pid)s
            THEN djasync_take_session_slots(%(keys)s::jsonb, %(cfg_keys)s::text[],
                                            %(cfg_concurrency)s::integer[]) END
"""
#: Take a slot of each key in this transaction (until it ends): for each key, the first free
#: slot (LIMIT 1 stops at the first lock taken), or NULL if it is full. And bound the
#: transaction's idleness (0: no bound).
_TAKE_IN_TRANSACTION = """
SELECT t.k, (SELECT s FROM generate_series(0, t.c - 1) AS s
              WHERE pg_try_advisory_xact_lock(hashtext('djasync.limit:' || t.k), s) LIMIT 1),
       set_config('idle_in_transaction_session_timeout', %(idle)s, true)
  FROM unnest(%(keys)s::text[], %(concurrency)s::integer[]) WITH ORDINALITY AS t(k, c, i)
 ORDER BY t.i
"""

#: Called with the file descriptor of the connection holding a long job's slots when it is
#: opened (behind a pooler: see above), and with None just before it is closed: the daemon's
#: child hands it to its supervisor, whose fence then watches it instead of the child's own.
ON_SLOT_CONNECTION: list[Callable[[int | None], None]] = []


def take_session_slots(keys: Any) -> str | None:
    """Take a slot of every key of a long job about to start, for the job's run (at session
    level on this connection, or behind a pooler in a transaction of a connection of its own);
    return the key that is full (then none is held), or None."""
    global _holding_session_slots
    params = config_params()
    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute(_TAKE_IF_DIRECT, {
            "pid": connection.connection.info.backend_pid, "keys": _json_text(keys),
            "cfg_keys": params["cfg_keys"], "cfg_concurrency": params["cfg_concurrency"]})
        direct, full = cursor.fetchone()
    if not direct:
        full = _take_pooled(keys)
    _holding_session_slots = full is None
    return full


def _take_pooled(keys: Any) -> str | None:
    global _holder
    import json

    from djasync import conf

    settings = conf.get()
    wanted: list[tuple[str, int]] = []
    for key in json.loads(keys) if isinstance(keys, str) else keys:
        found = matching(key, settings.LIMITS)
        if found is not None and found[1].concurrency:
            wanted.append((key, found[1].concurrency))
    if not wanted:
        return None
    if _holder is not None:  # a previous job's, not given back (cannot happen; be sure)
        _holder.close()
    # The lease renewer keeps the transaction from idling past the lease (keep_slots); inside
    # a caller's transaction (job(), run_jobs()) there is no renewer, and no bound.
    renewed = len(connection.atomic_blocks) <= 1
    idle_ms = int(settings.LEASE_SECONDS * 1000) if renewed else 0
    _holder = _SlotHolder()
    try:
        full = _holder.take(wanted, idle_ms)
    except BaseException:
        _holder.close()
        _holder = None
        raise
    if full is not None:
        _holder.close()
        _holder = None
    return full


class _SlotHolder:
    """A connection of its own whose open transaction holds a long job's slots (behind a
    pooler; see above)."""

    def __init__(self) -> None:
        import psycopg

        from djasync import conf
        from djasync.connections import listen_conninfo

        params = dict(connection.get_connection_params())
        direct_url = conf.get().LISTEN_URL
        if direct_url is not None:
            params = listen_conninfo(params)  # straight to PostgreSQL: no server connection
        else:                                 # of the pool is pinned for the job's run
            _warn_pooled_once()
        params["prepare_threshold"] = None  # a handful of statements, on any pooler
        self.conn = psycopg.connect(**params)
        self.shared = False
        self.lock = threading.Lock()

    def take(self, wanted: list[tuple[str, int]], idle_ms: int) -> str | None:
        rows = self.conn.execute(_TAKE_IN_TRANSACTION, {
            "keys": [k for k, _ in wanted], "concurrency": [c for _, c in wanted],
            "idle": f"{idle_ms}ms"}).fetchall()
        for key, slot, _ in rows:
            if slot is None:
                self.conn.rollback()
                return str(key)
        for hook in ON_SLOT_CONNECTION:
            hook(self.conn.fileno())
        self.shared = bool(ON_SLOT_CONNECTION)
        return None

    def keep(self) -> None:
        """Show PostgreSQL the transaction is not idle (its idle timeout is the lease's)."""
        with self.lock:
            if not self.conn.closed:
                self.conn.execute("SELECT 1")

    def release(self) -> None:
        """End the transaction (its slots end with it) and wake the workers waiting on a key
        (the notification is delivered at the COMMIT, after the locks are gone)."""
        with self.lock:
            self._unshare()
            try:
                self.conn.execute("SELECT pg_notify(%s, '*')", [_channel()])
                self.conn.commit()
            finally:
                self.conn.close()

    def close(self) -> None:
        with self.lock:
            self._unshare()
            self.conn.close()

    def _unshare(self) -> None:
        if self.shared:
            self.shared = False
            for hook in ON_SLOT_CONNECTION:
                hook(None)


_holder: _SlotHolder | None = None


def keep_slots() -> None:
    """Called by a long job's lease renewer after each renewal: behind a pooler, touch the
    transaction holding the job's slots, so that it outlives its idle timeout (the lease's
    length) only while the job's worker lives. Never raises."""
    holder = _holder
    if holder is None:
        return
    try:
        holder.keep()
    except Exception as exc:  # gone: the fence stops the job
        logger.warning("the connection holding a long job's flow-control slots failed "
                       "error=%s", exc)


def holds_session_slots() -> bool:
    """Whether this process holds a long job's slots now (taken by
    :func:`take_session_slots`, not yet given back): its worker must stop the job if
    PostgreSQL ends the session holding them, since the slots end with it."""
    return _holding_session_slots


_holding_session_slots = False


def holds_slots_elsewhere() -> bool:
    """Whether a connection of its own holds a long job's slots now (behind a pooler)."""
    return _holder is not None


def release_session_slots() -> None:
    """Give back the slots a long job held (after its outcome is written), and wake the
    workers, whose jobs may wait on them. A lost connection gave them back already."""
    global _holding_session_slots, _holder
    _holding_session_slots = False
    holder, _holder = _holder, None
    if holder is not None:
        try:
            holder.release()
        except Exception as exc:  # the connection is gone: so are its slots
            logger.debug("the connection holding a long job's slots was gone error=%s", exc)
        return
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT djasync_release_session_slots(), pg_notify(%s, '*')",
                           [_channel()])
    except Exception:  # the session is gone: so are its slots
        connection.close()


_warned_pooled = False


def _warn_pooled_once() -> None:
    global _warned_pooled
    if not _warned_pooled:
        _warned_pooled = True
        logger.info("long jobs with flow-control keys hold their slots in a transaction of a "
                    "connection of their own, through the connection pooler: each pins one "
                    "of its server connections while it runs. DJASYNC['LISTEN_URL'] (straight "
                    "to PostgreSQL) takes them off the pool (docs/howto/pgbouncer.md)")


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
