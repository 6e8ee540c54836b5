"""The queue's tables: jobs, the attempts made at them, and groups of jobs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models, router
from django.db.models import Q
from django.db.models.fields.json import KeyTextTransform
from django.utils import timezone

from djasync.validation import PRIORITY_MAX, PRIORITY_MIN


class Status(models.TextChoices):
    #: Waiting to run (perhaps until ``run_after``), or running inside a worker's transaction.
    PENDING = "pending", "pending"
    #: Ran and committed its writes together with this status.
    SUCCEEDED = "succeeded", "succeeded"
    #: Used up its attempts, or can never run (forbidden or unknown function, bad row).
    FAILED = "failed", "failed"
    #: Descheduled or cancelled before it ran.
    CANCELLED = "cancelled", "cancelled"


FINISHED_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)


class Outcome(models.TextChoices):
    #: The function returned and its writes committed.
    SUCCEEDED = "succeeded", "succeeded"
    #: The function raised; its writes were rolled back.
    ERROR = "error", "error"
    #: The worker process died while running it (kill -9, segfault, OOM, os._exit).
    CRASHED = "crashed", "crashed"
    #: It ran past its timeout and was stopped.
    TIMED_OUT = "timed_out", "timed out"


def identity_of(name: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    """Return the sha1 that ``deschedule()`` matches: same name and JSON arguments, same hash."""
    text = json.dumps([name, args, kwargs], sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def task_path(prefix: str = "") -> models.Case:
    """The Task path a Task job runs (its ``args[0]``) as an expression; NULL for a plain job.

    ``prefix`` reaches the job through a relation (``"job__"`` from an attempt). Group and
    filter by ``name`` *and* this, then show the pair with :func:`shown_name`, so that every
    list (queue_health, the dashboard, the admin) names a Task job by its Task.
    """
    from djasync.registry import TASK_RUNNER

    return models.Case(
        models.When(**{f"{prefix}name": TASK_RUNNER}, then=KeyTextTransform("0", f"{prefix}args")),
        default=models.Value(None), output_field=models.CharField(),
    )


def shown_name(name: str, task: str | None) -> str:
    """The name a job is shown by, from its ``name`` and :func:`task_path` (see
    :func:`djasync.registry.display_name`: a Task path the allow-list refuses is not shown)."""
    from djasync.registry import display_name

    return display_name(name, [task]) if task is not None else name


class _ClockNow(models.Func):
    """PostgreSQL's ``clock_timestamp()``, the clock leases are taken and renewed by (``now()``
    stands still for the whole of a transaction)."""

    template = "clock_timestamp()"
    output_field = models.DateTimeField()


class JobQuerySet(models.QuerySet["Job"]):
    def pending(self) -> JobQuerySet:
        return self.filter(status=Status.PENDING)

    def not_running(self) -> JobQuerySet:
        """Leave out long jobs (``meta={"atomic": False}``) running under a live lease.

        Such a job runs outside any transaction, so its row is not locked while it runs:
        ``select_for_update(skip_locked=True)`` alone would take it for a waiting job, and a
        cancel would "succeed" while it runs on and keeps its effects. (A lease that ran out
        means its worker died or froze: that job is waiting again.)
        """
        return self.filter(Q(lease_expires__isnull=True) | Q(lease_expires__lte=_ClockNow()))

    def due(self) -> JobQuerySet:
        """Pending jobs whose ``run_after`` has passed (some may be running right now)."""
        return self.pending().filter(run_after__lte=timezone.now())

    def scheduled(self) -> JobQuerySet:
        """Pending jobs waiting for a future ``run_after`` (new, or a retry after backoff)."""
        return self.pending().filter(run_after__gt=timezone.now())

    def finished(self) -> JobQuerySet:
        return self.filter(status__in=FINISHED_STATUSES)


class Job(models.Model):
    name = models.CharField(max_length=255, help_text="Dotted path of the function to call.")
    # blank=True: no arguments ([] and {}) is valid, and full_clean() must say so.
    args = models.JSONField(default=list, blank=True, encoder=DjangoJSONEncoder)
    kwargs = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    meta = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    queue = models.CharField(max_length=100, default="default")
    priority = models.SmallIntegerField(default=0, help_text="Higher runs first (-100..100).")
    run_after = models.DateTimeField(default=timezone.now, help_text="Earliest time to run.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0, help_text="Attempts made so far.")
    result = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder)
    identity = models.CharField(max_length=40, editable=False)
    unique_key = models.CharField(  # noqa: DJ001  (NULL: not unique; "" would be a key)
        max_length=255, null=True, blank=True, editable=False,
        help_text="At most one pending job per key (schedule(..., unique=...)).",
    )
    group = models.ForeignKey(
        "Group", null=True, blank=True, on_delete=models.CASCADE, related_name="jobs",
        db_index=False,  # see the partial index djasync_job_group
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True, help_text="Start of the last attempt.")
    finished_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=255, blank=True, help_text="Who ran the last attempt.")
    lease_owner = models.CharField(
        max_length=255, blank=True, editable=False, default="", db_default="",
        help_text="Who holds the lease of a running non-atomic job (meta atomic=False).",
    )
    lease_expires = models.DateTimeField(null=True, blank=True, editable=False)
    #: Flow-control keys (``schedule(..., limits=[...])``, see ``djasync.limits``); NULL
    #: for a job with none, which the claim then takes exactly as before limits existed.
    #: A JSON array of strings (jsonb: no dependency on ``django.contrib.postgres``).
    limits = models.JSONField(null=True, blank=True, editable=False)

    objects = JobQuerySet.as_manager()

    #: Jobs are callable (``job()`` runs it); Django templates call callables, so rendering a
    #: job in the admin would run it. Never.
    do_not_call_in_templates = True

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(priority__gte=PRIORITY_MIN) & Q(priority__lte=PRIORITY_MAX),
                name="djasync_job_priority_range",
            ),
            models.CheckConstraint(
                condition=Q(status__in=[s.value for s in Status]),
                name="djasync_job_status_valid",
            ),
            models.UniqueConstraint(
                fields=["unique_key"], condition=Q(status="pending", unique_key__isnull=False),
                name="djasync_job_unique_pending",
            ),
        ]
        indexes = [
            # The claim walks this index in its ORDER BY; only pending rows are in it, so its
            # size follows the backlog, never the history of finished jobs.
            # Jobs with flow-control keys are not in it (``limits`` NULL): however many of
            # them wait on a full key, the claim of other jobs never reads past them.
            models.Index(
                fields=["-priority", "run_after", "id"],
                condition=Q(status="pending", limits__isnull=True),
                name="djasync_job_claim",
            ),
            # The same for a worker serving one queue (``--queue``): it walks its queue only.
            models.Index(
                fields=["queue", "-priority", "run_after", "id"],
                condition=Q(status="pending", limits__isnull=True),
                name="djasync_job_claim_queue",
            ),
            # Every index below is partial, so that scheduling a job writes 4 index entries
            # (the primary key, claim, pending_at, identity) and finishing one writes 2
            # (the primary key, finished), not all of them: that is most of a job's cost in
            # PostgreSQL. Pruning and the dashboard read finished rows by their finished_at.
            models.Index(fields=["status", "finished_at"], name="djasync_job_finished",
                         condition=Q(finished_at__isnull=False)),
            # deschedule() and djasync.testing look pending jobs up by function and arguments.
            models.Index(fields=["identity"], name="djasync_job_identity",
                         condition=Q(status="pending")),
            models.Index(fields=["group"], name="djasync_job_group",
                         condition=Q(group__isnull=False)),
            # An idle worker sleeps until the earliest future run_after: found in O(log n).
            models.Index(
                fields=["run_after"], condition=Q(status="pending"), name="djasync_job_pending_at"
            ),
            # The claim of jobs with flow-control keys walks these (djasync_claim_limited):
            # they are few, or the limits would not be needed, so they get their own walk.
            models.Index(
                fields=["-priority", "run_after", "id"],
                condition=Q(status="pending", limits__isnull=False),
                name="djasync_job_claim_limited",
            ),
        ]

    def __str__(self) -> str:
        """The call this job makes, as django-async showed it, and its id:
        ``tests.jobs.add(1, 2) #7`` (a Task job: the Task's call)."""
        call = self.call_text()
        return call if self.pk is None else f"{call} #{self.pk}"

    def __call__(self) -> Any:
        """Run this job now, in this process, through the executor; return its result.

        Raises what the function raised, after the failure is recorded (and the retry is
        scheduled) exactly as a worker would record it.
        """
        from djasync.executor import run_job_now

        return run_job_now(self)

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save, refusing to put the job into a group that has started running.

        The rule ``schedule()`` keeps (``GroupClosed``), kept on the ORM's path too:
        ``job.group = group; job.save()``.
        """
        update_fields = kwargs.get("update_fields")
        if self._joins_a_group() and (update_fields is None or "group" in update_fields
                                      or "group_id" in update_fields):
            self._check_group_open(kwargs.get("using") or self._state.db)
        super().save(*args, **kwargs)
        self._loaded_group_id = self.group_id

    #: The group the row had when it was read (or last saved): a job that keeps its group is
    #: not checked again when saved.
    _loaded_group_id: int | None = None

    @classmethod
    def from_db(cls, db: str | None, field_names: Collection[str], values: Collection[Any],
                **kwargs: Any) -> Job:
        job = super().from_db(db, field_names, values, **kwargs)
        job._loaded_group_id = job.__dict__.get("group_id")
        return job

    def clean(self) -> None:
        """Refuse a group that has started running (``full_clean()``, as the admin calls it)."""
        super().clean()
        if self._joins_a_group():
            self._check_group_open(self._state.db)

    def _joins_a_group(self) -> bool:
        return self.group_id is not None and self.group_id != self._loaded_group_id

    def _check_group_open(self, using: str | None) -> None:
        from djasync.exceptions import GroupClosed

        db = using or router.db_for_write(Job, instance=self)
        group_id = self.group_id
        assert group_id is not None
        finished = Job.objects.using(db).filter(group_id=group_id).exclude(status=Status.PENDING)
        if self.pk is not None:
            finished = finished.exclude(pk=self.pk)
        if finished.exists():
            raise GroupClosed(f"group #{self.group_id} has started running (a job of it "
                              "finished): it takes no new jobs")

    def call_text(self, limit: int = 200) -> str:
        """``name(arg, ..., key=value, ...)`` with the arguments' ``repr``, cut after ``limit``
        characters. For shells, the admin and tests: arguments may hold secrets, so djasync's
        log lines never use it."""
        name, args, kwargs = self.display_name, self.args, self.kwargs
        if name != self.name:  # a Task job: args is [path, args, kwargs]
            args = self.args[1] if len(self.args) > 1 else []
            kwargs = self.args[2] if len(self.args) > 2 else {}
        # Rows written by hand may hold anything JSON can.
        args = args if isinstance(args, list) else [args]
        kwargs = kwargs if isinstance(kwargs, dict) else {}
        text = ", ".join([repr(a) for a in args]
                         + [f"{k}={v!r}" for k, v in sorted(kwargs.items())])
        if len(text) > limit:
            text = text[:limit - 1] + "…"
        return f"{name}({text})"

    @property
    def display_name(self) -> str:
        """The name shown for this job: its function's, or for a Task job the Task's path."""
        from djasync.registry import display_name

        return display_name(self.name, self.args)

    @property
    def max_attempts(self) -> int:
        from djasync import conf

        return int(self.meta.get("max_attempts") or conf.get().MAX_ATTEMPTS)


class Attempt(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="attempt_set")
    number = models.PositiveIntegerField(help_text="1 for the first try.")
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    exception_type = models.CharField(max_length=255, blank=True)
    exception_message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    worker = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["job", "number", "id"]
        indexes = [models.Index(fields=["outcome", "finished_at"], name="djasync_attempt_recent")]

    def __str__(self) -> str:
        return f"attempt {self.number} of job #{self.job_id}: {self.outcome}"


class Group(models.Model):
    reference = models.CharField(max_length=100, db_index=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    final = models.ForeignKey(
        Job,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="final_of",
        help_text="Runs once every other job of the group is finished.",
    )

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return self.reference

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save, keeping the rules ``schedule()`` and ``on_completion()`` keep.

        A new group is refused while the newest group of its reference still has pending jobs
        (``GroupInUse``, as :func:`djasync.scheduling.create_group`). A final job given here
        (``Group.objects.create(reference=..., final=job)``) joins the group, as
        :meth:`on_completion` makes it, so that it waits for the members scheduled into the
        group afterwards (a final job outside its group would run at once).
        """
        db = kwargs.get("using") or self._state.db or router.db_for_write(Group, instance=self)
        if self._state.adding and not self._rules_checked:
            self._check_reference_free(db)
        if self.final_id is not None:
            self._check_final_free(db)
        super().save(*args, **kwargs)
        update_fields = kwargs.get("update_fields")
        if self.final_id is not None and (update_fields is None or "final" in update_fields
                                          or "final_id" in update_fields):
            Job.objects.using(db).filter(pk=self.final_id, group_id__isnull=True).update(
                group_id=self.pk)

    #: Set by djasync's own code that checked the rules already, under its locks.
    _rules_checked = False

    def clean(self) -> None:
        """Refuse what :meth:`save` refuses (``full_clean()``, as the admin calls it)."""
        super().clean()
        db = self._state.db or router.db_for_write(Group, instance=self)
        if self._state.adding:
            self._check_reference_free(db)
        if self.final_id is not None:
            self._check_final_free(db)

    def _check_reference_free(self, db: str) -> None:
        from djasync.exceptions import GroupInUse

        latest = (Group.objects.using(db).filter(reference=self.reference).order_by("-id")
                  .values_list("id", flat=True).first())
        if latest is not None and Job.objects.using(db).filter(
                group_id=latest, status=Status.PENDING).exists():
            raise GroupInUse(f"group {self.reference!r} (#{latest}) still has pending jobs")

    def _check_final_free(self, db: str) -> None:
        from djasync.exceptions import GroupRuleBroken

        final_id = self.final_id
        assert final_id is not None
        group_id = (Job.objects.using(db).filter(pk=final_id)
                    .values_list("group_id", flat=True).first())
        if group_id is not None and group_id != self.pk:
            raise GroupRuleBroken(f"job #{self.final_id} belongs to group #{group_id}: it "
                                  "cannot be the final job of another group")

    def progress(self) -> dict[str, int]:
        """Count this group's jobs (the final job excluded) by status, plus ``total``."""
        counts = {status.value: 0 for status in Status}
        # Read where the group was read (a router may send reads to a replica, which would not
        # see the members just scheduled in the caller's transaction).
        members = Job.objects.using(self._state.db).filter(group_id=self.pk)
        if self.final_id:
            members = members.exclude(pk=self.final_id)
        rows = members.values_list("status").annotate(n=models.Count("id"))
        for status, n in rows:
            counts[status] = n
        counts["total"] = sum(counts.values())
        return counts

    def has_completed(self) -> bool:
        """Whether every job but the final one is finished (a group with no jobs has not)."""
        progress = self.progress()
        return progress["total"] > 0 and progress[Status.PENDING] == 0

    def on_completion(self, job: Job) -> Job:
        """Make ``job`` the group's final job: it runs once every other job is finished.

        Allowed whatever the group's state (unlike adding a member): a final job given to a
        group that has completed already runs at once.
        """
        db = self._state.db or router.db_for_write(Group, instance=self)
        Job.objects.using(db).filter(pk=job.pk).update(group_id=self.pk)
        job.group = self
        job._loaded_group_id = self.pk
        self.final = job
        self.save(update_fields=["final"])
        return job


