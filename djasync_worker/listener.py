"""The supervisor's LISTEN connection, with reconnects and a check that notifications arrive.

It is a dedicated autocommit connection that never enters a transaction: PostgreSQL cannot
clean its notification queue while a listening session sits in a long transaction.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import psycopg

from djasync.conf import NOTIFY_CHANNEL

logger = logging.getLogger(__name__)

RECONNECT_DELAY_MAX_SECONDS = 5.0
#: Polls that found work while no notification arrived before we warn that LISTEN is broken.
SUSPICIOUS_POLLS_BEFORE_WARNING = 3


class Listener:
    def __init__(self, conninfo: dict[str, Any]) -> None:
        self._conninfo = conninfo
        self.conn: psycopg.Connection | None = None
        self._next_attempt = 0.0
        self._delay = 0.1
        self._suspicious_polls = 0
        self._warned = False
        #: Successful LISTENs: the first connection, then one per reconnect (for metrics).
        self.connects = 0

    def fileno(self) -> int | None:
        return self.conn.fileno() if self.conn is not None else None

    def ensure(self) -> bool:
        """Connect and LISTEN if not connected; return True if it just (re)connected."""
        if self.conn is not None or time.monotonic() < self._next_attempt:
            return False
        try:
            self.conn = psycopg.connect(**{**self._conninfo, "autocommit": True,
                                           "application_name": "djasync-worker listener"})
            self.conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg.Error as exc:
            self._close()
            self._next_attempt = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, RECONNECT_DELAY_MAX_SECONDS)
            logger.warning("LISTEN connection failed, retrying in %.1f s error=%s",
                           self._delay, exc)
            return False
        self._delay = 0.1
        self.connects += 1
        logger.info("listening channel=%s", NOTIFY_CHANNEL)
        return True

    def receive(self) -> list[str]:
        """Return the payloads (queue names) of the notifications waiting on the socket."""
        if self.conn is None:
            return []
        try:
            payloads = [n.payload for n in self.conn.notifies(timeout=0)]
        except psycopg.Error as exc:
            logger.warning("LISTEN connection lost, reconnecting error=%s", exc)
            self._close()
            return []
        if self.conn.closed or self.conn.broken:
            self._close()
        if payloads:
            self._suspicious_polls = 0
        return payloads

    def poll_found_work(self) -> None:
        """Note that a poll (not a notification) found due jobs; warn once if it keeps on."""
        self._suspicious_polls += 1
        if self._suspicious_polls >= SUSPICIOUS_POLLS_BEFORE_WARNING and not self._warned:
            self._warned = True
            logger.warning(
                "notifications are not arriving: %s polls in a row found jobs that no NOTIFY "
                "announced (PgBouncer in transaction mode drops LISTEN). Jobs still run, found "
                "by polling every --poll-interval seconds, with that much more latency.",
                self._suspicious_polls,
            )

    def _close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):  # already dead
                self.conn.close()
        self.conn = None

    def close(self) -> None:
        self._close()
