"""The worker's transaction in two round trips: statements sent together, plans kept.

Run through Django's ``atomic`` and psycopg one statement at a time, a job costs six round trips
(BEGIN, claim, SAVEPOINT, RELEASE, finish, COMMIT). On this kind of machine each one costs more
in system calls and wake-ups than the statement itself, so the worker sends them in two
messages of PostgreSQL's simple query protocol instead::

    BEGIN; EXECUTE djasync_claim_…(…); SAVEPOINT djasync_job
    … the job runs …
    RELEASE SAVEPOINT djasync_job; EXECUTE djasync_finish_…(…); COMMIT

The claim and the finish are server-side prepared statements (``PREPARE`` once per
connection, a separate round trip the first time), so PostgreSQL plans them once (planning
the claim costs about twice what running it does). Their parameters are written into the
``EXECUTE`` as literals by psycopg's client-side binding. If the database OPTIONS set
``prepare_threshold`` (``None`` for a PgBouncer that cannot keep prepared statements), the
statements are sent whole instead (see :func:`prepared_statements_allowed`). djasync never
asks psycopg itself to prepare (``prepare=True``): psycopg answers a ROLLBACK with DEALLOCATE
ALL when it has prepared statements of its own, which would drop these too.

:class:`djasync.executor` keeps Django's view of the transaction right (see its ``_FastBatch``).
"""

from __future__ import annotations

import datetime
import hashlib
import re
from typing import Any

import psycopg
from django.db import connection

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


class Statements:
    """Prepared statements of one connection, and its client-side-binding cursor."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw
        self.cursor = psycopg.ClientCursor(raw)
        self.prepare = prepared_statements_allowed()
        #: By query: the prepared statement's name, its parameters' names in order and its
        #: ``EXECUTE name(%(a)s, …)`` for psycopg; or None when statements are sent whole.
        self._templates: dict[str, tuple[str, list[str], str] | None] = {}
        self._escaping = psycopg.pq.Escaping(raw.pgconn)
        self._encoding = raw.info.encoding

    def render(self, query: str, params: dict[str, Any]) -> str:
        """Return ``query`` with ``params`` as one SQL string: an EXECUTE of it, prepared."""
        if query not in self._templates:
            self._templates[query] = self._prepare(query) if self.prepare else None
        prepared = self._templates[query]
        if prepared is None:
            return self.cursor.mogrify(query, params)
        name, names, template = prepared
        literals = [self._literal(params[n]) for n in names]
        if None in literals:  # a type _literal leaves to psycopg (arrays, naive datetimes)
            return self.cursor.mogrify(template, params)
        return f"EXECUTE {name}({', '.join(literals)})"  # type: ignore[arg-type]

    def _literal(self, value: Any) -> str | None:
        """The SQL literal of a parameter of a per-job EXECUTE, or None to let psycopg's
        ``mogrify`` render the statement. Only the types of the finish statements' parameters,
        quoted by libpq itself (``PQescapeLiteral``): ``mogrify``'s general adaptation cost
        more per job than the rest of the job's Python code together (profiled)."""
        if value is None:
            return "NULL"
        kind = type(value)
        if kind is int:
            return str(value)
        if kind is str:
            if "\x00" in value:  # libpq would cut the string there; mogrify refuses it
                return None
            return self._escaping.escape_literal(value.encode(self._encoding)).decode(
                self._encoding)
        if kind is datetime.datetime and value.tzinfo is not None:
            return f"'{value.isoformat()}'"  # digits, '-', ':', '.', '+', 'T': nothing to quote
        return None

    def _prepare(self, query: str) -> tuple[str, list[str], str]:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match[1] not in names:
                names.append(match[1])
            return f"${names.index(match[1]) + 1}"

        body = _PLACEHOLDER.sub(number, query)
        # The name is the statement's digest: a session (a pooled server connection, one this
        # process prepared on before an error made it forget) that already has the name has
        # the very same statement, never another one.
        name = "djasync_" + hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()[:20]
        # Asked first, not tried and caught: this may run inside the worker's transaction
        # (the finish statement, prepared again after a DEALLOCATE), where a failed PREPARE
        # would abort the transaction and with it the job that just ran.
        cursor = psycopg.Cursor(self.raw)
        cursor.execute("SELECT FROM pg_prepared_statements WHERE name = %s", [name])
        if cursor.fetchone() is None:
            cursor.execute(f"PREPARE {name} AS {body}")
        return name, names, f"EXECUTE {name}(" + ", ".join(f"%({n})s" for n in names) + ")"

    def begin(self) -> str:
        """The BEGIN psycopg itself would send: Django's ``isolation_level`` option (psycopg's
        ``isolation_level``, ``read_only``, ``deferrable``) applies to the worker's transaction
        as to any ``atomic`` block."""
        raw = self.raw
        parts = ["BEGIN"]
        if raw.isolation_level is not None:
            level = psycopg.IsolationLevel(raw.isolation_level).name.replace("_", " ")
            parts.append(f"ISOLATION LEVEL {level}")
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

    def send(self, text: str) -> psycopg.ClientCursor[Any]:
        """Send several statements in one message; return the cursor on their results."""
        with connection.wrap_database_errors:  # Django's exception classes, as the ORM raises
            try:
                self.cursor.execute(text)
            except psycopg.errors.InvalidSqlStatementName:
                # Someone ran DEALLOCATE ALL or DISCARD ALL on this session (psycopg does when
                # its own prepared statements are on and it sees a ROLLBACK): prepare again
                # next time. This transaction fails and rolls back; the worker retries it.
                self._templates.clear()
                raise
        return self.cursor


def prepared_statements_allowed() -> bool:
    """Whether djasync may keep server-side prepared statements on Django's connection.

    Yes with Django's default, where psycopg prepares nothing itself. Not if the database
    OPTIONS set ``prepare_threshold``: ``None`` is how to say that a PgBouncer in transaction
    mode sits in front (it cannot keep SQL-level prepared statements), and with a number
    psycopg prepares statements of its own and answers every ROLLBACK with DEALLOCATE ALL,
    which would drop djasync's too. Then the statements are sent whole, planned every time.
    """
    return "prepare_threshold" not in connection.settings_dict.get("OPTIONS", {})


#: The :class:`Statements` of each database alias's current connection. One slot per alias:
#: a reconnect replaces it (a weak-keyed cache would never let go, as its value refers to
#: its key).
_statements: dict[str, Statements] = {}


def statements() -> Statements:
    """The :class:`Statements` of Django's connection (made once per connection)."""
    connection.ensure_connection()
    raw = connection.connection
    found = _statements.get(connection.alias)
    if found is None or found.raw is not raw or found.cursor.closed:
        found = _statements[connection.alias] = Statements(raw)
    return found
