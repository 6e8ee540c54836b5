"""The write path: put jobs in the queue, or take them out before they run.

Everything here runs on the caller's connection, inside whatever transaction the caller has
open: a job scheduled in a transaction that rolls back never existed, and no worker can see it
before the transaction commits. The NOTIFY that wakes workers is sent in the same transaction,
so PostgreSQL delivers it at commit (and drops it on rollback).
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from djasync import attempts, conf, executor, registry, sql, wire
from djasync import limits as flow
from djasync.conf import NOTIFY_CHANNEL
from djasync.exceptions import DjasyncError, GroupClosed, GroupInUse, UniqueJobNotVisible
from djasync.models import Group, Job, Status, identity_of
from djasync.validation import (
    MAX_ATTEMPTS_LIMIT,
    check_args,
    check_kwargs,
    check_meta,
    check_priority,
    check_queue_name,
    check_run_after,
)

Function = Callable[..., Any] | str
RunAfter = datetime.datetime | datetime.timedelta | None


@dataclass
class JobSpec:
    """One job for :func:`schedule_many`; the fields mean what ``schedule()``'s arguments do."""

    function: Function
    args: Any = None
    kwargs: Any = None
    run_after: RunAfter = None
    meta: Any = None
    priority: int | None = None
    queue: str | None = None
    group: Group | str | None = field(default=None)
    #: True: unique by function and arguments; a string: unique by that key.
    unique: bool | str = False
    #: Flow-control keys (each must match an entry of ``DJASYNC["LIMITS"]``).
    limits: Iterable[str] | None = None


def schedule(
    function: Function,
    args: Any = None,
    kwargs: Any = None,
    run_after: RunAfter = None,
    meta: Any = None,
    *,
    priority: int | None = None,
    queue: str | None = None,
    group: Group | str | None = None,
    unique: bool | str = False,
    limits: Iterable[str] | None = None,
) -> Job:
    """Add a job to the queue in the caller's transaction and return the saved row.

    ``function`` is a callable or its dotted name; it must live in an allowed module.
    ``run_after`` is an aware datetime or a timedelta from now. ``meta`` holds execution
    controls; any key other than these four raises ``ValueError``:

    - ``max_attempts``: attempts before the job is marked failed (1..1000; errors, crashes and
      timeouts all count). Default ``DJASYNC["MAX_ATTEMPTS"]``.
    - ``timeout``: seconds the job may run, in (0, 604800]. Default ``DJASYNC["TIMEOUT"]``.
    - ``atomic``: ``True`` (the default) runs the job inside the claiming transaction;
      ``False`` runs a long job outside any transaction under a renewed lease.
    - ``backoff``: seconds to wait before each retry, instead of ``DJASYNC["BACKOFF"]``: a
      number (the same wait before every retry), or ``{"base": b, "factor": f, "max": m}``
      to wait ``b·f^(n-1)`` seconds before retry ``n``, at most ``m`` (``factor`` defaults to
      2, ``max`` to 30 days). A backoff *function* can only be the setting: a job row is JSON.

    ``group`` is a :class:`Group` or a group reference (the newest unfinished group of that
    reference, or a new one).
    ``unique=True`` (same function and arguments) or ``unique="some-key"`` keeps at most one
    pending job per key, enforced by a partial unique index: if one is pending (or running),
    it is returned and nothing is added. ``limits`` names flow-control keys (see
    ``DJASYNC["LIMITS"]``): the job starts only when each of them has room.
    """
    (job,) = schedule_many(
        [JobSpec(function, args, kwargs, run_after, meta, priority, queue, group, unique,
                 limits)]
    )
    return job


