import importlib

from django.db import migrations

# djasync_claim_limited and djasync_wake_waiters, cheaper per job (issue 16's bench: a key with
# concurrency 8 over no-op jobs at --concurrency 4). Profiled with pg_stat_statements
# (track = all): a claim of a job with a key ran ~11 statements inside the function, a
# worker's finish 4 more in djasync_wake_waiters, and most of the claim's server time was the
# fixed cost of each (executor start and end, a snapshot), not their execution. What changes,
# nothing else (the text is 0015's, edited below, so that every rule stays as it was):
#
# - The row lock of a job with concurrency keys no longer counts the job's attempts: at
#   --concurrency c, a claim's walk tries ~c - 1 rows that other workers run (SKIP LOCKED),
#   and each of those tries started, and ran, the count's subplan (it sits under the lock).
#   The count is made once the row is locked, by a statement of its own: it then sees a
#   snapshot at least as new (the same or one more attempt; see ``sql.claim``).
# - Calls whose result is not needed are assignments (plpgsql's simple-expression path, no
#   executor) rather than PERFORM (a query each): the slot's look (pg_advisory_unlock), the
#   notes in djasync.slots and djasync.gave_back; in djasync_wake_waiters, the loop over its
#   entries (FOREACH over the array, not a query) and its locks.
# - key_cap (a query) is computed only when the walk by key starts (rare).
_0015 = importlib.import_module("djasync.migrations.0015_claim_limited_without_subtransactions")

_LOCK_WITH_COUNT = """\
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
            CONTINUE WHEN NOT FOUND;
"""
_LOCK_THEN_COUNT = """\
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
"""

#: (0015's text, 0016's text), each found exactly once in 0015's function.
_EDITS = [
    (_LOCK_WITH_COUNT, _LOCK_THEN_COUNT),
    ("    key_cap integer := coalesce((SELECT max(x) FROM unnest(cfg_concurrency) x), 0)"
     " + n + 4;\n",
     "    key_cap integer;\n"
     "    -- The result of a call made for its effect (an assignment: no query).\n"
     "    ignored text;\n"),
    ("    by_key := true;\n    OPEN candidates FOR\n",
     "    by_key := true;\n"
     "    key_cap := coalesce((SELECT max(x) FROM unnest(cfg_concurrency) x), 0) + n + 4;\n"
     "    OPEN candidates FOR\n"),
    ("                        PERFORM pg_advisory_unlock(h, s);\n",
     "                        ignored := pg_advisory_unlock(h, s);\n"),
    ("        PERFORM set_config('djasync.slots',\n",
     "        ignored := set_config('djasync.slots',\n"),
    ("            PERFORM set_config('djasync.gave_back', coalesce(current_setting(\n",
     "            ignored := set_config('djasync.gave_back', coalesce(current_setting(\n"),
]


def _edited(text: str) -> str:
    for old, new in _EDITS:
        if text.count(old) != 1:
            raise AssertionError(f"0016: expected one {old!r} in 0015's claim")
        text = text.replace(old, new)
    return text


CLAIM_LIMITED = _edited(_0015.CLAIM_LIMITED)

WAKE_WAITERS = r"""
CREATE OR REPLACE FUNCTION djasync_wake_waiters(channel text)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    entries text := current_setting('djasync.gave_back', true);
    entry text;
    waiting bigint;
    ignored boolean;
BEGIN
    IF coalesce(entries, '') = '' THEN
        RETURN false;
    END IF;
    FOREACH entry IN ARRAY string_to_array(entries, chr(31)) LOOP
        CONTINUE WHEN entry = '';
        ignored := pg_advisory_xact_lock_shared(
            hashtextextended('djasync.committing:' || entry, 0)) IS NULL;
        waiting := hashtextextended('djasync.waiting:' || entry, 0);
        IF pg_try_advisory_lock(waiting) THEN
            ignored := pg_advisory_unlock(waiting);
        ELSE
            PERFORM pg_notify(channel, '*');
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$$;
"""


def _wake_waiters_0015() -> str:
    text = _0015.SLOTS
    start = text.index("CREATE FUNCTION djasync_wake_waiters(")
    end = text.index("$$;", text.index("AS $$", start) + 5) + 3
    return text[start:end].replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")


class Migration(migrations.Migration):

    dependencies = [
        ("djasync", "0015_claim_limited_without_subtransactions"),
    ]

    operations = [
        migrations.RunSQL(CLAIM_LIMITED + WAKE_WAITERS,
                          _0015.CLAIM_LIMITED + _wake_waiters_0015()),
    ]
