"""libpq options that make the worker's connections notice a dead peer within seconds.

A silent network partition (packets dropped, no FIN, no reset) is invisible to an idle TCP
connection for two hours (the kernel's keepalive default), and a connection with data in
flight retransmits for some fifteen minutes before it gives up. Until then a worker cut off
from PostgreSQL waits, and after the network returns it reconnects only when TCP's back-off
lets it. These options bound both: keepalive probes end an idle connection after
``keepalives_idle + keepalives_interval * keepalives_count`` seconds of silence,
``tcp_user_timeout`` ends one whose sent data stays unacknowledged (a COMMIT sent into the
void), and ``connect_timeout`` bounds a connection attempt.

They protect the worker's side only. The job's row lock is held by the server's session, which
ends when the *server* notices the dead peer: that is the server recipe of
docs/howto/network-failures.md (``tcp_keepalives_*``, ``tcp_user_timeout``,
``client_connection_check_interval``).

Only the worker daemon applies them, to its own processes, unless the project's ``DATABASES``
``OPTIONS`` already say otherwise (the project's values win). The web application keeps its
settings; a project that wants the same there puts the options in ``DATABASES`` itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.db import connections

#: Defaults: an idle connection is given up after 4 s of silence (a probe after 2 s, then every
#: second; on Linux ``tcp_user_timeout`` decides when), one with unacked data after 4 s, a
#: connection attempt after 5 s (libpq's minimum is 2). Shorter than the server recipe's 6 s
#: (docs/howto/network-failures.md), for two reasons. A host cut off both ways stops its
#: running job (the supervisor's fence) before the server frees it. And when only what the
#: host receives is dropped, the server hears the host until the host gives up: a message
#: whose answer is lost is retransmitted for up to 3 s (TCP doubles its wait from 0.2 s), and
#: each retransmit restarts the server's timer; a job blocked elsewhere (an HTTP call) that
#: talks to the database just before the host ends its idle connection (4 s) holds its job
#: for 4 + 3 + 6.5 s at most.
DEFAULTS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 2,
    "tcp_user_timeout": 4_000,  # milliseconds, as libpq counts it
    "connect_timeout": 5,
}

#: Accepted keys and their bounds (libpq's units: seconds, but milliseconds for tcp_user_timeout).
BOUNDS: dict[str, tuple[int, int]] = {
    "keepalives": (0, 1),
    "keepalives_idle": (1, 7200),
    "keepalives_interval": (1, 600),
    "keepalives_count": (1, 100),
    "tcp_user_timeout": (0, 3_600_000),
    "connect_timeout": (0, 3600),
}


def check(raw: Any) -> dict[str, int | None]:
    """Validate ``DJASYNC["WORKER_CONNECTION_OPTIONS"]``; return the options it describes.

    The value is a dict of libpq parameters merged over :data:`DEFAULTS`; ``None`` for a key
    removes that default (libpq's own default applies).
    """
    from djasync.exceptions import ImproperlyConfigured

    name = "DJASYNC['WORKER_CONNECTION_OPTIONS']"
    if not isinstance(raw, dict):
        raise ImproperlyConfigured(f"{name} must be a dict of libpq parameters, "
                                   f"not {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(BOUNDS))
    if unknown:
        raise ImproperlyConfigured(
            f"{name} has unknown key(s) {', '.join(map(str, unknown))}; known keys: "
            f"{', '.join(BOUNDS)}."
        )
    for key, value in raw.items():
        low, high = BOUNDS[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not low <= value <= high):
            unit = " (milliseconds)" if key == "tcp_user_timeout" else ""
            raise ImproperlyConfigured(
                f"{name}[{key!r}] must be an integer between {low} and {high}{unit}, or None."
            )
    return {**DEFAULTS, **raw}


def worker_options() -> dict[str, int]:
    """The options this worker adds to its connections (the settings over the defaults)."""
    from djasync import conf

    return {k: v for k, v in conf.get().WORKER_CONNECTION_OPTIONS.items() if v is not None}


def configure_worker_connections() -> None:
    """Add :func:`worker_options` to the ``OPTIONS`` of every PostgreSQL database alias, for
    this process and the processes it forks; a key the project set itself is left alone.

    Call it in the worker before it connects: connections already open keep what they had.
    """
    options = worker_options()
    for alias in connections:
        settings_dict = connections[alias].settings_dict
        if connections[alias].vendor != "postgresql":
            continue
        own = settings_dict.setdefault("OPTIONS", {})
        for key, value in options.items():
            own.setdefault(key, value)


def check_listen_url(raw: Any) -> None:
    """Validate ``DJASYNC["LISTEN_URL"]``: a libpq URL or ``key=value`` string."""
    from psycopg.conninfo import conninfo_to_dict

    from djasync.exceptions import ImproperlyConfigured

    name = "DJASYNC['LISTEN_URL']"
    if not isinstance(raw, str) or not raw.strip():
        raise ImproperlyConfigured(f"{name} must be a libpq connection URL such as "
                                   "'postgresql://user@db-host:5432/dbname', or None.")
    try:
        conninfo_to_dict(raw)
    except Exception as exc:  # psycopg.ProgrammingError: libpq's own message
        raise ImproperlyConfigured(f"{name} cannot be parsed: {exc}") from None


def listen_conninfo(database_params: dict[str, Any]) -> dict[str, Any]:
    """Connection parameters of the worker's LISTEN connection: ``DJASYNC["LISTEN_URL"]`` with
    :func:`worker_options` added (the URL's own values win), else ``database_params`` (the
    default database's, which carry the worker options already)."""
    from psycopg.conninfo import conninfo_to_dict

    from djasync import conf

    url = conf.get().LISTEN_URL
    if url is None:
        return database_params
    params: dict[str, Any] = dict(conninfo_to_dict(url))
    for key, value in worker_options().items():
        params.setdefault(key, value)
    return params


#: SQLSTATEs of a session that ended (or never began) on the server's side: connection
#: exceptions (class 08), an operator's or a shutdown's end of the session (57P01-57P05), the
#: idle-in-transaction timeout (25P03).
_LOST_SQLSTATE_PREFIXES = ("08", "57P", "25P03")


def lost_connection(exc: BaseException) -> str | None:
    """If ``exc`` (or an exception it was raised from) says the database connection is gone,
    its reason on one line, else None.

    By the exception, not the connection's state afterwards: Django's ``atomic`` opens a new
    connection on its way out of a block whose connection broke, so the state may say
    "usable" again by the time the error is handled. A statement that failed on a working
    connection (a constraint, ``statement_timeout``) is not a lost connection.
    """
    import psycopg

    for current in causes(exc):
        if isinstance(current, psycopg.Error):
            sqlstate = current.sqlstate
            if (isinstance(current, psycopg.InterfaceError)
                    or (isinstance(current, psycopg.OperationalError) and sqlstate is None)
                    or (sqlstate or "").startswith(_LOST_SQLSTATE_PREFIXES)):
                return one_line(current)
    return None


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, each once (Django wraps
    psycopg's errors; a handler's error hides the one it handled)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def one_line(exc: BaseException | str) -> str:
    """The first line of an error's text (libpq's add "This probably means the server
    terminated abnormally…" on the next lines), for a log line of one line."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