def schedule_many(specs: Iterable[JobSpec]) -> list[Job]:
    """Add many jobs with one INSERT (and one NOTIFY per queue); return the saved rows.

    All jobs are validated before anything is written: one bad job writes none. Inside a
    transaction this adds one statement to it (no savepoint); outside one, it is its own.
    """
    settings = conf.get()
    now = timezone.now()
    jobs: list[Job] = []
    groups: list[Group | str | None] = []
    resolved: set[str] = set()
    # djasync writes on Django's default connection, so every read that must see the caller's
    # writes (groups, unique keys) goes there too, never where a router sends reads.
    alias = connection.alias
    for spec in specs:
        name = registry.name_of(spec.function)
        if name not in resolved:  # refuse forbidden or missing functions now, not at run time
            registry.resolve(name)
            resolved.add(name)
        args, kwargs = check_args(spec.args), check_kwargs(spec.kwargs)
        identity = identity_of(name, args, kwargs)
        groups.append(_check_group(spec.group))
        values = {
            **_DEFAULTS, "name": name, "args": args, "kwargs": kwargs,
            "meta": check_meta(spec.meta),
            "queue": check_queue_name(settings.DEFAULT_QUEUE if spec.queue is None
                                      else spec.queue),
            "priority": check_priority(settings.DEFAULT_PRIORITY if spec.priority is None
                                       else spec.priority),
            "run_after": check_run_after(spec.run_after), "identity": identity,
            "unique_key": _unique_key(spec.unique, identity),
            "group_id": None, "created_at": now,
        }
        values["limits"] = flow.keys_for(spec.limits, values["queue"], settings.LIMITS)
        job = Job.from_db(alias, _ATTNAMES, [values[f] for f in _ATTNAMES])
        job._state.adding = True  # not saved yet (from_db builds it the fast way)
        jobs.append(job)
    if not jobs:
        return []
    keys = {key for job in jobs if job.limits for key in job.limits}
    if keys:
        flow.ensure_tokens(sorted(keys), settings.LIMITS)
    if len(jobs) < COPY_FROM and not connection.in_atomic_block and all(
            job.unique_key is None for job in jobs) and all(group is None for group in groups):
        # Autocommit and plain jobs: the one statement is its own transaction (one round trip;
        # the NOTIFY in it is delivered when it commits). This path uses the connection
        # without a Django cursor, so it runs Django's CONN_HEALTH_CHECKS check itself, as
        # any cursor does (atomic() does it on entering): a connection the server dropped is
        # replaced, not used.
        connection.close_if_health_check_failed()
        _insert(jobs, now)
        return jobs
    # Groups are opened (and locked, see _open_group) in the transaction that adds to them;
    # in the caller's one before the atomic block, so that a refusal (GroupClosed) leaves it
    # usable, as a refusal before anything is written should.
    nested = connection.in_atomic_block
    if nested:
        _open_groups(jobs, groups)
    with transaction.atomic(savepoint=False):
        if not nested:
            _open_groups(jobs, groups)
        _insert([job for job in jobs if job.unique_key is None], now)
        jobs = [job if job.unique_key is None else _insert_unique(job) for job in jobs]
    return jobs


#: Every concrete field's value for a new job, in field order (``Job.from_db`` takes them so).
_ATTNAMES = [f.attname for f in Job._meta.concrete_fields]
#: The model's own defaults of the fields schedule_many() does not set itself (those with a
#: callable default: args, kwargs, meta, run_after, created_at, all set per job).
_DEFAULTS = {f.attname: f.get_default() for f in Job._meta.concrete_fields
             if not (f.has_default() and callable(f.default))}
_json = DjangoJSONEncoder(allow_nan=False, ensure_ascii=False)


#: From this many jobs on, ``schedule_many`` writes them with COPY (three round trips, but
#: about twice as fast per job as the one INSERT of arrays at 10,000 jobs).
COPY_FROM = 200

#: The columns COPY fills, in the order :func:`_copy` writes them.
_COPY_COLUMNS = ("id", "name", "args", "kwargs", "meta", "queue", "priority", "run_after",
                 "status", "attempts", "identity", "group_id", "created_at", "worker",
                 "lease_owner", "limits")


def _insert(jobs: list[Job], now: datetime.datetime) -> None:
    """Insert ``jobs`` and notify their queues (one statement, or COPY for many); set their
    ids. Many jobs need the caller's transaction (``schedule_many`` opens one)."""
    if not jobs:
        return
    if len(jobs) >= COPY_FROM:
        _copy(jobs, now)
        return
    params = {
        "name": [job.name for job in jobs],
        "args": [_encode(job.args) for job in jobs],
        "kwargs": [_encode(job.kwargs) for job in jobs],
        "meta": [_encode(job.meta) for job in jobs],
        "queue": [job.queue for job in jobs],
        "priority": [job.priority for job in jobs],
        "run_after": [job.run_after for job in jobs],
        "identity": [job.identity for job in jobs],
        "group_id": [job.group_id for job in jobs],
        "limits": [None if job.limits is None else _json.encode(job.limits) for job in jobs],
        "now": now, "channel": NOTIFY_CHANNEL,
    }
    # Prepared once per connection (COPY takes over from COPY_FROM jobs).
    statements = wire.statements()
    (result,) = statements.send([statements.command(sql.INSERT_JOBS, params)])
    ids = statements.rows(result)
    assert len(ids) == len(jobs), "the INSERT returned fewer rows than jobs"
    for job, (pk,) in zip(jobs, ids, strict=True):
        job.pk = pk
        job._state.adding = False
        job._state.db = connection.alias


