"""The worker's transaction in one round trip per job: statements pipelined, plans kept.

Run through Django's ``atomic`` and psycopg one statement at a time, a job costs six round trips
(BEGIN, claim, SAVEPOINT, RELEASE, finish, COMMIT). On this kind of machine each one costs more
in system calls and wake-ups than the statement itself, so the worker sends them together, in
one pipeline of PostgreSQL's extended query protocol (libpq's pipeline mode, one Sync at the
end)::

    RELEASE SAVEPOINT djasync_job · finish(…) · COMMIT · BEGIN · claim(…) · SAVEPOINT djasync_job

Every statement, BEGIN and COMMIT included, is a protocol-level prepared statement (parsed and
planned once per connection, as ``pgbench -M prepared`` does); a job's parameters travel in
text format, adapted by psycopg's own dumpers for the connection (Django's included), and its
rows come back through psycopg's loaders. Compared with the same statements as one
simple-query string of ``EXECUTE``s, PostgreSQL parses nothing per job (``bench/loop.py``:
about 10 µs less server CPU and 15 µs less client CPU per job; W1 at ``--concurrency 4`` went
from 65% to 77% of the raw-SQL floor, in bench runs minutes apart). If a statement fails,
PostgreSQL skips the rest of the pipeline up to the Sync, as it skips the rest of a simple-query
string.

If the database OPTIONS set ``prepare_threshold`` (``None`` for a PgBouncer that cannot keep
prepared statements), the statements are sent unnamed, parsed every time (see
:func:`prepared_statements_allowed`). Behind a connection pooler, djasync finds out once per
connection whether the pooler carries prepared statements (PgBouncer 1.21+ with
``max_prepared_statements``: they stay prepared) or passes them through to whichever server
connection it lends (older ones: they go unnamed), see :meth:`Statements._pooler_carries`.
djasync never asks psycopg itself to prepare (``prepare=True``): psycopg answers a ROLLBACK
with DEALLOCATE ALL when it has prepared statements of its own, which would drop these too.

:class:`djasync.executor` keeps Django's view of the transaction right (see its ``_FastBatch``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import selectors
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import psycopg
from django.db import connection, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer

logger = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")

#: One statement ready to send: its prepared name (None: sent unnamed), its text with ``$n``
#: placeholders and its parameters in text format.
Command = tuple[bytes | None, bytes, Sequence[bytes | bytearray | memoryview | None] | None]

_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)


class Statements:
    """The prepared statements of one connection, and the pipeline that sends them."""

    def __init__(self, raw: psycopg.Connection[Any], db: BaseDatabaseWrapper) -> None:
        self.raw = raw
        #: Django's connection object that ``raw`` belongs to.
        self.db = db
        self.pgconn = raw.pgconn
        self.prepare = prepared_statements_allowed() and raw not in _unnamed
        #: libpq's pipeline mode (libpq 14 and newer; psycopg[binary] bundles a newer one).
        self.pipeline = psycopg.Pipeline.is_supported()
        #: By query (``%(name)s`` placeholders): its prepared name or None, its text and its
        #: parameters' names in ``$n`` order.
        self._statements: dict[str, tuple[bytes | None, bytes, list[str]]] = {}
        self._adapt = Transformer(raw)
        self._formats: dict[int, list[PyFormat]] = {}
        self._plain: dict[str, Command] = {}
        self._selector: selectors.BaseSelector | None = None
        self._waiting_for = 0
        #: Which of the commands of the last :meth:`send` failed (its index), if one did: the
        #: executor tells a finish that failed (nothing committed) from a claim that failed
        #: after the COMMIT before it went through.
        self.failed_at: int | None = None

    def plain(self, text: str) -> Command:
        """A statement without parameters, sent unnamed (parsed each time): for those that
        follow a job's code in its transaction (RELEASE, the finish's plan setting, COMMIT).
        A job that drops the session's prepared statements (``DEALLOCATE ALL``) must not make
        them fail: the failure it just recorded would be rolled back with them. Unnamed, each
        costs PostgreSQL a few µs more than prepared."""
        found = self._plain.get(text)
        if found is None:
            found = self._plain[text] = (None, text.encode(), None)
        return found

    def command(self, query: str, params: dict[str, Any] | None = None) -> Command:
        """``query`` (prepared now if new) with ``params``, ready for :meth:`send`."""
        found = self._statements.get(query)
        if found is None:
            found = self._statements[query] = self._statement(query)
        name, body, names = found
        if not names:
            return name, body, None
        assert params is not None
        formats = self._formats.get(len(names))
        if formats is None:
            formats = self._formats[len(names)] = [PyFormat.TEXT] * len(names)
        with self.db.wrap_database_errors:  # a str with a NUL: DataError, as psycopg says
            values = self._adapt.dump_sequence([params[n] for n in names], formats)
        return name, body, values

    def _statement(self, query: str) -> tuple[bytes | None, bytes, list[str]]:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match[1] not in names:
                names.append(match[1])
            return f"${names.index(match[1]) + 1}"

        body = _PLACEHOLDER.sub(number, query)
        if not self.prepare or self.raw in _unnamed:  # (found out by another Statements)
            return None, body.encode(), names
        # The name is the statement's digest: a session (a pooled server connection, one this
        # process prepared on before an error made it forget) that already has the name has
        # the very same statement, never another one.
        name = "djasync_" + hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()[:20]
        known = _prepared.get(self.raw)
        with self.db.wrap_database_errors:
            if known is None:
                known = _prepared[self.raw] = self._known_names()
                if not self.prepare:  # a pooler that does not carry them
                    return None, body.encode(), names
            if name not in known:
                try:
                    (result,) = self._exchange([(None, body.encode(), None)],
                                               prepare=name.encode())
                except BaseException:
                    self._forget_prepared()  # prepared or not: ask the server next time
                    raise
                if result.status != pq.ExecStatus.COMMAND_OK:
                    raise psycopg.errors.error_from_result(result, encoding=self._encoding)
                known.add(name)
        return name.encode(), body.encode(), names

    def _known_names(self) -> set[str]:
        """The names of djasync's statements this connection's session has prepared.

        Asked, not tried and caught: this may run inside the worker's transaction (the finish
        statement, prepared again after a DEALLOCATE), where a failed Parse would abort the
        transaction and with it the job that just ran. Behind a pooler (the session answering
        is not the one the connection was given a key for), the server's list says nothing
        about this connection: PgBouncer 1.21+ (``max_prepared_statements``) prepares each
        client's statements under names of its own, tracks the client's names itself, and
        drops a client that prepares one of its names twice. So a pooled connection starts
        with none, and is closed rather than asked again (see :meth:`_forget_prepared`); and
        if the pooler does not carry prepared statements at all, the connection's statements
        go unnamed from now on (``self.prepare`` turns false).
        """
        cursor = psycopg.Cursor(self.raw)
        cursor.execute("SELECT pg_backend_pid(), ARRAY(SELECT name FROM pg_prepared_statements"
                       " WHERE starts_with(name, 'djasync_'))")
        row = cursor.fetchone()
        assert row is not None
        pid, names = row
        if pid == self.raw.info.backend_pid:
            return set(names)
        _pooled.add(self.raw)
        carries = self._pooler_carries()
        if not carries:
            _unnamed.add(self.raw)
            self.prepare = False
        global _warned_pooled
        if _warned_pooled != carries:
            _warned_pooled = carries
            if carries:
                logger.info(
                    "djasync's statements stay prepared through the connection pooler: it "
                    "carries prepared statements (PgBouncer 1.21+ with max_prepared_statements)")
            else:
                logger.info(
                    "djasync's statements go unnamed (parsed every time) through the connection "
                    "pooler: it does not carry prepared statements (PgBouncer older than 1.21, "
                    "max_prepared_statements = 0, or session mode); PgBouncer 1.21+ with "
                    "max_prepared_statements > 0 keeps them prepared (docs/howto/pgbouncer.md)")
        return set()

    def _pooler_carries(self) -> bool:
        """Whether the pooler in front carries protocol-level prepared statements.

        In one transaction (so on one server connection), prepare a statement under a name
        of its own and look for that name on the server: PgBouncer 1.21+ with
        ``max_prepared_statements`` prepares it there under a name of its own
        (``PGBOUNCER_n``) and keeps the client's; an older one passes the name through, to a
        server connection the next transaction may not get (``prepared statement … does not
        exist``), and where another client preparing the same name would fail. Found, it is
        deallocated again in that transaction: nothing is left for the pool's other clients.
        Runs once per pooled connection; inside the caller's transaction if one is open."""
        probe = f"djasync_probe_{secrets.token_hex(8)}"
        own = self.pgconn.transaction_status == pq.TransactionStatus.IDLE
        if own:
            self._checked(self._exchange([(None, b"BEGIN", None)]))
        try:
            self._checked(self._exchange([(None, b"SELECT 1", None)], prepare=probe.encode()))
            (found,) = self._checked(self._exchange([(
                None, b"SELECT count(*) FROM pg_prepared_statements WHERE name = $1",
                [probe.encode()])]))
            passed_through = found.get_value(0, 0) != b"0"
            if passed_through:
                self._checked(self._exchange([(None, f'DEALLOCATE "{probe}"'.encode(), None)]))
        finally:
            if own and self.pgconn.transaction_status != pq.TransactionStatus.UNKNOWN:
                self._checked(self._exchange([(None, b"ROLLBACK", None)]))
        return not passed_through

    def _checked(self, results: list[pq.abc.PGresult]) -> list[pq.abc.PGresult]:
        for result in results:
            if result.status not in _OK:
                raise psycopg.errors.error_from_result(result, encoding=self._encoding)
        return results

    def _forget_prepared(self, missing: bool = False) -> None:
        """Whether djasync's statements are still prepared is unknown (a failed prepare, or
        one found ``missing``): ask the session next time; behind a pooler, where asking cannot
        tell, close the connection: a new one starts with none (the transaction fails either
        way, and the worker runs it again)."""
        self._statements.clear()
        _prepared.pop(self.raw, None)
        if self.raw in _pooled:
            global _warned_missing
            if missing and not _warned_missing:
                _warned_missing = True
                logger.warning(
                    "a statement djasync prepared through the connection pooler is missing on "
                    "the server connection it was sent to: the pooler does not carry prepared "
                    "statements (PgBouncer older than 1.21, or max_prepared_statements = 0). "
                    "Set the database OPTIONS {'prepare_threshold': None} (djasync's "
                    "statements then go unnamed), or max_prepared_statements in pgbouncer.ini")
            self._close()

    @property
    def _encoding(self) -> str:
        return self.raw.info.encoding

    def begin(self, *, worker: bool = False) -> str:
        """The BEGIN psycopg itself would send: Django's ``isolation_level`` option (psycopg's
        ``isolation_level``, ``read_only``, ``deferrable``) applies to the worker's transaction
        as to any ``atomic`` block, with one exception (``worker``, the transaction that claims
        jobs and runs them): SERIALIZABLE becomes REPEATABLE READ. Every worker's claim reads
        the rows (and index pages) that the other workers' finishes write, so SSI sees a cycle
        between any two busy workers and cancelled about half of the job transactions (1,248
        runs for 600 jobs at ``--concurrency 3``). REPEATABLE READ keeps the job's snapshot and
        its protection against lost updates, without predicate locks."""
        raw = self.raw
        parts = ["BEGIN"]
        if raw.isolation_level is not None:
            level = psycopg.IsolationLevel(raw.isolation_level)
            if worker and level == psycopg.IsolationLevel.SERIALIZABLE:
                level = psycopg.IsolationLevel.REPEATABLE_READ
            parts.append(f"ISOLATION LEVEL {level.name.replace('_', ' ')}")
        if raw.read_only is not None:
            parts.append("READ ONLY" if raw.read_only else "READ WRITE")
        if raw.deferrable is not None:
            parts.append("DEFERRABLE" if raw.deferrable else "NOT DEFERRABLE")
        return " ".join(parts)

    def began(self) -> None:
        """After our BEGIN went through in autocommit mode: turn psycopg's autocommit flag off
        again, as it is in any Django ``atomic`` block. Code in the job reads it: Django makes
        ``QuerySet.iterator()`` cursors ``WITH HOLD`` under autocommit, which PostgreSQL refuses
        with ``select_for_update()`` and materialises at COMMIT. psycopg's setter refuses
        inside a transaction, hence the attribute; psycopg sends no BEGIN of its own while
        the server is in a transaction, and Django's ``atomic`` turns autocommit back on."""
        self.raw._autocommit = False

    def send(self, commands: Sequence[Command]) -> list[pq.abc.PGresult]:
        """Send ``commands`` in one pipeline; return their results, in order.

        As psycopg would, begin the transaction first if psycopg is out of autocommit mode
        (inside Django's ``atomic``) and none is open. If a statement fails, the ones after it
        did not run and its error is raised, as Django's exception class.
        """
        self.failed_at = None
        if not self.raw.autocommit and self.pgconn.transaction_status == pq.TransactionStatus.IDLE:
            return self._send([self.command(self.begin()), *commands], first=-1)[1:]
        return self._send(commands)

    def _send(self, commands: Sequence[Command], first: int = 0) -> list[pq.abc.PGresult]:
        with self.db.wrap_database_errors:  # Django's exception classes, as the ORM raises
            results = self._exchange(commands)
            for number, result in enumerate(results, first):
                if result.status not in _OK:  # the first that failed (the rest were skipped)
                    self.failed_at = number
                    error = psycopg.errors.error_from_result(result, encoding=self._encoding)
                    if isinstance(error, psycopg.errors.InvalidSqlStatementName):
                        # Someone ran DEALLOCATE ALL or DISCARD ALL on this session (psycopg
                        # does when its own prepared statements are on and it sees a
                        # ROLLBACK): prepare again next time. This transaction fails and rolls
                        # back; the worker retries it.
                        self._forget_prepared(missing=True)
                    raise error
        return results

    def _exchange(self, commands: Sequence[Command],
                  prepare: bytes | None = None) -> list[pq.abc.PGresult]:
        """One round trip: every command, a Sync, then every result up to the Sync's. Without
        pipeline mode (libpq older than 14), or to ``prepare`` the one command under that
        name: one round trip per command, up to the first that fails.

        psycopg's connection lock is held, as psycopg holds it for any query. The waits are
        psycopg's kind (the socket polled, the GIL released; not libpq's blocking calls, which
        would stall the process's other threads). Interrupted (Ctrl-C), the exchange is
        cancelled and read to its end, as psycopg does, so the connection stays usable; if it
        cannot finish (the connection broke), the connection is closed: PostgreSQL rolls its
        transaction back, and psycopg and Django see a closed connection, as after any lost
        connection.
        """
        pgconn = self.pgconn
        pipeline = self.pipeline and prepare is None
        with self.raw.lock:
            if pgconn.pipeline_status != pq.PipelineStatus.OFF:
                # The caller's code is inside psycopg's own pipeline (``raw.pipeline()``):
                # refused before anything is sent, the connection untouched.
                raise psycopg.NotSupportedError(
                    "djasync cannot run inside a psycopg pipeline block: call it outside it")
            try:
                if not pipeline:
                    results = []
                    for command in commands:
                        if prepare is not None:
                            pgconn.send_prepare(prepare, command[1])
                        else:
                            self._put(command)
                        self._flush()
                        results.append(self._result())
                        if results[-1].status not in _OK:
                            break
                    self._hand_over_notifications()
                    return results
                pgconn.enter_pipeline_mode()
                for command in commands:
                    self._put(command)
                pgconn.pipeline_sync()
                self._flush()
                results = [self._result() for _ in commands]
                sync = self._next()
                if sync is None or sync.status != pq.ExecStatus.PIPELINE_SYNC:
                    raise self._broken()
                pgconn.exit_pipeline_mode()
                self._hand_over_notifications()
                return results
            except BaseException as exc:
                if isinstance(exc, psycopg.Error) or not self._recover():
                    self._close()
                raise

    def _close(self) -> None:
        """Close the connection mid-exchange, and tell Django (it closes and replaces a
        connection with errors at the end of a request), also when what interrupted the
        exchange is not a database error (a second Ctrl-C during :meth:`_recover`)."""
        self.raw.close()
        self.db.errors_occurred = True

    def _recover(self) -> bool:
        """After an interruption mid-exchange (whatever the point it reached): cancel what
        runs and read every result, so that the connection is left as psycopg leaves it after
        a Ctrl-C. Return whether it worked."""
        pgconn = self.pgconn
        try:
            if pgconn.status != pq.ConnStatus.OK:
                return False
            # A cancel reaching an idle session is ignored by PostgreSQL: send it regardless
            # (with a time limit, as psycopg does after a Ctrl-C).
            self.raw.cancel_safe(timeout=5.0)
            if pgconn.pipeline_status == pq.PipelineStatus.OFF:
                self._flush()
                while self._next() is not None:
                    pass
                return True
            # A Sync of our own (one more if the exchange sent its own), so that PostgreSQL
            # answers everything queued; then read until libpq lets us leave pipeline mode.
            pgconn.pipeline_sync()
            self._flush()
            while True:
                try:
                    pgconn.exit_pipeline_mode()
                    return True
                except psycopg.OperationalError:  # results still to read
                    self._next()
        except BaseException:
            return False

    def _put(self, command: Command) -> None:
        name, body, params = command
        if name is None:
            self.pgconn.send_query_params(body, params)
        else:
            self.pgconn.send_query_prepared(name, params)

    def _result(self) -> pq.abc.PGresult:
        """The one result of the next command (each of ours has one), and the end of them."""
        result = self._next()
        if result is None or self._next() is not None:
            raise self._broken()
        return result

    def _next(self) -> pq.abc.PGresult | None:
        pgconn = self.pgconn
        while pgconn.is_busy():
            self._wait(selectors.EVENT_READ)
            pgconn.consume_input()
        return pgconn.get_result()

    def _hand_over_notifications(self) -> None:
        """Give psycopg the notifications that came in with our results, as its own reads do
        (for code that LISTENs on Django's connection: ``notifies()``, notify handlers)."""
        pgconn = self.pgconn
        while (notification := pgconn.notifies()) is not None:
            if pgconn.notify_handler is not None:
                pgconn.notify_handler(notification)

    def _flush(self) -> None:
        """Send what libpq still holds (a long message), reading meanwhile if PostgreSQL
        answers, so that neither side waits on a full buffer."""
        while self.pgconn.flush():
            if self._wait(selectors.EVENT_READ | selectors.EVENT_WRITE) & selectors.EVENT_READ:
                self.pgconn.consume_input()

    def _wait(self, events: int) -> int:
        selector = self._selector
        if selector is None:
            selector = self._selector = selectors.DefaultSelector()
            selector.register(self.pgconn.socket, events)
            self._waiting_for = events
        elif events != self._waiting_for:
            selector.modify(self.pgconn.socket, events)
            self._waiting_for = events
        ready = 0
        while not ready:
            ready = sum(mask for _, mask in selector.select())
        return ready

    def _broken(self) -> psycopg.OperationalError:
        message = self.pgconn.error_message.decode(self._encoding, "replace").strip()
        return psycopg.OperationalError(message or "the connection broke mid-exchange")

    def rows(self, result: pq.abc.PGresult) -> list[tuple[Any, ...]]:
        """The rows of a result, through the connection's loaders (Django's included)."""
        self._adapt.set_pgresult(result)
        return self._adapt.load_rows(0, result.ntuples, tuple)


