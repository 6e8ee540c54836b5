"""Application tables the test jobs write to."""

from django.db import models


class Ledger(models.Model):
    """One row per effect; deliberately no unique constraint, so duplicates can be counted."""

    key = models.CharField(max_length=100)
    note = models.CharField(max_length=100, blank=True)

    class Meta:
        app_label = "tests"

    def __str__(self) -> str:
        return self.key


class JobReference(models.Model):
    """An application row that references a job (takes a FOR KEY SHARE lock on it)."""

    job = models.ForeignKey("djasync.Job", on_delete=models.CASCADE)

    class Meta:
        app_label = "tests"

    def __str__(self) -> str:
        return f"reference to job #{self.job_id}"