def _copy(jobs: list[Job], now: datetime.datetime) -> None:
    """Take ids from the job sequence, COPY the rows in, and notify each queue once."""
    columns = ", ".join(_COPY_COLUMNS)
    with connection.wrap_database_errors:  # Django's exception classes, as the ORM raises
        cursor = attempts.hot_cursor()
        cursor.execute(sql.NEXT_JOB_IDS, [len(jobs)])
        ids = sorted(pk for (pk,) in cursor.fetchall())
        with cursor.copy(f"COPY {sql.JOB} ({columns}) FROM STDIN") as copy:
            for pk, job in zip(ids, jobs, strict=True):
                copy.write_row((pk, job.name, _encode(job.args), _encode(job.kwargs),
                                _encode(job.meta), job.queue, job.priority, job.run_after,
                                Status.PENDING.value, 0, job.identity, job.group_id, now, "",
                                "", None if job.limits is None else _json.encode(job.limits)))
        cursor.execute(sql.NOTIFY_QUEUES, {"channel": NOTIFY_CHANNEL,
                                           "queues": sorted({job.queue for job in jobs})})
    alias = connection.alias
    for pk, job in zip(ids, jobs, strict=True):
        job.pk = pk
        job._state.adding = False
        job._state.db = alias


def _encode(value: Any) -> str:
    """JSON of args, kwargs or meta (the empty ones, most of them, without the encoder)."""
    return _json.encode(value) if value else ("[]" if isinstance(value, list) else "{}")


def _unique_key(unique: Any, identity: str) -> str | None:
    if unique is False or unique is None:
        return None
    if unique is True:
        return identity
    if not isinstance(unique, str) or not 1 <= len(unique) <= 255:
        raise ValueError("unique must be True, False or a key of 1-255 characters")
    return unique


#: How many times :func:`_insert_unique` tries again when the job holding the key finished
#: between our insert and our read (each time, another job took the key and finished).
UNIQUE_TRIES = 10


def _insert_unique(job: Job) -> Job:
    """Insert a unique job, or return the pending job that already holds its key.

    The partial unique index makes PostgreSQL serialise concurrent schedulers: a second insert
    of the same key waits for the first transaction, then fails if it committed (and we return
    its job) or succeeds if it rolled back.
    """
    alias = connection.alias
    for _ in range(UNIQUE_TRIES):
        try:
            with transaction.atomic(using=alias):
                job.save(force_insert=True, using=alias)
                with connection.cursor() as cursor:
                    cursor.execute(sql.NOTIFY, {"channel": NOTIFY_CHANNEL, "queue": job.queue})
            return job
        except IntegrityError as exc:
            if "djasync_job_unique_pending" not in str(exc):
                raise
        existing = Job.objects.using(alias).pending().filter(unique_key=job.unique_key).first()
        if existing is not None:
            return existing
        if _snapshot_per_transaction():
            # The holder committed after this transaction's snapshot was taken: no read in
            # this transaction can see it, and every insert would fail again.
            raise UniqueJobNotVisible(
                f"a pending job holds the unique key {job.unique_key!r}, but it committed "
                "after this transaction's snapshot (REPEATABLE READ or SERIALIZABLE), so it "
                "cannot be returned: retry the transaction")
        # READ COMMITTED: the holder finished between our insert and our read: try again.
    raise DjasyncError(f"the unique key {job.unique_key!r} was taken and freed "
                       f"{UNIQUE_TRIES} times while scheduling; giving up")


def _snapshot_per_transaction() -> bool:
    """Whether this transaction reads with one snapshot (REPEATABLE READ, SERIALIZABLE)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('transaction_isolation')")
        (level,) = cursor.fetchone()
    return level != "read committed"


def _check_group(group: Group | str | None) -> Group | str | None:
    """Refuse a bad group before anything is written."""
    if isinstance(group, str):
        if not group or len(group) > 100:
            raise ValueError("a group reference is a string of 1-100 characters")
    elif group is not None:
        if not isinstance(group, Group):
            raise ValueError("group must be a Group or a group reference string")
        if group.pk is None:
            raise ValueError("save the Group before scheduling jobs into it")
    return group


def _open_groups(jobs: list[Job], groups: list[Group | str | None]) -> None:
    opened: dict[int | str, Group] = {}
    for job, group in zip(jobs, groups, strict=True):
        if group is not None:
            job.group = _open_group(group, opened)
            job._loaded_group_id = job.group_id  # checked, under lock: Job.save() need not


def _in_transaction() -> contextlib.AbstractContextManager[Any]:
    """A transaction of our own if the caller has none (locks last until it ends); none
    inside the caller's, so that a refusal raised here leaves that one usable."""
    if connection.in_atomic_block:
        return contextlib.nullcontext()
    return transaction.atomic(savepoint=False)


