"""System checks: ``manage.py check`` reports a misconfigured queue before a worker starts."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.db import DEFAULT_DB_ALIAS, connections

from djasync import conf
from djasync.exceptions import ImproperlyConfigured


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    try:
        conf.load(getattr(settings, "DJASYNC", None))
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="djasync.E001")]
    return []


@checks.register()
def check_periodic(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from djasync import registry
    from djasync.exceptions import DjasyncError

    try:
        entries = conf.get().PERIODIC
    except ImproperlyConfigured:
        return []  # reported by check_settings
    from djasync import limits

    errors: list[checks.CheckMessage] = []
    for entry in entries:
        try:
            registry.resolve(entry.function)
        except (DjasyncError, ImportError) as exc:
            errors.append(checks.Error(f"periodic job {entry.name!r}: {exc}", id="djasync.E004"))
        for key in entry.limits:
            if limits.matching(key, conf.get().LIMITS) is None:
                errors.append(checks.Error(
                    f"periodic job {entry.name!r}: limit key {key!r} matches no entry of "
                    "DJASYNC['LIMITS']", id="djasync.E005"))
    return errors


# Not tagged `database`: Django runs those only for `check --database`, so a plain
# `manage.py check` would never say that djasync cannot work on this database. The check reads the
# alias's configured engine (the backend's vendor, so PostGIS and other PostgreSQL-based engines
# pass) and never connects.
@checks.register()
def check_database(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    if DEFAULT_DB_ALIAS not in connections:
        return [checks.Error(f"djasync needs a {DEFAULT_DB_ALIAS!r} database.",
                             id="djasync.E002")]
    vendor = connections[DEFAULT_DB_ALIAS].vendor
    if vendor != "postgresql":
        engine = connections[DEFAULT_DB_ALIAS].settings_dict.get("ENGINE")
        return [
            checks.Error(
                f"djasync needs PostgreSQL; DATABASES[{DEFAULT_DB_ALIAS!r}] uses {engine!r} "
                f"({vendor}).",
                hint=f"Set DATABASES[{DEFAULT_DB_ALIAS!r}]['ENGINE'] to "
                     "'django.db.backends.postgresql'.",
                id="djasync.E003",
            )
        ]
    return []
