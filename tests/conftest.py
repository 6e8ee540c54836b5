"""Fixtures: a second, independent connection to the test database; a scratch database."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from django.db import connection


def conninfo() -> dict[str, str]:
    """Connection parameters of the (test) database Django is using now."""
    params = connection.get_connection_params()
    return {k: str(v) for k, v in params.items()
            if k in ("dbname", "user", "password", "host", "port") and v not in (None, "")}


@pytest.fixture
def other_connection(transactional_db: None) -> Iterator[psycopg.Connection]:
    """A connection of its own (autocommit), like another process's."""
    with psycopg.connect(**conninfo(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def scratch_database(transactional_db: None) -> Iterator[str]:
    """The URL of a new, empty database beside the test database, dropped afterwards: for
    programs that reshape or empty the database they are given."""
    import uuid

    from psycopg.conninfo import make_conninfo

    name = f"djasync_scratch_{uuid.uuid4().hex[:8]}"
    admin = conninfo()
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(**{**admin, "dbname": name})
    finally:
        with psycopg.connect(**admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def options_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """For djasync-worker option tests: clear the DJASYNC_WORKER_* variables, and fail the test
    if start-up (Django, logging) begins, i.e. if the options were accepted."""
    import os

    from djasync_worker import cli as worker_cli

    def touched(*args: object, **kwargs: object) -> None:
        raise AssertionError("the options were accepted and start-up began")

    monkeypatch.setattr(worker_cli, "_setup_django", touched)
    monkeypatch.setattr("djasync_worker.logs.configure", touched)
    for name in list(os.environ):
        if name.startswith("DJASYNC_WORKER_"):
            monkeypatch.delenv(name)
