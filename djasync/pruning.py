"""Delete old finished jobs without getting in the workers' way."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.backends.utils import CursorWrapper
from django.db.models import (
    PROTECT,
    RESTRICT,
    Exists,
    Model,
    OuterRef,
    ProtectedError,
    RestrictedError,
)
from django.db.models.deletion import get_candidate_relations_to_delete
from django.utils import timezone

from djasync.models import FINISHED_STATUSES, Attempt, Group, Job, Status

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000

#: What a row of another table holding a job back raises: PROTECT or RESTRICT through Django,
#: or a foreign key Django does not know about (at COMMIT: Django's constraints are deferred).
HELD_BACK = (IntegrityError, ProtectedError, RestrictedError)

SELECT = """
    SELECT j.id, j.group_id FROM djasync_job j
     WHERE j.status = ANY(%(statuses)s) AND j.finished_at < %(cutoff)s
       AND (j.group_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM djasync_job o
             WHERE o.group_id = j.group_id
               AND (o.status = 'pending' OR o.finished_at >= %(cutoff)s)))
"""


def prune(
    older_than: datetime.timedelta,
    statuses: Iterable[str] = FINISHED_STATUSES,
    *,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
) -> int:
    """Delete jobs finished before ``now - older_than`` with one of ``statuses``; return how many.

    Deletes in batches of ``batch_size``, each in its own short transaction, with ``SKIP LOCKED``
    so that it never waits on (or blocks) a worker. A group's jobs go only when the whole group
    finished before the cutoff (a final job must not lose its group while others still run);
    the emptied groups go with them. Attempts are deleted by cascade.

    Rows of other apps that reference a job, an attempt or a group get their ``on_delete``
    (Django's own deletion runs those batches). A job such a row protects (``PROTECT``,
    ``RESTRICT``, or a foreign key Django does not know) is kept, with a warning in the log,
    and the others are pruned.
    """
    statuses = [Status(s).value for s in statuses]
    if Status.PENDING in statuses:
        raise ValueError("pending jobs are never pruned; cancel them first")
    cutoff = timezone.now() - older_than
    relations = _foreign_relations()
    protecting = [rel for rel in relations
                  if rel.model is Job and rel.on_delete in (PROTECT, RESTRICT)]
    # Jobs a row protects directly are left out of every batch, so that one of them does not
    # send its whole batch down the one-job-at-a-time path on every run.
    select = SELECT + "".join(f" AND NOT {_referenced(rel)}" for rel in protecting)
    params: dict[str, Any] = {"statuses": statuses, "cutoff": cutoff, "batch": batch_size}
    with connection.cursor() as cursor:
        if dry_run:
            cursor.execute(f"SELECT count(*) FROM ({select}) AS old", params)
            return int(cursor.fetchone()[0])
        _warn_protected(cursor, protecting, params)
        total = 0
        kept: list[int] = []
        while True:
            rows: list[tuple[int, int | None]] = []
            try:
                with transaction.atomic():
                    cursor.execute(
                        f"{select} AND NOT (j.id = ANY(%(kept)s))"
                        " LIMIT %(batch)s FOR UPDATE OF j SKIP LOCKED",
                        {**params, "kept": kept},
                    )
                    rows = cursor.fetchall()
                    if rows:
                        _delete(cursor, rows, orm=bool(relations))
            except HELD_BACK:
                # Some row holds back at least one of these jobs. Find which, one job at a
                # time, so that it alone is kept: a batch that fails on every run would stop
                # pruning for good.
                held = len(kept)
                deleted = _delete_one_by_one(cursor, select, params, rows, kept, bool(relations))
                total += deleted
                if deleted or len(kept) > held:
                    continue
                break  # Nothing moved (the culprit got locked meanwhile): the next run retries.
            if not rows:
                break
            total += len(rows)
        # Slot records of periodic jobs only need to outlive the daemons' clocks, except each
        # name's newest: it is what tells a restarting daemon that the latest slot already ran,
        # however long ago (a monthly job, a 30-day prune).
        cursor.execute(
            """
            DELETE FROM djasync_periodicslot p
             WHERE p.slot < %s
               AND EXISTS (SELECT 1 FROM djasync_periodicslot n
                            WHERE n.name = p.name AND n.slot > p.slot)
            """,
            [cutoff],
        )
        return total


def _foreign_relations() -> list[Any]:
    """Relations from models of other apps to a job, an attempt or a group.

    The same ones Django's deletion collector follows, hidden ones (``related_name="+"``)
    included. djasync's own relations are handled by the raw statements of the fast path.
    """
    ours: tuple[type[Model], ...] = (Job, Attempt, Group)
    relations: list[Any] = [
        rel for model in ours for rel in get_candidate_relations_to_delete(model._meta)
    ]
    return [rel for rel in relations if rel.related_model._meta.app_label != Job._meta.app_label]


def _referenced(rel: Any) -> str:
    """SQL: a row of ``rel``'s model references job ``j``."""
    quote = connection.ops.quote_name
    return (f"EXISTS (SELECT 1 FROM {quote(rel.related_model._meta.db_table)} r"
            f" WHERE r.{quote(rel.field.column)} = j.{quote(rel.field.target_field.column)})")


