"""Job functions of the benchmark. They live in an INSTALLED_APPS module, so djasync allows them."""

import time

from benchapp.models import Ledger, Mark


def noop() -> None:
    """W1, W4, W5: the job body costs nothing; what is measured is the queue."""


def ledger(key: int) -> None:
    """W6: the smallest real job, one INSERT into an application table (in the job's savepoint)."""
    Ledger.objects.create(key=key)


def mark(key: int) -> None:
    """W2: record when the function body started, on the same clock as the scheduler's."""
    Mark.objects.create(key=key, ran_at=time.time())
