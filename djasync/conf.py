"""Read and validate the ``DJASYNC`` setting.

Every knob lives in one dict so that a typo is an error instead of a silently ignored setting::

    DJASYNC = {"MAX_ATTEMPTS": 5, "TIMEOUT": 60, "ALLOWED_MODULES": ["myproject.jobs"]}
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings as django_settings
from django.utils.module_loading import import_string

from djasync.exceptions import ImproperlyConfigured

MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

#: The LISTEN/NOTIFY channel that ``schedule()`` notifies and workers listen on.
NOTIFY_CHANNEL = "djasync"


def default_backoff(attempt: int) -> float:
    """Return the seconds to wait before retry number ``attempt`` (the original ``60·n^1.6``)."""
    return 60.0 * attempt**1.6


def _connection_defaults() -> dict[str, int | None]:
    from djasync.connections import DEFAULTS

    return dict(DEFAULTS)


@dataclass(frozen=True)
class Settings:
    #: Attempts a job gets (errors, crashes and timeouts all count) before it is marked failed.
    MAX_ATTEMPTS: int = 10
    #: Seconds a job may run: its statements get this statement_timeout, and the worker stops a
    #: job still running past it. ``None`` means no limit (not advised: a hung job holds a lock).
    TIMEOUT: float | None = 300.0
    #: Dotted path to (or a callable) ``f(attempt_number) -> seconds`` before the next retry.
    BACKOFF: str | Callable[[int], float] = "djasync.conf.default_backoff"
    #: Module prefixes whose functions may run, in addition to the INSTALLED_APPS modules.
    ALLOWED_MODULES: tuple[str, ...] = ()
    #: Queue used when ``schedule()`` is given none.
    DEFAULT_QUEUE: str = "default"
    #: Priority used when ``schedule()`` is given none (-100..100, higher runs first).
    DEFAULT_PRIORITY: int = 0
    #: Tracebacks longer than this are cut in the middle before they are stored.
    TRACEBACK_MAX_CHARS: int = 20_000
    #: Seconds a non-atomic job's lease lasts; the worker renews it every third of that.
    LEASE_SECONDS: float = 60.0
    #: Periodic jobs: a list of {"cron", "function", ...} dicts (see djasync.periodic).
    PERIODIC: tuple[Any, ...] = ()
    #: libpq parameters the worker daemon adds to its own connections (keepalives,
    #: tcp_user_timeout, connect_timeout: see djasync.connections), merged over its defaults;
    #: the project's DATABASES OPTIONS win over both.
    WORKER_CONNECTION_OPTIONS: dict[str, int | None] = field(default_factory=_connection_defaults)
    #: Log a line at INFO for every job that succeeded (a failed attempt is always logged, at
    #: WARNING or ERROR); False logs it at DEBUG only, for very busy queues.
    LOG_FINISHED_JOBS: bool = True
    #: libpq URL or ``key=value`` string of the worker's LISTEN connection, straight to
    #: PostgreSQL, for a project whose ``DATABASES`` go through a pooler in transaction mode
    #: (PgBouncer), which cannot carry LISTEN. ``None``: the default database's parameters.
    #: The worker's connection options (keepalives…) are added unless the URL sets them.
    LISTEN_URL: str | None = None
    #: Flow control: key (or ``"name:*"`` pattern, or ``"queue:<name>"``) ->
    #: ``{"concurrency": N, "rate": "N/s|m|h"}`` (see djasync.limits). Parsed into
    #: :class:`djasync.limits.Limit` values.
    LIMITS: dict[str, Any] = field(default_factory=dict)
    _backoff: Callable[[int], float] = field(default=default_backoff, repr=False)

    def backoff(self, attempt: int, job_backoff: Any = None) -> float:
        """Return the seconds before retry ``attempt``: the job's own ``meta["backoff"]`` if it
        has one (checked by :func:`djasync.validation.check_backoff`), else ``BACKOFF``."""
        if job_backoff is not None:
            from djasync.validation import backoff_seconds

            return backoff_seconds(job_backoff, attempt)
        return float(self._backoff(attempt))


_KNOWN = [name for name in Settings.__dataclass_fields__ if not name.startswith("_")]


def load(raw: Any) -> Settings:
    """Validate a ``DJASYNC`` dict and return the settings it describes."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ImproperlyConfigured(f"DJASYNC must be a dict, not {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(_KNOWN))
    if unknown:
        raise ImproperlyConfigured(
            f"DJASYNC has unknown key(s) {', '.join(unknown)}; known keys: {', '.join(_KNOWN)}."
        )
    values = dict(raw)

    def _int(name: str, low: int, high: int | None = None) -> None:
        if name in values:
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (
                high is not None and value > high
            ):
                bounds = f"between {low} and {high}" if high is not None else f">= {low}"
                raise ImproperlyConfigured(f"DJASYNC[{name!r}] must be an integer {bounds}.")

    _int("MAX_ATTEMPTS", 1)
    _int("DEFAULT_PRIORITY", -100, 100)
    _int("TRACEBACK_MAX_CHARS", 200)
    if "TIMEOUT" in values:
        timeout = values["TIMEOUT"]
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= 7 * 86400
        ):
            raise ImproperlyConfigured(
                "DJASYNC['TIMEOUT'] must be a number of seconds in (0, 604800], or None."
            )
    if "LEASE_SECONDS" in values:
        lease = values["LEASE_SECONDS"]
        if isinstance(lease, bool) or not isinstance(lease, int | float) or not 1 <= lease <= 3600:
            raise ImproperlyConfigured("DJASYNC['LEASE_SECONDS'] must be a number in [1, 3600].")
    if "LOG_FINISHED_JOBS" in values and not isinstance(values["LOG_FINISHED_JOBS"], bool):
        raise ImproperlyConfigured("DJASYNC['LOG_FINISHED_JOBS'] must be True or False.")
    if "ALLOWED_MODULES" in values:
        modules = values["ALLOWED_MODULES"]
        if not isinstance(modules, list | tuple) or not all(
            isinstance(m, str) and MODULE_NAME.match(m) for m in modules
        ):
            raise ImproperlyConfigured(
                "DJASYNC['ALLOWED_MODULES'] must be a list of dotted module names such as "
                "'myproject.jobs'."
            )
        values["ALLOWED_MODULES"] = tuple(modules)
    if "DEFAULT_QUEUE" in values:
        from djasync.validation import check_queue_name

        try:
            check_queue_name(values["DEFAULT_QUEUE"])
        except ValueError as exc:
            raise ImproperlyConfigured(f"DJASYNC['DEFAULT_QUEUE']: {exc}") from None
    if "PERIODIC" in values:
        from djasync.periodic import parse

        values["PERIODIC"] = parse(values["PERIODIC"])
    if "WORKER_CONNECTION_OPTIONS" in values:
        from djasync.connections import check

        values["WORKER_CONNECTION_OPTIONS"] = check(values["WORKER_CONNECTION_OPTIONS"])
    if values.get("LISTEN_URL") is not None:
        from djasync.connections import check_listen_url

        check_listen_url(values["LISTEN_URL"])
    if "LIMITS" in values:
        from djasync import limits

        values["LIMITS"] = limits.parse(values["LIMITS"])
    backoff = values.get("BACKOFF", Settings.BACKOFF)
    if isinstance(backoff, str):
        try:
            backoff = import_string(backoff)
        except ImportError as exc:
            raise ImproperlyConfigured(f"DJASYNC['BACKOFF'] cannot be imported: {exc}") from None
    if not callable(backoff):
        raise ImproperlyConfigured("DJASYNC['BACKOFF'] must be a callable or its dotted path.")
    return Settings(**values, _backoff=backoff)


_cache: tuple[Any, Settings] | None = None


def get() -> Settings:
    """Return the current settings, re-reading them when ``settings.DJASYNC`` changes."""
    global _cache
    raw = getattr(django_settings, "DJASYNC", None)
    if _cache is None or _cache[0] is not raw:
        _cache = (raw, load(raw))
    return _cache[1]
