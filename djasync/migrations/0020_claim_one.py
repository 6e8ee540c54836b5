from django.db import migrations

# djasync_claim_one: the claim of one job with LIMITS set, by a worker or flush_queue serving
# every queue (djasync.sql.CLAIM_ONE_LIMITED), at a fraction of djasync_claim_limited's cost.
#
# What a claim costs PostgreSQL there is mostly set-up, not work: PL/pgSQL sets up each
# expression it evaluates again in each transaction (~1 us each), and each statement of a
# function starts an executor. djasync_claim_limited, general (batches, several keys, rates,
# a walk by key behind deep backlogs, job()), evaluates ~100 expressions and runs 5-6
# statements to claim the usual job (one key, limited in concurrency only). This function
# settles that job with ~25 expressions and 2 statements, and leaves everything else to
# djasync_claim_limited, in the same call, with nothing locked:
#
# - One query reads the first 16 due jobs with keys in claim order and marks the leading run
#   of usual ones: it ends at the first job that is not (several keys, a rate, a key no longer
#   configured) or that ranks after the best due job without keys, running or not (the general
#   function counts only those no one runs, so it decides those cases).
# - Among them, a job whose key has no free slot (a look: a lock taken and given back at
#   once) or whose row another claim holds (its mark, migration 0019) is passed over; the
#   first left is locked (SKIP LOCKED), marked, and a slot of its key taken, from this
#   session's own start (the sessions spread over the slots). A slot taken by another worker
#   between the look and the take leaves the row locked, unclaimed, until this transaction
#   ends, and its COMMIT wakes the workers, as in djasync_claim_limited (0018).
# - With no job with keys due, the claim is the plain one (jobs without keys, paused queues
#   passed over). With any other outcome, or a session that waits on a key or holds slots
#   (djasync_claim_limited keeps those books), djasync_claim_limited claims.
#
# tests/test_limits.py compares the two over random queues (jobs with and without keys,
# several keys, rates, priorities, jobs not yet due, a paused queue, jobs and slots held).
CLAIM_ONE = r"""
CREATE FUNCTION djasync_claim_one(
    at timestamptz, cfg_keys text[], cfg_concurrency integer[], cfg_rate integer[],
    cfg_per double precision[], channel text)
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
    cand record;
    seen boolean := false;
    free boolean;
    s integer;
    ignored text;
BEGIN
    IF coalesce(current_setting('djasync.waiting', true), '')
       || coalesce(current_setting('djasync.slots', true), '')
       || coalesce(current_setting('djasync.session_slots', true), '') = '' THEN
        FOR cand IN
            SELECT c.id, c.usual, c.h, c.cc, c.entry,
                   mod(pg_backend_pid(), nullif(c.cc, 0)) AS start,
                   hashtext('djasync.job') # (c.id >> 31)::integer AS m1,
                   (c.id & 2147483647)::integer AS m2
              FROM (SELECT k.id, hashtext('djasync.limit:' || (k.limits ->> 0)) AS h,
                           cfg_concurrency[e.c] AS cc, cfg_keys[e.c] AS entry,
                           bool_and(coalesce(
                               jsonb_array_length(k.limits) = 1 AND cfg_concurrency[e.c] > 0
                               AND cfg_rate[e.c] = 0
                               AND coalesce((-k.priority, k.run_after, k.id) < (
                                   SELECT -u.priority, u.run_after, u.id FROM djasync_job u
                                    WHERE u.status = 'pending' AND u.limits IS NULL
                                      AND u.run_after <= coalesce(at, clock_timestamp())
                                      AND u.queue <> ALL(ARRAY(
                                          SELECT p.queue FROM djasync_pausedqueue p))
                                      AND (u.group_id IS NULL OR djasync_group_final_ready(u.id))
                                      AND (u.lease_expires IS NULL
                                           OR u.lease_expires < clock_timestamp())
                                    ORDER BY u.priority DESC, u.run_after, u.id
                                    LIMIT 1), true), false))
                           OVER (ORDER BY k.priority DESC, k.run_after, k.id) AS usual
                      FROM djasync_job k
                     CROSS JOIN LATERAL (
                           SELECT coalesce(array_position(cfg_keys, k.limits ->> 0),
                                           array_position(cfg_keys, split_part(
                                               k.limits ->> 0, ':', 1) || ':*')) AS c
                           OFFSET 0) e
                     WHERE k.status = 'pending' AND k.limits IS NOT NULL
                       AND k.run_after <= coalesce(at, clock_timestamp())
                       AND k.queue <> ALL(ARRAY(SELECT p.queue FROM djasync_pausedqueue p))
                     ORDER BY k.priority DESC, k.run_after, k.id
                     LIMIT 16) c
        LOOP
            seen := true;
            EXIT WHEN NOT cand.usual;
            -- A slot of its key free? (A lock taken and given back at once.)
            free := false;
            FOR i IN 0..cand.cc - 1 LOOP
                s := (cand.start + i) % cand.cc;
                IF pg_try_advisory_lock(cand.h, s) THEN
                    ignored := pg_advisory_unlock(cand.h, s);
                    free := true;
                    EXIT;
                END IF;
            END LOOP;
            CONTINUE WHEN NOT free;
            -- Held by another claim (its mark, 0019)?
            CONTINUE WHEN NOT pg_try_advisory_lock(cand.m1, cand.m2);
            ignored := pg_advisory_unlock(cand.m1, cand.m2);
            SELECT j.id, j.name, j.args, j.kwargs, j.meta, j.queue, j.priority, j.group_id,
                   (SELECT count(*) FROM djasync_attempt a WHERE a.job_id = j.id),
                   j.lease_expires IS NOT NULL, j.run_after
              INTO id, name, args, kwargs, meta, queue, priority, group_id, previous_attempts,
                   lease_expired, run_after
              FROM djasync_job j
             WHERE j.id = cand.id AND j.status = 'pending'
               AND j.run_after <= coalesce(at, clock_timestamp())
               AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
               AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
               FOR NO KEY UPDATE OF j SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
            ignored := pg_try_advisory_xact_lock(cand.m1, cand.m2);  -- the row's mark
            free := false;
            FOR i IN 0..cand.cc - 1 LOOP
                s := (cand.start + i) % cand.cc;
                IF pg_try_advisory_xact_lock(cand.h, s) THEN
                    free := true;
                    EXIT;
                END IF;
            END LOOP;
            IF NOT free THEN
                -- Taken since the look: the row stays locked, unclaimed, until this
                -- transaction ends, whose COMMIT wakes the workers (0018).
                IF channel IS NOT NULL THEN
                    PERFORM pg_notify(channel, '*');
                ELSE
                    ignored := set_config('djasync.gave_back', coalesce(current_setting(
                        'djasync.gave_back', true), '') || chr(31) || '*', true);
                END IF;
                EXIT;
            END IF;
            ignored := set_config('djasync.slots', chr(31) || cand.h || '#' || s, true);
            IF channel IS NOT NULL THEN
                PERFORM pg_notify(channel, '*');  -- delivered at COMMIT (job(), flush_queue)
            ELSE
                ignored := set_config('djasync.gave_back', coalesce(current_setting(
                    'djasync.gave_back', true), '') || chr(31) || cand.entry, true);
            END IF;
            RETURN NEXT;
            RETURN;
        END LOOP;
        IF NOT seen THEN
            -- No job with keys is due: the plain claim.
            RETURN QUERY
            SELECT j.id, j.name, j.args, j.kwargs, j.meta, j.queue, j.priority, j.group_id,
                   (SELECT count(*) FROM djasync_attempt a WHERE a.job_id = j.id),
                   j.lease_expires IS NOT NULL, j.run_after
              FROM djasync_job j
             WHERE j.status = 'pending' AND j.limits IS NULL
               AND j.run_after <= coalesce(at, clock_timestamp())
               AND j.queue <> ALL(ARRAY(SELECT p.queue FROM djasync_pausedqueue p))
               AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
               AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
             ORDER BY j.priority DESC, j.run_after, j.id
             LIMIT 1
               FOR NO KEY UPDATE OF j SKIP LOCKED;
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM djasync_claim_limited(
        NULL, 1, at, NULL, NULL, cfg_keys, cfg_concurrency, cfg_rate, cfg_per, channel);
END
$$;
"""
DROP_CLAIM_ONE = ("DROP FUNCTION djasync_claim_one(timestamptz, text[], integer[], integer[], "
                  "double precision[], text);")


class Migration(migrations.Migration):

    dependencies = [
        ("djasync", "0019_claim_limited_passes_held_rows_without_a_statement"),
    ]

    operations = [
        migrations.RunSQL(CLAIM_ONE, DROP_CLAIM_ONE),
    ]
