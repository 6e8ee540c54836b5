"""The test settings with Django's ``isolation_level`` option: REPEATABLE READ (the worker runs
under it in tests/test_claim_meet.py). ``DJASYNC_TEST_ISOLATION`` picks another level."""

import os

import psycopg

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES

DATABASES["default"].setdefault("OPTIONS", {})["isolation_level"] = psycopg.IsolationLevel[
    os.environ.get("DJASYNC_TEST_ISOLATION", "REPEATABLE_READ")]