class PeriodicSlot(models.Model):
    """One slot of a periodic job, enqueued: its primary key makes every slot happen once."""

    name = models.CharField(max_length=200)
    slot = models.DateTimeField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["name", "slot"], name="djasync_periodic_slot_once")
        ]

    def __str__(self) -> str:
        return f"{self.name} at {self.slot.isoformat()}"


class Worker(models.Model):
    """One running (or once running) ``djasync-worker`` daemon, kept fresh by its heartbeat."""

    name = models.CharField(max_length=255, unique=True)
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    concurrency = models.PositiveIntegerField()
    queues = models.JSONField(default=list, help_text="Queues served; empty means all.")
    started_at = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)
    stopped_at = models.DateTimeField(null=True, blank=True)
    running = models.JSONField(default=list, help_text="Ids of the jobs running at last_seen.")
    jobs_done = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-last_seen"]

    def __str__(self) -> str:
        return self.name


class PausedQueue(models.Model):
    """A queue no worker claims from until it is resumed (``djasync.pause_queue``)."""

    queue = models.CharField(max_length=100, primary_key=True)
    paused_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["queue"]

    def __str__(self) -> str:
        return f"{self.queue} (paused)"


class RateToken(models.Model):
    """One of a rate-limited key's N starts per window: free once ``used_at`` is a window old.

    A claim takes a free token (and stamps it) in the claiming transaction, so no window of
    the key's length holds more than N starts (see ``djasync.limits``).
    """

    key = models.CharField(max_length=200)
    slot = models.PositiveIntegerField()
    used_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["key", "slot"],
                                               name="djasync_rate_token_key_slot")]

    def __str__(self) -> str:
        return f"{self.key}#{self.slot}"
