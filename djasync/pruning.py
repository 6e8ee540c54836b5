"""Delete old finished jobs without getting in the workers' way."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from djasync.models import FINISHED_STATUSES, Status

BATCH_SIZE = 1000


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
    """
    statuses = [Status(s).value for s in statuses]
    if Status.PENDING in statuses:
        raise ValueError("pending jobs are never pruned; cancel them first")
    cutoff = timezone.now() - older_than
    select = """
        SELECT j.id FROM djasync_job j
         WHERE j.status = ANY(%(statuses)s) AND j.finished_at < %(cutoff)s
           AND (j.group_id IS NULL OR NOT EXISTS (
                SELECT 1 FROM djasync_job o
                 WHERE o.group_id = j.group_id
                   AND (o.status = 'pending' OR o.finished_at >= %(cutoff)s)))
    """
    params: dict[str, Any] = {"statuses": statuses, "cutoff": cutoff, "batch": batch_size}
    with connection.cursor() as cursor:
        if dry_run:
            cursor.execute(f"SELECT count(*) FROM ({select}) AS old", params)
            return int(cursor.fetchone()[0])
        total = 0
        while True:
            with transaction.atomic():
                cursor.execute(
                    f"{select} LIMIT %(batch)s FOR UPDATE OF j SKIP LOCKED", params
                )
                ids = [row[0] for row in cursor.fetchall()]
                if not ids:
                    # Slot records of periodic jobs only need to outlive the daemons' clocks,
                    # except each name's newest: it is what tells a restarting daemon that the
                    # latest slot already ran, however long ago (a monthly job, a 30-day prune).
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
                cursor.execute(
                    "UPDATE djasync_group SET final_id = NULL WHERE final_id = ANY(%s)", [ids]
                )
                cursor.execute("DELETE FROM djasync_attempt WHERE job_id = ANY(%s)", [ids])
                cursor.execute(
                    "DELETE FROM djasync_job WHERE id = ANY(%s) RETURNING group_id", [ids]
                )
                group_ids = list({row[0] for row in cursor.fetchall() if row[0] is not None})
                cursor.execute(
                    """
                    DELETE FROM djasync_group g
                     WHERE g.id = ANY(%s)
                       AND NOT EXISTS (SELECT 1 FROM djasync_job j WHERE j.group_id = g.id)
                    """,
                    [group_ids],
                )
                total += len(ids)
