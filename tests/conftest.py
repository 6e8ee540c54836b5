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
