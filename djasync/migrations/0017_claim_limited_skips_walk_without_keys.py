import importlib

from django.db import migrations

# djasync_claim_limited: a claim with LIMITS set and no job with keys due (the usual claim of
# jobs without keys) skips the walk over the jobs with keys whole, its variables' first values
# too. PL/pgSQL sets up each expression it evaluates again in each transaction (about a
# microsecond each: it keeps their state per transaction), and a worker's claim is a
# transaction of its own; the walk's 26 first values were set up and evaluated by every claim.
# Now the first job with keys is fetched right after the cursor is opened: without one, the
# claim goes on to the jobs without keys (and drops its session's waiting marks, as before).
# Nothing else changes (0016's text, edited: every rule as it was).
#
# Tried and left out (issue 16's bench, a key with concurrency 8 over no-op jobs at
# --concurrency 4): gathering the jobs with keys whose slots were seen free and locking them
# with one SKIP LOCKED statement (LIMIT 1), instead of one statement per job, so that the ~3
# rows per claim that the other workers hold cost no statement each. The server CPU per job did
# not fall (159% of the drain without LIMITS, against 151%): a statement inside the function
# costs ~8 us, and the bookkeeping of the gathered jobs (their arrays, a replay for batches)
# cost as much as it saved. With 12 rows held per claim it saved ~14% of the claim's CPU. What
# the claim of a job with a key costs is mostly PL/pgSQL's own work per transaction (see the
# commit that adds this migration and docs/howto/flow-control.md).
_0016 = importlib.import_module("djasync.migrations.0016_claim_limited_fewer_statements")