def _open_group(group: Group | str, opened: dict[int | str, Group]) -> Group:
    """Return a group that still takes jobs (see :func:`group_for_reference`), locked against
    its final job starting until this transaction ends."""
    key = group if isinstance(group, str) else group.pk
    found = opened.get(key)
    if found is None:
        if isinstance(group, str):
            found = group_for_reference(group)
        else:
            if _lock(group) or _has_started(group):
                raise GroupClosed(f"group {group.reference!r} (#{group.pk}) has started running "
                                  "(a job of it finished, or its final job is running)")
            found = group
        opened[key] = found
    return found


#: Share-lock a group's row (a group being given its final job, ``on_completion``, holds it
#: for update) and return its final job's id.
_LOCK_GROUP = f"SELECT final_id FROM {Group._meta.db_table} WHERE id = %s FOR SHARE"
#: Share-lock a final job's row: a worker claims with FOR NO KEY UPDATE SKIP LOCKED, so it
#: passes over the final job until this transaction ends; and if a worker is running it now,
#: this waits for it to finish.
#: It returns whether a run of it as a long job has started and not ended: under a live lease
#: (a long job's row is not locked while it runs, so there is nothing to wait for), or under
#: one that ran out (its worker froze or died after committing what it wrote so far, which
#: stays: the run happened). Either way the group has started running: it is closed.
_LOCK_FINAL = f"SELECT lease_owner <> '' FROM {sql.JOB} WHERE id = %s FOR SHARE"


def _lock(group: Group) -> bool:
    """Keep the group's final job from starting until this transaction ends; return whether
    a run of it as a long job (``atomic: False``) has started and not ended (its lease is
    held, or ran out), which closes the group.

    Without it, a member added while the group's other members run could still be uncommitted
    when they finish: the claim of the final job, not seeing it, would run the final job first
    (the claim reads ``djasync_group_final_ready`` without any lock). The final job's row is
    share-locked, so no worker claims it before this transaction's members are visible; the
    group's row is share-locked first, so that a final job being set meanwhile is seen (and its
    row locked too). Share locks do not conflict with each other: schedulers adding to one
    group do not wait for each other. Call inside the transaction that adds the members, and
    check whether the group has started (:func:`_has_started`) only after this, so that a final
    job that was running is seen finished.
    """
    with connection.cursor() as cursor:
        cursor.execute(_LOCK_GROUP, [group.pk])
        row = cursor.fetchone()
        if row is None:
            raise Group.DoesNotExist(f"group #{group.pk} no longer exists")
        if row[0] is None:
            return False
        cursor.execute(_LOCK_FINAL, [row[0]])
        final = cursor.fetchone()
        return bool(final and final[0])


def _has_started(group: Group) -> bool:
    """Whether a job of the group (its final job included) has finished."""
    return (Job.objects.using(connection.alias).filter(group_id=group.pk)
            .exclude(status=Status.PENDING).exists())


