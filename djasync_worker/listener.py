"""The supervisor's LISTEN connection: never blocking, probed, and made again when it dies.

It is a dedicated autocommit connection that never enters a transaction: PostgreSQL cannot
clean its notification queue while a listening session sits in a long transaction.

Everything here is non-blocking, driven by the supervisor's loop: connecting, LISTEN, reading
notifications and the liveness probe are each a step taken when the socket is ready or a
deadline passes, so a network that swallows packets never stops the supervisor (its watchdog
keeps running). libpq's low-level API gives that (``PQconnectStart``/``PQconnectPoll``,
``PQsendQuery``); psycopg's connection would wait.

Liveness is not left to TCP: every :data:`PROBE_INTERVAL_SECONDS` the listener sends
``SELECT 1`` and expects the answer within :data:`PROBE_TIMEOUT_SECONDS`. A partition that
cuts only this connection (its packets dropped, no FIN, no reset) leaves the socket looking
fine for as long as the kernel's keepalive allows (two hours by default) while the server has
long ended the session; the probe notices within seconds, and the listener reconnects.

Behind a pooler in transaction mode (PgBouncer) LISTEN cannot work: the LISTEN runs on
whichever server connection the pooler lends for it, and notifications reach that server
connection, not us. The listener finds out from evidence, never by guess: the LISTEN and every
probe return ``pg_backend_pid()``, and a session that changes under a connection that stayed
up is a pooler's doing. Then LISTEN is given up for good, with one log line that says why and
what to do (``DJASYNC["LISTEN_URL"]``: a connection straight to PostgreSQL); jobs are found by
polling.
"""

from __future__ import annotations

import logging
import select
import time
from typing import Any

from psycopg import pq
from psycopg.conninfo import make_conninfo

from djasync.conf import NOTIFY_CHANNEL
from djasync.connections import one_line

logger = logging.getLogger(__name__)

#: Reconnect delays: the first retry is quick, then doubling up to the maximum, which is kept
#: short so that the listener is back within seconds of the network's return.
RECONNECT_DELAY_SECONDS = 0.1
RECONNECT_DELAY_MAX_SECONDS = 1.0
#: How often an idle LISTEN connection is probed, and how long its answer may take.
PROBE_INTERVAL_SECONDS = 2.0
PROBE_TIMEOUT_SECONDS = 4.0
#: Bound of a connection attempt when the connection parameters give no ``connect_timeout``.
CONNECT_TIMEOUT_SECONDS = 10.0
#: While the socket is being connected libpq waits to *write*, which the supervisor's loop
#: does not watch: it looks again this often instead.
CONNECTING_RECHECK_SECONDS = 0.05
#: Polls that found work while no notification arrived before we warn.
SUSPICIOUS_POLLS_BEFORE_WARNING = 3

# States of the connection. UNAVAILABLE: LISTEN cannot work through this connection (a pooler).
DOWN, CONNECTING, SUBSCRIBING, UP = "down", "connecting", "subscribing", "up"
UNAVAILABLE = "unavailable"
#: The LISTEN, and the probe: each says which server session (process id) answered it.
PROBE = "SELECT pg_backend_pid()"


