"""Application tables the benchmark's jobs write to."""

from django.db import models


class Ledger(models.Model):
    """One row per job that ran (W6): ``key`` is unique, so a job that ran twice would fail."""

    key = models.BigIntegerField(unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"ledger {self.key}"


class Mark(models.Model):
    """When a W2 job's function body started (``time.time()`` in the child)."""

    key = models.IntegerField(unique=True)
    ran_at = models.FloatField()

    def __str__(self) -> str:
        return f"mark {self.key} at {self.ran_at}"