def _warn_protected(cursor: CursorWrapper, protecting: list[Any], params: dict[str, Any]) -> None:
    for rel in protecting:
        cursor.execute(f"SELECT count(*) FROM ({SELECT} AND {_referenced(rel)}) AS held", params)
        count = int(cursor.fetchone()[0])
        if count:
            logger.warning(
                "prune kept %s old job(s) that rows of %s protect (on_delete=%s);"
                " delete those rows to prune them",
                count, rel.related_model._meta.label, rel.on_delete.__name__,
            )


def _delete(cursor: CursorWrapper, rows: Sequence[tuple[int, int | None]], *, orm: bool) -> None:
    """Delete these jobs, their attempts, and the groups they leave empty."""
    ids = [job_id for job_id, _ in rows]
    group_ids = list({group_id for _, group_id in rows if group_id is not None})
    cursor.execute("UPDATE djasync_group SET final_id = NULL WHERE final_id = ANY(%s)", [ids])
    if orm:
        # Django's collector applies each relation's on_delete (CASCADE, SET_NULL, ...), through
        # attempts too, and raises ProtectedError/RestrictedError before deleting anything.
        Job.objects.using(connection.alias).filter(pk__in=ids).only("pk").delete()
    else:
        cursor.execute("DELETE FROM djasync_attempt WHERE job_id = ANY(%s)", [ids])
        cursor.execute("DELETE FROM djasync_job WHERE id = ANY(%s)", [ids])
    if not group_ids:
        return
    if not orm:
        cursor.execute(
            """
            DELETE FROM djasync_group g
             WHERE g.id = ANY(%s)
               AND NOT EXISTS (SELECT 1 FROM djasync_job j WHERE j.group_id = g.id)
            """,
            [group_ids],
        )
        return
    emptied = Group.objects.using(connection.alias).filter(pk__in=group_ids).exclude(
        Exists(Job.objects.filter(group=OuterRef("pk"))))
    try:
        with transaction.atomic():
            emptied.delete()
    except (ProtectedError, RestrictedError) as exc:
        # The jobs are gone all the same; an empty group some row protects stays.
        logger.warning("prune kept empty groups that application rows protect groups=%s error=%s",
                       group_ids, exc)


def _delete_one_by_one(
    cursor: CursorWrapper,
    select: str,
    params: dict[str, Any],
    rows: Sequence[tuple[int, int | None]],
    kept: list[int],
    orm: bool,
) -> int:
    """Delete ``rows``' jobs each in its own transaction; add the held-back ones to ``kept``."""
    deleted = 0
    for job_id, _ in rows:
        try:
            with transaction.atomic():
                # Still old, finished and free? (The batch's locks went with its rollback.)
                cursor.execute(f"{select} AND j.id = %(id)s FOR UPDATE OF j SKIP LOCKED",
                               {**params, "id": job_id})
                row = cursor.fetchone()
                if row is None:
                    continue
                _delete(cursor, [row], orm=orm)
        except HELD_BACK as exc:
            kept.append(job_id)
            logger.warning("prune kept a job that rows of another table still reference"
                           " job=%s error=%s", job_id, " ".join(str(exc).split()))
        else:
            deleted += 1
    return deleted
