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


class JobNote(models.Model):
    """An application row that outlives its job: the reference is cleared (SET_NULL)."""

    job = models.ForeignKey("djasync.Job", null=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        app_label = "tests"

    def __str__(self) -> str:
        return f"note on job #{self.job_id}"


class JobGuard(models.Model):
    """An application row that keeps its job from being deleted (PROTECT)."""

    job = models.ForeignKey("djasync.Job", on_delete=models.PROTECT, related_name="+")

    class Meta:
        app_label = "tests"

    def __str__(self) -> str:
        return f"guard of job #{self.job_id}"


class ReferenceGuard(models.Model):
    """Protects a JobReference, and so, through its cascade, the job it references."""

    reference = models.ForeignKey(JobReference, on_delete=models.PROTECT, related_name="+")

    class Meta:
        app_label = "tests"

    def __str__(self) -> str:
        return f"guard of reference #{self.reference_id}"


class AttemptReference(models.Model):
    """An application row that references an attempt (goes with it: CASCADE)."""

    attempt = models.ForeignKey("djasync.Attempt", on_delete=models.CASCADE, related_name="+")

    class Meta:
        app_label = "tests"

    def __str__(self) -> str:
        return f"reference to attempt #{self.attempt_id}"


class GroupGuard(models.Model):
    """An application row that keeps a group from being deleted (PROTECT)."""

    group = models.ForeignKey("djasync.Group", on_delete=models.PROTECT, related_name="+")

    class Meta:
        app_label = "tests"

    def __str__(self) -> str:
        return f"guard of group #{self.group_id}"