CLAIM_LIMITED = r"""CREATE OR REPLACE FUNCTION djasync_claim_limited(
    queues text[], n integer, at timestamptz, name_prefix text, one_id bigint,
    cfg_keys text[], cfg_concurrency integer[], cfg_rate integer[],
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
    due timestamptz := coalesce(at, clock_timestamp());
    -- job() (one_id) runs a job of a paused queue: it is asked for by name.
    paused text[] := CASE WHEN one_id IS NULL
                          THEN ARRAY(SELECT p.queue FROM djasync_pausedqueue p)
                          ELSE '{}' END;
    -- The n best jobs without keys (priority, run_after, id), in claim order.
    b_pri smallint[];
    b_ra timestamptz[];
    b_ids bigint[];
    -- Whether those are the ones no one else holds (the probe ran).
    b_exact boolean;
    b_at integer;
    u record;
    -- The first job with keys, fetched before the walk starts.
    prefetched boolean;
    cand record;
    candidates refcursor;
    full_keys text[];
    -- The same as a jsonb object: looking a key up in it is a binary search, not a scan.
    full_set jsonb;
    -- Keys without a rate seen with a free slot by this claim (and their hashes): not looked
    -- at again before a job of theirs is locked.
    free_set jsonb;
    -- The LIMITS entries of the full keys: this session waits on them (djasync_wait_on).
    waiting text[];
    -- The entries of the slots taken (djasync.gave_back: see djasync_wake_waiters).
    gave text[];
    -- The slots this session holds (tags as djasync_limit_tag makes them): advisory locks are
    -- re-entrant, so a slot of ours would look free. ``mine``: those this claim took.
    held text;
    mine text;
    rtags text;
    tag text;
    h integer;
    cc integer;
    first integer;
    free boolean;
    blocked text;
    k text;
    s integer;
    got boolean;
    rated boolean;
    c integer;
    taken integer := 0;
    taken_ids bigint[];
    -- Jobs the walk in claim order reads before it turns to each key's first jobs.
    look_cap integer;
    looked integer;
    deep boolean;
    by_key boolean;
    -- Jobs looked at per key then: its running jobs (locked) come first.
    key_cap integer;
    -- The result of a call made for its effect (an assignment: no query).
    ignored text;
BEGIN
    IF one_id IS NULL THEN
        OPEN candidates FOR
            SELECT j.id, j.limits, j.priority, j.run_after
              FROM djasync_job j
             WHERE j.status = 'pending' AND j.limits IS NOT NULL AND j.run_after <= due
               AND (queues IS NULL OR j.queue = ANY(queues)) AND j.queue <> ALL(paused)
               AND (name_prefix IS NULL OR starts_with(j.name, name_prefix)
                        OR (j.name = 'djasync.backends.run_task'
                            AND starts_with(j.args ->> 0, name_prefix)))
             ORDER BY j.priority DESC, j.run_after, j.id;
    ELSE
        OPEN candidates FOR
            SELECT j.id, j.limits, j.priority, j.run_after
              FROM djasync_job j
             WHERE j.id = one_id AND j.status = 'pending' AND j.limits IS NOT NULL;
    END IF;
    FETCH candidates INTO cand;
    <<walk>>
    BEGIN  -- (a block to leave: no subtransaction)
    IF NOT FOUND THEN
        -- No job with keys is due (the usual claim of jobs without keys): nothing of the walk
        -- runs, not even its variables' first values (expressions that PL/pgSQL sets up again
        -- in each transaction, a microsecond each).
        CLOSE candidates;
        IF current_setting('djasync.waiting', true) <> '' THEN
            PERFORM djasync_stop_waiting('{}');
        END IF;
        EXIT walk;
    END IF;
    b_exact := false;
    full_keys := '{}';
    full_set := '{}';
    free_set := '{}';
    waiting := '{}';
    gave := '{}';
    held := coalesce(current_setting('djasync.slots', true), '')
            || coalesce(current_setting('djasync.session_slots', true), '');
    mine := '';
    taken_ids := '{}';
    look_cap := 200 + n;
    looked := 0;
    deep := false;
    by_key := false;
    prefetched := true;
    LOOP  -- the walk in claim order; then, if it read too far, the walk of each key's first jobs
    LOOP
        EXIT WHEN taken >= n;
        IF prefetched THEN
            prefetched := false;
        ELSE
            FETCH candidates INTO cand;
            EXIT WHEN NOT FOUND;
        END IF;
        looked := looked + 1;
        IF looked = 1 AND one_id IS NULL THEN
            -- The n best jobs without keys, running or not (a probe below sorts that out only
            -- if it matters). Looked up only now that a job with keys is due.
            SELECT array_agg(t.priority ORDER BY t.priority DESC, t.run_after, t.id),
                   array_agg(t.run_after ORDER BY t.priority DESC, t.run_after, t.id),
                   array_agg(t.id ORDER BY t.priority DESC, t.run_after, t.id)
              INTO b_pri, b_ra, b_ids
              FROM (SELECT j.priority, j.run_after, j.id FROM djasync_job j
                     WHERE j.status = 'pending' AND j.limits IS NULL AND j.run_after <= due
                       AND (queues IS NULL OR j.queue = ANY(queues)) AND j.queue <> ALL(paused)
                       AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
                       AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
                       AND (name_prefix IS NULL OR starts_with(j.name, name_prefix)
                                OR (j.name = 'djasync.backends.run_task'
                                    AND starts_with(j.args ->> 0, name_prefix)))
                     ORDER BY j.priority DESC, j.run_after, j.id
                     LIMIT n) t;
        END IF;
        IF NOT by_key AND looked > look_cap THEN
            deep := true;
            EXIT;
        END IF;
        -- Stop at a job ranking after the (n - taken)-th best job without keys: the plain
        -- part below takes that one and those before it.
        b_at := n - taken;
        IF b_at <= coalesce(cardinality(b_ids), 0) AND (cand.priority < b_pri[b_at]
               OR (cand.priority = b_pri[b_at]
                   AND (cand.run_after, cand.id) > (b_ra[b_at], b_ids[b_at]))) THEN
            EXIT WHEN b_exact;
            -- Some of those may be running elsewhere (an atomic job's row stays locked while
            -- it runs): the plain part skips them, and this job must not wait for them. Find
            -- the n best that this claim can lock, and give the locks back at once (the one
            -- subtransaction of a claim of jobs with concurrency keys only, at most once).
            b_exact := true;
            b_pri := '{}';
            b_ra := '{}';
            b_ids := '{}';
            BEGIN
                FOR u IN
                    SELECT j.priority, j.run_after, j.id FROM djasync_job j
                     WHERE j.status = 'pending' AND j.limits IS NULL AND j.run_after <= due
                       AND (queues IS NULL OR j.queue = ANY(queues)) AND j.queue <> ALL(paused)
                       AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
                       AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
                       AND (name_prefix IS NULL OR starts_with(j.name, name_prefix)
                                OR (j.name = 'djasync.backends.run_task'
                                    AND starts_with(j.args ->> 0, name_prefix)))
                     ORDER BY j.priority DESC, j.run_after, j.id
                     LIMIT n
                       FOR NO KEY UPDATE OF j SKIP LOCKED
                LOOP
                    b_pri := b_pri || u.priority;
                    b_ra := b_ra || u.run_after;
                    b_ids := b_ids || u.id;
                END LOOP;
                RAISE EXCEPTION 'djasync claim probe' USING ERRCODE = 'DJA02';
            EXCEPTION WHEN SQLSTATE 'DJA02' THEN
                NULL;  -- rolled back: the rows are free for others again
            END;
            EXIT WHEN b_at <= coalesce(cardinality(b_ids), 0) AND (cand.priority < b_pri[b_at]
               OR (cand.priority = b_pri[b_at]
                   AND (cand.run_after, cand.id) > (b_ra[b_at], b_ids[b_at])));
        END IF;
        -- A job waiting on a key found full is passed over untried (a simple expression:
        -- no query per job, as this may read many of them).
        CONTINUE WHEN full_set ? (cand.limits ->> 0)  -- the usual job, of one key
            OR (jsonb_array_length(cand.limits) > 1 AND cand.limits ?| full_keys);
        CONTINUE WHEN cand.id = ANY(taken_ids);  -- ours: a lock of our own is not skipped
        -- A key with no slot free now is marked full without locking anything. The keys are
        -- read by position (simple expressions, no query per job).
        blocked := NULL;
        rated := false;
        -- (The usual job, of one key seen free already by this claim, skips this: the walk
        -- passes many jobs that other workers run, and each costs only its row's look.)
        IF jsonb_array_length(cand.limits) > 1 OR NOT free_set ? (cand.limits ->> 0) THEN
        FOR i IN 0..jsonb_array_length(cand.limits) - 1 LOOP
            k := cand.limits ->> i;
            c := coalesce(array_position(cfg_keys, k),
                          array_position(cfg_keys, split_part(k, ':', 1) || ':*'));
            CONTINUE WHEN c IS NULL;  -- no longer configured: no limit
            rated := rated OR cfg_rate[c] > 0;
            CONTINUE WHEN cfg_concurrency[c] = 0 OR free_set ? k;
            -- Whether a slot is free (djasync_slot_free, inline: a lock taken and given back at
            -- once). If none is, mark this session as waiting on the entry and look again: a
            -- slot given back after this second look is followed by a NOTIFY
            -- (djasync_wake_waiters).
            cc := cfg_concurrency[c];
            h := hashtext('djasync.limit:' || k);
            free := false;
            FOR look IN 1..2 LOOP
                first := floor(random() * cc)::integer;
                FOR i IN 0..cc - 1 LOOP
                    s := (first + i) % cc;
                    CONTINUE WHEN held <> ''
                        AND position(chr(31) || h || '#' || s || chr(31) IN held || chr(31)) > 0;
                    IF pg_try_advisory_lock(h, s) THEN
                        ignored := pg_advisory_unlock(h, s);
                        free := true;
                        EXIT;
                    END IF;
                END LOOP;
                EXIT WHEN free;
                IF look = 1 AND NOT cfg_keys[c] = ANY(waiting) THEN
                    waiting := waiting || cfg_keys[c];
                    PERFORM djasync_wait_on(cfg_keys[c]);
                END IF;
            END LOOP;
            IF NOT free THEN
                blocked := k;
                EXIT;
            END IF;
            IF cfg_rate[c] = 0 THEN  -- a key with a rate is looked at for each job
                free_set := free_set || jsonb_build_object(k, h);
            END IF;
        END LOOP;
        END IF;
        IF blocked IS NOT NULL THEN
            full_keys := full_keys || blocked;
            full_set := full_set || jsonb_build_object(blocked, true);
            CONTINUE;
        END IF;
        got := false;
        s := 0;
        IF NOT rated THEN
            -- Concurrency only: lock the row in this transaction, then take the slots.
            -- (The attempts are counted once the row is ours: see the migration's note.)
            SELECT j.id, j.name, j.args, j.kwargs, j.meta, j.queue, j.priority, j.group_id,
                   j.lease_expires IS NOT NULL, j.run_after
              INTO id, name, args, kwargs, meta, queue, priority, group_id,
                   lease_expired, run_after
              FROM djasync_job j
             WHERE j.id = cand.id AND j.status = 'pending'
               AND (one_id IS NOT NULL OR j.run_after <= due) AND j.queue <> ALL(paused)
               AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
               AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
               FOR NO KEY UPDATE OF j SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
            previous_attempts := (SELECT count(*) FROM djasync_attempt a WHERE a.job_id = cand.id);
            FOR i IN 0..jsonb_array_length(cand.limits) - 1 LOOP
                k := cand.limits ->> i;
                c := coalesce(array_position(cfg_keys, k),
                              array_position(cfg_keys, split_part(k, ':', 1) || ':*'));
                CONTINUE WHEN c IS NULL OR cfg_concurrency[c] = 0;
                -- Take a slot (djasync_take_slot, inline), from a random one on.
                cc := cfg_concurrency[c];
                h := (free_set ->> k)::integer;
                first := floor(random() * cc)::integer;
                free := false;
                FOR i IN 0..cc - 1 LOOP
                    s := (first + i) % cc;
                    tag := chr(31) || h || '#' || s;
                    CONTINUE WHEN held <> '' AND position(tag || chr(31) IN held || chr(31)) > 0;
                    IF pg_try_advisory_xact_lock(h, s) THEN
                        held := held || tag;
                        mine := mine || tag;
                        free := true;
                        EXIT;
                    END IF;
                END LOOP;
                IF NOT free THEN
                    -- Filled up since the look above: the row stays locked, unclaimed, until
                    -- this transaction ends (see the migration's note).
                    blocked := k;
                    EXIT;
                END IF;
                gave := gave || cfg_keys[c];
            END LOOP;
            IF blocked IS NOT NULL THEN
                full_keys := full_keys || blocked;
                full_set := full_set || jsonb_build_object(blocked, true);
                CONTINUE;
            END IF;
            got := true;
        ELSE
        BEGIN  -- a subtransaction: a full key gives back this job's row lock, slots and tokens
            SELECT j.id, j.name, j.args, j.kwargs, j.meta, j.queue, j.priority, j.group_id,
                   (SELECT count(*) FROM djasync_attempt a WHERE a.job_id = j.id),
                   j.lease_expires IS NOT NULL, j.run_after
              INTO id, name, args, kwargs, meta, queue, priority, group_id, previous_attempts,
                   lease_expired, run_after
              FROM djasync_job j
             WHERE j.id = cand.id AND j.status = 'pending'
               AND (one_id IS NOT NULL OR j.run_after <= due) AND j.queue <> ALL(paused)
               AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
               AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
               FOR NO KEY UPDATE OF j SKIP LOCKED;
            rtags := '';
            IF FOUND THEN
                FOR i IN 0..jsonb_array_length(cand.limits) - 1 LOOP
                    k := cand.limits ->> i;
                    c := coalesce(array_position(cfg_keys, k),
                                  array_position(cfg_keys, split_part(k, ':', 1) || ':*'));
                    CONTINUE WHEN c IS NULL;  -- no longer configured: no limit
                    IF cfg_concurrency[c] > 0 THEN
                        s := djasync_take_slot(k, cfg_concurrency[c], false);
                        rtags := rtags || chr(31) || hashtext('djasync.limit:' || k) || '#' || s;
                        gave := gave || cfg_keys[c];
                    END IF;
                    IF s < 0 OR (cfg_rate[c] > 0
                                 AND djasync_take_token(k, cfg_rate[c], cfg_per[c]) IS NULL) THEN
                        blocked := k;
                        RAISE EXCEPTION 'djasync limit % is full', k USING ERRCODE = 'DJA01';
                    END IF;
                END LOOP;
                got := true;
            END IF;
        EXCEPTION WHEN SQLSTATE 'DJA01' THEN
            full_keys := full_keys || blocked;
            full_set := full_set || jsonb_build_object(blocked, true);
            -- A rate's token is timed, not given back: wait on its entry's next look (poll).
        END;
        END IF;
        IF got AND rated THEN
            held := held || rtags;  -- noted in djasync.slots by djasync_take_slot already
        END IF;
        IF got THEN
            -- Its keys may be full now (a batch): the next job of theirs looks again.
            free_set := free_set - (cand.limits ->> 0);
            IF jsonb_array_length(cand.limits) > 1 THEN
                free_set := free_set - ARRAY(SELECT jsonb_array_elements_text(cand.limits));
            END IF;
            taken := taken + 1;
            taken_ids := taken_ids || id;
            RETURN NEXT;
        END IF;
    END LOOP;
    CLOSE candidates;
    EXIT WHEN NOT deep OR by_key OR taken >= n;
    -- The walk read past look_cap jobs it could not take (jobs waiting on full keys, ranked
    -- first): rather than read on through all of them, look at the first jobs of each key
    -- (by a job's first key, through djasync_job_claim_key: one index descent per key, none
    -- of the rows of a key known full), merged in claim order.
    by_key := true;
    key_cap := coalesce((SELECT max(x) FROM unnest(cfg_concurrency) x), 0) + n + 4;
    OPEN candidates FOR
        WITH RECURSIVE keys(k) AS (
            (SELECT j.limits ->> 0 FROM djasync_job j
              WHERE j.status = 'pending' AND j.limits IS NOT NULL
              ORDER BY j.limits ->> 0 LIMIT 1)
            UNION ALL
            SELECT (SELECT j.limits ->> 0 FROM djasync_job j
                     WHERE j.status = 'pending' AND j.limits IS NOT NULL
                       AND (j.limits ->> 0) > keys.k
                     ORDER BY j.limits ->> 0 LIMIT 1)
              FROM keys WHERE keys.k IS NOT NULL)
        SELECT h.id, h.limits, h.priority, h.run_after
          FROM keys CROSS JOIN LATERAL (
               SELECT j.id, j.limits, j.priority, j.run_after
                 FROM djasync_job j
                WHERE (j.limits ->> 0) = keys.k AND j.status = 'pending'
                  AND j.limits IS NOT NULL AND j.run_after <= due
                  AND (queues IS NULL OR j.queue = ANY(queues)) AND j.queue <> ALL(paused)
                  AND (name_prefix IS NULL OR starts_with(j.name, name_prefix)
                           OR (j.name = 'djasync.backends.run_task'
                               AND starts_with(j.args ->> 0, name_prefix)))
                ORDER BY j.limits ->> 0, j.priority DESC, j.run_after, j.id
                LIMIT key_cap) h
         WHERE keys.k IS NOT NULL AND keys.k <> ALL(full_keys)
         ORDER BY h.priority DESC, h.run_after, h.id;
    END LOOP;
    -- This session waits on the entries of the keys it found full, and on no other.
    IF waiting <> '{}' OR current_setting('djasync.waiting', true) <> '' THEN
        PERFORM djasync_stop_waiting(waiting);
    END IF;
    IF mine <> '' THEN
        ignored := set_config('djasync.slots',
                           coalesce(current_setting('djasync.slots', true), '') || mine, true);
    END IF;
    IF gave <> '{}' THEN
        IF channel IS NOT NULL THEN
            -- Delivered at COMMIT, when the slots are given back (job(), flush_queue).
            PERFORM pg_notify(channel, '*');
        ELSE
            -- A worker asks before its COMMIT whether anyone waits (djasync_wake_waiters).
            ignored := set_config('djasync.gave_back', coalesce(current_setting(
                'djasync.gave_back', true), '') || chr(31) || array_to_string(gave, chr(31)),
                true);
        END IF;
    END IF;
    END walk;
    IF taken >= n THEN
        RETURN;
    END IF;
    -- The jobs without keys, as the plain claim takes them (djasync.sql.claim).
    IF one_id IS NOT NULL THEN
        RETURN QUERY
        SELECT j.id, j.name, j.args, j.kwargs, j.meta, j.queue, j.priority, j.group_id,
               (SELECT count(*) FROM djasync_attempt a WHERE a.job_id = j.id),
               j.lease_expires IS NOT NULL, j.run_after
          FROM djasync_job j
         WHERE j.id = one_id AND j.status = 'pending' AND j.limits IS NULL
           AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
           AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
           FOR NO KEY UPDATE OF j SKIP LOCKED;
    ELSIF cardinality(queues) = 1 THEN
        RETURN QUERY
        SELECT j.id, j.name, j.args, j.kwargs, j.meta, j.queue, j.priority, j.group_id,
               (SELECT count(*) FROM djasync_attempt a WHERE a.job_id = j.id),
               j.lease_expires IS NOT NULL, j.run_after
          FROM djasync_job j
         WHERE j.queue = queues[1] AND j.status = 'pending' AND j.limits IS NULL
           AND j.run_after <= due AND j.queue <> ALL(paused)
           AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
           AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
           AND (name_prefix IS NULL OR starts_with(j.name, name_prefix)
                    OR (j.name = 'djasync.backends.run_task'
                        AND starts_with(j.args ->> 0, name_prefix)))
         ORDER BY j.queue, j.priority DESC, j.run_after, j.id
         LIMIT n - taken
           FOR NO KEY UPDATE OF j SKIP LOCKED;
    ELSE
        RETURN QUERY
        SELECT j.id, j.name, j.args, j.kwargs, j.meta, j.queue, j.priority, j.group_id,
               (SELECT count(*) FROM djasync_attempt a WHERE a.job_id = j.id),
               j.lease_expires IS NOT NULL, j.run_after
          FROM djasync_job j
         WHERE j.status = 'pending' AND j.limits IS NULL AND j.run_after <= due
           AND (queues IS NULL OR j.queue = ANY(queues)) AND j.queue <> ALL(paused)
           AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
           AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
           AND (name_prefix IS NULL OR starts_with(j.name, name_prefix)
                    OR (j.name = 'djasync.backends.run_task'
                        AND starts_with(j.args ->> 0, name_prefix)))
         ORDER BY j.priority DESC, j.run_after, j.id
         LIMIT n - taken
           FOR NO KEY UPDATE OF j SKIP LOCKED;
    END IF;
END
$$;

"""


class Migration(migrations.Migration):

    dependencies = [
        ("djasync", "0016_claim_limited_fewer_statements"),
    ]

    operations = [
        migrations.RunSQL(CLAIM_LIMITED, _0016.CLAIM_LIMITED),
    ]
