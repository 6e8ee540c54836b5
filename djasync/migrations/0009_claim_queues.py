from django.db import migrations

# The claim of a worker serving several queues (``--queue mail --queue sms``), as a function
# (see djasync.sql.claim). One statement cannot do it cheaply on PostgreSQL 15: filtered by
# ``queue = ANY(…)``, the walk of ``djasync_job_claim`` reads past every due job of the other
# queues (300,000 in ``bulk``: 256 ms a claim); ``= ANY`` on ``djasync_job_claim_queue`` needs
# a sort of every due job of the served queues; a UNION ALL of per-queue walks is sorted too
# (no ordered merge under a LIMIT); a LATERAL walk per queue with FOR UPDATE inside locks rows
# it then does not return, which no other worker may run until our transaction ends.
#
# So: look (no lock) at the first ``cap`` runnable jobs of each queue, each queue through its
# own index, and merge them in the claim's order (a sort of those few rows); then lock them
# one at a time in that order with SKIP LOCKED (a job another worker holds is passed over),
# each lock re-checking every predicate, until ``n`` are locked. Every row locked is returned.
# Once the merge reaches the last row looked at of a queue that has more, the jobs after it
# in that queue, unseen, may outrank what comes next: look again with a larger ``cap``. The
# result is the claim's, whatever the number of jobs held by other workers at a queue's head.
#
# The settings are the claim's own (djasync.sql.CLAIM_PLAN, whoever calls): each queue's look
# walks its index in order, never a sort of the queue's backlog; the merge's sort has no
# alternative, so it stays. But disabling a sort it must keep costs the plan 10^10, far above
# ``jit_above_cost``: PostgreSQL then compiled the merge of a few rows for each claim (330 ms).
# JIT never pays for statements this small, so it is off.
CREATE = """
CREATE FUNCTION djasync_claim_queues(queues text[], n integer, at timestamptz, name_prefix text)
RETURNS TABLE (id bigint, name varchar, args jsonb, kwargs jsonb, meta jsonb, queue varchar,
               priority smallint, group_id bigint, previous_attempts bigint,
               lease_expired boolean, run_after timestamptz)
LANGUAGE plpgsql
SET enable_sort = off
SET enable_seqscan = off
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    due timestamptz := coalesce(at, clock_timestamp());
    served text[] := ARRAY(SELECT DISTINCT q FROM unnest(queues) AS q);
    cap integer := n + 16;
    seen integer[];
    taken bigint[] := '{}';
    more boolean;
    c record;
BEGIN
    LOOP
        seen := array_fill(0, ARRAY[cardinality(served)]);
        more := false;
        FOR c IN
            SELECT p.id, q.i
              FROM unnest(served) WITH ORDINALITY AS q(name, i)
             CROSS JOIN LATERAL (
                   SELECT j.id, j.priority, j.run_after
                     FROM djasync_job j
                    WHERE j.queue = q.name AND j.status = 'pending' AND j.run_after <= due
                      AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
                      AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
                      AND (name_prefix IS NULL OR starts_with(j.name, name_prefix))
                    ORDER BY j.priority DESC, j.run_after, j.id
                    LIMIT cap) p
             ORDER BY p.priority DESC, p.run_after, p.id
        LOOP
            seen[c.i] := seen[c.i] + 1;
            IF c.id <> ALL(taken) THEN
                RETURN QUERY
                SELECT j.id, j.name, j.args, j.kwargs, j.meta, j.queue, j.priority, j.group_id,
                       (SELECT count(*) FROM djasync_attempt a WHERE a.job_id = j.id),
                       j.lease_expires IS NOT NULL, j.run_after
                  FROM djasync_job j
                 WHERE j.id = c.id AND j.status = 'pending' AND j.run_after <= due
                   AND j.queue = ANY(served)
                   AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
                   AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
                   AND (name_prefix IS NULL OR starts_with(j.name, name_prefix))
                   FOR NO KEY UPDATE OF j SKIP LOCKED;
                IF FOUND THEN
                    taken := taken || c.id;
                    EXIT WHEN cardinality(taken) >= n;
                END IF;
            END IF;
            IF seen[c.i] = cap THEN  -- this queue has more, unseen, ranked after this row
                more := true;
                EXIT;
            END IF;
        END LOOP;
        EXIT WHEN cardinality(taken) >= n OR NOT more;
        cap := cap * 4;
    END LOOP;
END
$$
"""

DROP = "DROP FUNCTION djasync_claim_queues(text[], integer, timestamptz, text)"


class Migration(migrations.Migration):

    dependencies = [
        ("djasync", "0008_claim_queue_index"),
    ]

    operations = [migrations.RunSQL(CREATE, DROP)]
