"""The ledger: one row per effect of a job, deliberately without a unique constraint; and the
archives that keep what ``prune_jobs`` deletes, so that the checker still sees every job."""

from django.db import models


class LedgerEntry(models.Model):
    """An effect of the job whose ``key`` (its first argument) it carries.

    ``kind`` is ``txn`` for rows written inside the job's transaction (duplicates are bugs),
    ``external`` for the negative control, written on a second connection (duplicates
    expected), ``long`` for a long job's effect (autocommit: at least once), ``periodic`` for a
    periodic job's (key ``periodic-<job id>``), ``cancel_ok`` for a cancel that a job made of a
    batch-mate and that returned success (key: the cancelled job's), written in the
    cancelling job's transaction.
    """

    key = models.CharField(max_length=100)
    kind = models.CharField(max_length=16)
    pid = models.IntegerField()
    at = models.DateTimeField(auto_now_add=True)
    #: When the run that wrote the row started (``current_job().started_at``; long jobs).
    run_started = models.DateTimeField(null=True)

    class Meta:
        app_label = "chaos"
        indexes = [models.Index(fields=["key"], name="chaos_ledger_key")]

    def __str__(self) -> str:
        return f"{self.kind} {self.key}"


class Pruned(models.Model):
    """A ``djasync_job`` or ``djasync_attempt`` row as it was when deleted (a trigger writes
    it in the deleting transaction: see migration 0002)."""

    source = models.CharField(max_length=16)
    row_id = models.BigIntegerField()
    row = models.JSONField()
    #: For a job of a group: the other jobs of its group still pending when it was deleted.
    group_pending = models.IntegerField(default=0)
    pruned_at = models.DateTimeField()

    class Meta:
        app_label = "chaos"

    def __str__(self) -> str:
        return f"pruned {self.source} #{self.row_id}"


class SlotLog(models.Model):
    """Every row ever inserted into ``djasync_periodicslot`` (a trigger; slot rows are pruned,
    so the table itself cannot show a slot enqueued twice)."""

    name = models.CharField(max_length=200)
    slot = models.DateTimeField()
    logged_at = models.DateTimeField()

    class Meta:
        app_label = "chaos"

    def __str__(self) -> str:
        return f"{self.name} at {self.slot}"