def prepared_statements_allowed() -> bool:
    """Whether djasync may keep server-side prepared statements on Django's connection.

    Yes with Django's default, where psycopg prepares nothing itself. Not if the database
    OPTIONS set ``prepare_threshold``: ``None`` is how to say that a PgBouncer in transaction
    mode sits in front, and with a number psycopg prepares statements of its own and answers
    every ROLLBACK with DEALLOCATE ALL, which would drop djasync's too. Then the statements are
    sent unnamed, planned every time.
    """
    return "prepare_threshold" not in connection.settings_dict.get("OPTIONS", {})


#: The names of djasync's statements prepared on each connection: every :class:`Statements`
#: of a connection reads and adds to the same set (a thread's, another's; old and new).
_prepared: weakref.WeakKeyDictionary[psycopg.Connection[Any], set[str]] = (
    weakref.WeakKeyDictionary())
#: The connections found to go through a pooler (see :meth:`Statements._known_names`).
_pooled: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()
#: Those of them whose pooler does not carry prepared statements: their statements go unnamed.
_unnamed: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()
#: What the log said last about a pooler (None: nothing yet; True: it carries them).
_warned_pooled: bool | None = None
_warned_missing = False

#: The :class:`Statements` of each database alias's current connection, per thread (Django's
#: connections are per thread). One slot per alias: a reconnect replaces it (a weak-keyed
#: cache would never let go, as its value refers to its key).
_local = threading.local()


def statements() -> Statements:
    """The :class:`Statements` of Django's connection (made once per connection)."""
    connection.ensure_connection()
    raw = connection.connection
    mine: dict[str, Statements] | None = getattr(_local, "statements", None)
    if mine is None:
        mine = _local.statements = {}
    found = mine.get(connection.alias)
    if found is None or found.raw is not raw or raw.closed:
        found = mine[connection.alias] = Statements(raw, connections[connection.alias])
    return found
