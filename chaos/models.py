"""The ledger: one row per effect of a job, deliberately without a unique constraint."""

from django.db import models


class LedgerEntry(models.Model):
    """An effect of the job whose ``key`` (its first argument) it carries.

    ``kind`` is ``txn`` for rows written inside the job's transaction (duplicates are bugs) and
    ``external`` for the negative control, written on a second connection (duplicates expected).
    """

    key = models.CharField(max_length=100)
    kind = models.CharField(max_length=16)
    pid = models.IntegerField()
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "chaos"
        indexes = [models.Index(fields=["key"], name="chaos_ledger_key")]

    def __str__(self) -> str:
        return f"{self.kind} {self.key}"