def _lock_reference(reference: str) -> None:
    """Serialise the transactions that create a generation of this reference (until this
    transaction ends): without it, two of them would each create one."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                       [f"djasync.group:{reference}"])


def _latest(reference: str) -> Group | None:
    return (Group.objects.using(connection.alias).filter(reference=reference)
            .order_by("-id").first())


def group_for_reference(reference: str, description: str = "") -> Group:
    """Return the newest group with this reference that takes jobs, creating one if needed.

    A reference names one generation at a time: a new generation starts once the previous one
    has completed (every job finished). A generation that has started running (some job
    finished, some still pending) takes no new jobs. Inside a transaction, the group returned
    is locked against its final job starting until the transaction ends (see :func:`_lock`).
    """
    _check_group(reference)
    with _in_transaction():
        latest = _latest(reference)
        if latest is None or latest.has_completed():
            _lock_reference(reference)
            latest = _latest(reference)  # as it is now that no one else is creating one
        if latest is None or latest.has_completed():
            return _new_group(reference, description or (latest.description if latest else ""))
        if _lock(latest):
            raise GroupClosed(f"group {reference!r} has started running its final job; it "
                              "takes new jobs again once that has finished")
        if _has_started(latest):
            raise GroupClosed(
                f"group {reference!r} is running ({latest.progress()[Status.PENDING]} jobs "
                "pending); it takes new jobs again once every job has finished"
            )
        return latest


def create_group(reference: str, description: str = "") -> Group:
    """Start a new generation of a group reference; refuse while another one is unfinished."""
    _check_group(reference)
    with _in_transaction():
        _lock_reference(reference)
        latest = _latest(reference)
        if latest is not None and (Job.objects.using(connection.alias)
                                   .filter(group_id=latest.pk, status=Status.PENDING).exists()):
            raise GroupInUse(f"group {reference!r} (#{latest.pk}) still has pending jobs")
        return _new_group(reference, description)


def _new_group(reference: str, description: str) -> Group:
    """Create a generation whose rules the caller checked, under the reference's lock."""
    group = Group(reference=reference, description=description)
    group._rules_checked = True
    group.save(using=connection.alias, force_insert=True)
    return group


def deschedule(function: Function, args: Any = None, kwargs: Any = None) -> int:
    """Cancel the pending jobs with this function and these arguments; return how many.

    A job that a worker is running right now is locked, so it is skipped (it finishes).
    """
    name = registry.name_of(function)
    identity = identity_of(name, check_args(args), check_kwargs(kwargs))
    with transaction.atomic():
        ids = list(
            _not_running_here(Job.objects.pending().not_running().filter(identity=identity))
            .select_for_update(skip_locked=True, no_key=True)
            .values_list("id", flat=True)
        )
        return _mark_cancelled(ids)


def cancel(job_ids: Iterable[int]) -> int:
    """Cancel these jobs if they are pending and not running; return how many were cancelled."""
    with transaction.atomic():
        ids = list(
            _not_running_here(Job.objects.pending().not_running().filter(id__in=list(job_ids)))
            .select_for_update(skip_locked=True, no_key=True)
            .values_list("id", flat=True)
        )
        return _mark_cancelled(ids)


def _not_running_here(jobs: QuerySet[Job]) -> QuerySet[Job]:
    """Leave out the jobs this connection's own transaction is running (a job cancelling
    its batch-mates or itself): SKIP LOCKED skips the jobs other workers run, but not
    those whose rows this session locked itself."""
    running = executor.running_here()
    return jobs.exclude(id__in=running) if running else jobs


def retry_now(job_ids: Iterable[int]) -> int:
    """Make failed, cancelled or waiting jobs due now, with fresh attempts; return how many.

    Their attempt history is kept; a job that had used up its attempts gets one more, up to
    ``MAX_ATTEMPTS_LIMIT`` attempts in all: a job that made that many is skipped (a
    ``max_attempts`` above it is refused when the job is claimed). A job that is running
    right now (locked, or a long job under a live lease) is skipped.
    """
    from django.utils import timezone

    with transaction.atomic():
        ids = list(
            _not_running_here(Job.objects.not_running().filter(id__in=list(job_ids)))
            .exclude(status=Status.SUCCEEDED)
            .select_for_update(skip_locked=True, no_key=True)
            .values_list("id", flat=True)
        )
        jobs = Job.objects.filter(id__in=ids)
        count = 0
        for job in jobs:
            meta = dict(job.meta)
            attempts_made = job.attempt_set.count()
            if attempts_made >= MAX_ATTEMPTS_LIMIT:
                continue
            if attempts_made >= job.max_attempts:
                meta["max_attempts"] = attempts_made + 1
            try:
                with transaction.atomic():
                    count += Job.objects.filter(id=job.id).update(
                        status=Status.PENDING, run_after=timezone.now(), meta=meta,
                        finished_at=None,
                    )
            except IntegrityError:  # another pending job holds its unique key: leave it be
                continue
        if count:
            with connection.cursor() as cursor:
                cursor.execute(sql.NOTIFY, {"channel": NOTIFY_CHANNEL, "queue": "*"})
        return count


def _mark_cancelled(ids: list[int]) -> int:
    """Cancel these (locked, pending) jobs; ``finished_at`` is when, for pruning and the
    dashboard, as for any job that ended."""
    return Job.objects.filter(id__in=ids).update(status=Status.CANCELLED,
                                                 finished_at=timezone.now())
