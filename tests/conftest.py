"""Fixtures: a second, independent connection to the test database."""

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
