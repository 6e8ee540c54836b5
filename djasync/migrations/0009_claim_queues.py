from django.db import migrations

# The claim of a worker serving several queues (``--queue mail --queue sms``), as a function
# (see djasync.sql.claim). One statement cannot do it cheaply on PostgreSQL 15: filtered by
# ``queue = ANY(…)``, the walk of ``djasync_job_claim`` reads past every due job of the other
# queues (300,000 in ``bulk``: 110-250 ms a claim; 0.4 ms this way); ``= ANY`` on
# ``djasync_job_claim_queue`` needs a sort of every due job of the served queues; a UNION ALL
# of per-queue walks is sorted too (no ordered merge under a LIMIT); a LATERAL walk per queue
# with FOR UPDATE inside locks rows it then does not return, which no other worker may run
# until our transaction ends.
#
# So: look (no lock) at the first ``cap`` runnable jobs of each queue, each queue through its
# own index, and merge them in the claim's order (a sort of those few rows); then lock them in
# that order with SKIP LOCKED (a job another worker holds is passed over), every predicate
# checked again, until ``n`` are locked: the lock statement reads the ids in the order of the
# look (no sort) and LockRows locks each row only as the LIMIT asks for it, so every row locked
# is returned. Once the merge reaches the last job looked at of a queue that may have more,
# that queue's jobs not looked at (ranked after it) may outrank the next ones: if fewer than
# ``n`` were locked by then, look again, four times further. So the claim takes the best free
# jobs, as the one-statement claim does, however many jobs other workers hold at a queue's head.
#
# The settings are the claim's own (djasync.sql.CLAIM_PLAN, whoever calls): each queue's look
# walks its index in order, never a sort of the queue's backlog; the merge's sort has no
# alternative, so it stays. But disabling a sort it must keep costs the plan 10^10, far above
# ``jit_above_cost``: PostgreSQL then compiled the merge of a few rows for each claim (0.3 s).
# JIT never pays for statements this small, so it is off. And PL/pgSQL plans a statement
# for the values of its variables (a custom plan) until a generic plan looks no dearer: for
# the look and the lock it never does (the arrays' lengths, the LIMITs), so each claim planned
# both again (0.3 ms instead of 0.07 ms a claim). Their generic plans are the ones wanted
# (each queue's index walked in order; the ids looked up in the order of the look).
CREATE = """
CREATE FUNCTION djasync_claim_queues(queues text[], n integer, at timestamptz, name_prefix text)
RETURNS TABLE (id bigint, name varchar, args jsonb, kwargs jsonb, meta jsonb, queue varchar,
               priority smallint, group_id bigint, previous_attempts bigint,
               lease_expired boolean, run_after timestamptz)
LANGUAGE plpgsql
SET enable_sort = off
SET enable_seqscan = off
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    due timestamptz := coalesce(at, clock_timestamp());
    served text[] := ARRAY(SELECT DISTINCT q FROM unnest(queues) AS q);
    cap integer := n + 8;
    seen integer[];
    ids bigint[];
    of_queue integer[];
    upto integer;
    more boolean;
    taken bigint[] := '{}';
BEGIN
    LOOP
        -- Look: the first ``cap`` runnable jobs of each queue, merged in the claim's order.
        SELECT coalesce(array_agg(p.id ORDER BY p.priority DESC, p.run_after, p.id), '{}'),
               array_agg(p.i ORDER BY p.priority DESC, p.run_after, p.id)
          INTO ids, of_queue
          FROM (SELECT c.id, c.priority, c.run_after, q.i
                  FROM unnest(served) WITH ORDINALITY AS q(name, i)
                 CROSS JOIN LATERAL (
                       SELECT j.id, j.priority, j.run_after
                         FROM djasync_job j
                        WHERE j.queue = q.name AND j.status = 'pending' AND j.run_after <= due
                          AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
                          AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
                          AND (name_prefix IS NULL OR starts_with(j.name, name_prefix))
                        ORDER BY j.priority DESC, j.run_after, j.id
                        LIMIT cap) c) p;
        EXIT WHEN cardinality(ids) = 0;  -- nothing due
        -- Up to the first job that is the last one looked at of a queue that may have more:
        -- that queue's jobs not looked at come after it, and may outrank the next ones.
        seen := array_fill(0, ARRAY[cardinality(served)]);
        upto := cardinality(ids);
        more := false;
        FOR k IN 1..cardinality(ids) LOOP
            seen[of_queue[k]] := seen[of_queue[k]] + 1;
            IF seen[of_queue[k]] = cap THEN
                upto := k;
                more := true;
                EXIT;
            END IF;
        END LOOP;
        -- Lock: in that order, passing over the jobs held by others, until enough are taken.
        -- LockRows locks each row as the LIMIT asks for it: every row locked is returned.
        FOR id, name, args, kwargs, meta, queue, priority, group_id, previous_attempts,
            lease_expired, run_after IN
            SELECT j.id, j.name, j.args, j.kwargs, j.meta, j.queue, j.priority, j.group_id,
                   (SELECT count(*) FROM djasync_attempt a WHERE a.job_id = j.id),
                   j.lease_expires IS NOT NULL, j.run_after
              FROM unnest(ids[1:upto]) WITH ORDINALITY AS c(id, k)
              JOIN djasync_job j ON j.id = c.id
             WHERE j.status = 'pending' AND j.run_after <= due AND j.queue = ANY(served)
               AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
               AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
               AND (name_prefix IS NULL OR starts_with(j.name, name_prefix))
               AND j.id <> ALL(taken)  -- ours since a previous look: locked, not skipped
             ORDER BY c.k
             LIMIT n - cardinality(taken)
               FOR NO KEY UPDATE OF j SKIP LOCKED
        LOOP
            RETURN NEXT;
            taken := taken || id;
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