class Listener:
    def __init__(self, conninfo: dict[str, Any]) -> None:
        params = {**conninfo, "application_name": "djasync-worker listener"}
        params.pop("autocommit", None)
        self._conninfo = make_conninfo(**{k: v for k, v in params.items() if v is not None})
        timeout = params.get("connect_timeout")
        self._connect_timeout = float(timeout) if timeout else CONNECT_TIMEOUT_SECONDS
        self._pgconn: pq.abc.PGconn | None = None
        self.state = DOWN
        self._polling = pq.PollingStatus.WRITING
        self._deadline = 0.0  # of the connection attempt, or of the probe in flight
        self._next_attempt = 0.0
        self._next_probe = 0.0
        self._probing = False
        self._delay = RECONNECT_DELAY_SECONDS
        self._lost_at: float | None = None  # when a connection that was up went down
        self._just_connected = False
        self._suspicious_polls = 0
        self._warned = False
        self.last_notification: float | None = None
        #: The server session that ran our LISTEN, and the last one a statement of ours ran in.
        self._listen_pid: int | None = None
        self._answered_pid: int | None = None
        #: Successful LISTENs: the first connection, then one per reconnect (for metrics).
        self.connects = 0

    @property
    def up(self) -> bool:
        """Whether notifications can arrive now: LISTEN done and the last probe answered."""
        return self.state == UP

    def fileno(self) -> int | None:
        """The socket to wait on for reading, when reading is what the connection waits for."""
        if self._pgconn is None or (self.state == CONNECTING
                                    and self._polling != pq.PollingStatus.READING):
            return None
        return self._pgconn.socket

    def next_deadline(self) -> float:
        """When (``time.monotonic()``) :meth:`ensure` has something to do, if nothing else
        wakes the supervisor first."""
        if self.state == UNAVAILABLE:
            return float("inf")
        if self.state == DOWN:
            return self._next_attempt
        if self.state == CONNECTING and self._polling != pq.PollingStatus.READING:
            return min(self._deadline, time.monotonic() + CONNECTING_RECHECK_SECONDS)
        if self.state == UP and not self._probing:
            return self._next_probe
        return self._deadline

    def ensure(self) -> bool:
        """Take the steps that are due (connect, probe, give up on a silent connection);
        return True if the connection just came (back) up: notifications may have been
        missed meanwhile."""
        now = time.monotonic()
        if self.state == UNAVAILABLE:
            return False
        if self.state == DOWN and now >= self._next_attempt:
            self._start_connecting(now)
        if self.state == CONNECTING and self._polling != pq.PollingStatus.READING:
            self._connect_step()
        if self.state in (CONNECTING, SUBSCRIBING) and now >= self._deadline:
            self._fail(f"no answer from the server within {self._connect_timeout:g} s")
        elif self.state == UP:
            if self._probing and now >= self._deadline:
                self._fail(f"the server did not answer a probe within "
                           f"{PROBE_TIMEOUT_SECONDS:g} s")
            elif not self._probing and now >= self._next_probe:
                self._send(PROBE)
                self._probing, self._deadline = True, now + PROBE_TIMEOUT_SECONDS
        just_connected, self._just_connected = self._just_connected, False
        return just_connected

    def receive(self) -> list[str]:
        """Read what the socket has: return the payloads (queue names) of the notifications."""
        if self._pgconn is None:
            return []
        if self.state == CONNECTING:
            self._connect_step()
            return []
        pgconn = self._pgconn
        try:
            pgconn.consume_input()
            payloads = []
            while (notify := pgconn.notifies()) is not None:
                payloads.append(notify.extra.decode(pgconn._encoding, "replace"))
            if not pgconn.is_busy():
                self._read_results()
        except Exception as exc:  # psycopg.OperationalError, or a LISTEN the server refused
            self._fail(str(exc).strip())
            return []
        if payloads:
            self.last_notification = time.monotonic()
            self._suspicious_polls = 0
            self._warned = False
        return payloads

    def poll_found_work(self) -> None:
        """Note that a poll (not a notification) found due jobs; warn once if it keeps on
        while the LISTEN connection is up (when it is down, the polls are expected)."""
        if not self.up:
            self._suspicious_polls = 0
            return
        self._suspicious_polls += 1
        if self._suspicious_polls >= SUSPICIOUS_POLLS_BEFORE_WARNING and not self._warned:
            self._warned = True
            last = ("none since it connected" if self.last_notification is None else
                    f"the last {time.monotonic() - self.last_notification:.0f} s ago")
            logger.warning(
                "notifications are not arriving: %s polls in a row found jobs that no NOTIFY "
                "announced, while the LISTEN connection is up and answers its probes "
                "(notifications received: %s). Jobs still run, found by polling every "
                "--poll-interval seconds, with that much more latency. Either the jobs were "
                "written without djasync.schedule(), or something between the worker and "
                "PostgreSQL does not pass notifications (a connection pooler in transaction "
                "mode does not).",
                self._suspicious_polls, last,
            )

    @property
    def unavailable(self) -> bool:
        """Whether LISTEN was given up for good (a pooler: see the module's docstring)."""
        return self.state == UNAVAILABLE

    def close(self) -> None:
        self._close()
        if self.state != UNAVAILABLE:
            self.state = DOWN

    # -- steps ------------------------------------------------------------------------------

    def _start_connecting(self, now: float) -> None:
        self._pgconn = pq.PGconn.connect_start(self._conninfo.encode())
        if self._pgconn.status == pq.ConnStatus.BAD:
            self._fail(self._error())
            return
        self._pgconn.nonblocking = 1
        self.state, self._polling = CONNECTING, pq.PollingStatus.WRITING
        self._deadline = now + self._connect_timeout

    def _connect_step(self) -> None:
        """Advance the connection attempt, once the socket is ready the way libpq waits for."""
        assert self._pgconn is not None
        if self._polling == pq.PollingStatus.WRITING and not _writable(self._pgconn.socket):
            return  # libpq would take a socket still connecting for a connected one
        self._polling = pq.PollingStatus(self._pgconn.connect_poll())
        if self._polling == pq.PollingStatus.FAILED:
            self._fail(self._error())
        elif self._polling == pq.PollingStatus.OK:
            self._send(f"LISTEN {NOTIFY_CHANNEL}; {PROBE}")  # one query: one server session
            if self.state == CONNECTING:
                self.state = SUBSCRIBING

    def _send(self, query: str) -> None:
        assert self._pgconn is not None
        try:
            self._pgconn.send_query(query.encode())
            self._pgconn.flush()  # a few bytes: the socket's buffer takes them, or it is dead
        except Exception as exc:
            self._fail(str(exc).strip())

    def _read_results(self) -> None:
        """Read the answer to LISTEN or to the probe, whichever is in flight."""
        assert self._pgconn is not None
        pid, answered = None, False
        while (result := self._pgconn.get_result()) is not None:
            answered = True
            if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                message = (result.error_message or b"").decode(self._pgconn._encoding, "replace")
                raise RuntimeError(f"the server refused it: {message.strip()}")
            if result.status == pq.ExecStatus.TUPLES_OK and result.ntuples:
                value = result.get_value(0, 0)
                pid = int(value) if value is not None else None
        if not answered:  # woken by notifications alone: the probe stays due when it was
            return
        now = time.monotonic()
        if self.state == SUBSCRIBING:
            self._listen_pid = self._answered_pid = pid
            self._on_up(now)
        elif self._probing:
            self._probing = False
            self._answered_pid = pid
            if pid is not None and self._listen_pid is not None and pid != self._listen_pid:
                self._give_up_behind_a_pooler(pid)
                return
        self._next_probe = now + PROBE_INTERVAL_SECONDS

    def _on_up(self, now: float) -> None:
        self.state, self._probing = UP, False
        self._delay = RECONNECT_DELAY_SECONDS
        self.connects += 1
        self._just_connected = True
        if self._lost_at is not None:
            logger.info("LISTEN connection back after %.1f s channel=%s", now - self._lost_at,
                        NOTIFY_CHANNEL)
            self._lost_at = None
        else:
            logger.info("listening channel=%s", NOTIFY_CHANNEL)
        assert self._pgconn is not None
        if self._listen_pid is not None and self._pgconn.backend_pid != self._listen_pid:
            # Direct, the two are the same process; a pooler answers the connection itself.
            logger.info(
                "the LISTEN connection goes through a connection pooler (its session is pid %s, "
                "the connection was opened with backend key %s). In session mode LISTEN works; "
                "in transaction mode it cannot: this is checked on every probe, and then "
                "DJASYNC['LISTEN_URL'] (straight to PostgreSQL) is what gives wake-ups back.",
                self._listen_pid, self._pgconn.backend_pid)

    def _give_up_behind_a_pooler(self, pid: int) -> None:
        """Evidence that the connection does not keep its server session: LISTEN cannot work
        through it. Stop for good (the next connection would be pooled the same way)."""
        logger.warning(
            "LISTEN unavailable: the LISTEN connection ran its LISTEN in server session pid %s "
            "and a later probe in pid %s without reconnecting, so a connection pooler "
            "in transaction mode (PgBouncer) hands its statements to any server connection, and "
            "notifications cannot reach it. Jobs are found by polling every --poll-interval "
            "seconds instead. Set DJASYNC['LISTEN_URL'] to a connection straight to PostgreSQL "
            "for wake-ups within milliseconds.",
            self._listen_pid, pid)
        self._close()
        self.state, self._probing = UNAVAILABLE, False

    def _fail(self, reason: str) -> None:
        """Drop the connection and schedule the next attempt; log once per outage."""
        reason = one_line(reason)
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at = now
            what = "lost" if self.state == UP else "failed"
            logger.warning("LISTEN connection %s, reconnecting (jobs are found by polling "
                           "meanwhile) reason=%s", what, reason)
        else:
            logger.debug("LISTEN connection attempt failed reason=%s", reason)
        self._close()
        self.state, self._probing = DOWN, False
        self._next_attempt = now + self._delay
        self._delay = min(self._delay * 2, RECONNECT_DELAY_MAX_SECONDS)

    def _error(self) -> str:
        assert self._pgconn is not None
        return self._pgconn.get_error_message().strip() or "connection failed"

    def _close(self) -> None:
        if self._pgconn is not None:
            self._pgconn.finish()  # sends Terminate if it can, never waits
        self._pgconn = None


def _writable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(0))
