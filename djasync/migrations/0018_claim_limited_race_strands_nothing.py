import importlib

from django.db import migrations

# djasync_claim_limited: the race between a claim's look at a job's slots (free) and its take
# (another worker took the last one in between; found reading 0015's SQL, then held open by a
# test: tests/test_limits.py, "...strands_nothing_and_wakes_at_commit").
#
# - A job of one key: its row was locked before the take and stays locked, unclaimed, until
#   the claiming transaction ends (no subtransaction can give a row lock back), and the other
#   workers pass it over meanwhile. Nothing woke them when it ended: the job waited for the
#   next poll, not the ~10 ms a freed slot promises. Now that transaction's COMMIT notifies
#   (a worker: the entry '*' in djasync.gave_back, which djasync_wake_waiters answers with a
#   NOTIFY whoever waits; job() and flush_queue: their NOTIFY at COMMIT).
# - A job of several keys (concurrency only): the slots taken before the full key's were
#   transaction-level advisory locks, kept by the claiming transaction - for the whole run of
#   the jobs it did claim - with no job of theirs running: their keys ran below their
#   concurrency. Now such a job is claimed as a job with a rate is: in a subtransaction,
#   whose rollback gives back its row lock and every slot it took (a subtransaction's cost,
#   ~10 us, for the jobs of several keys only; the usual job of one key is locked and takes
#   its slot in the claiming transaction, as before). A slot found taken there (several keys,
#   or a rate) marks the session waiting on its entry, so that its holder's COMMIT wakes the
#   workers, and the claim's own COMMIT wakes them too (the holder may have committed before
#   the mark). Before, nothing did: the job waited for the next poll.
#
# Left as it was: a worker's transaction that then rolls back whole (wake_waiters_of) wakes
# the waiters of the jobs it claimed, not of a row the race left locked (the next poll).
_0016 = importlib.import_module("djasync.migrations.0016_claim_limited_fewer_statements")
_0017 = importlib.import_module("djasync.migrations.0017_claim_limited_skips_walk_without_keys")

EDITS = [
    ("    got boolean;\n",
     "    got boolean;\n"
     "    -- A slot taken by another worker between this claim's look and its take: the\n"
     "    -- claim's COMMIT wakes the workers (0018's note).\n"
     "    raced boolean := false;\n"),
    ("        IF NOT rated THEN\n"
     "            -- Concurrency only: lock the row in this transaction, then take the slots.\n",
     "        IF NOT rated AND jsonb_array_length(cand.limits) = 1 THEN\n"
     "            -- One key, concurrency only: lock the row in this transaction, then take the\n"
     "            -- slot. (Several keys: below, where a full one gives back the others.)\n"),
    ("                IF NOT free THEN\n"
     "                    -- Filled up since the look above: the row stays locked, unclaimed, until\n"
     "                    -- this transaction ends (see the migration's note).\n"
     "                    blocked := k;\n",
     "                IF NOT free THEN\n"
     "                    -- Filled up since the look above: the row stays locked, unclaimed, until\n"
     "                    -- this transaction ends, whose COMMIT wakes the workers (0018's note).\n"
     "                    blocked := k;\n"
     "                    raced := true;\n"),
    # The slots taken in the subtransaction (a rate's job, or now a job of several keys) are
    # noted where they are taken, once the job is got, not after the block for rates only.
    ("                got := true;\n"
     "            END IF;\n"
     "        EXCEPTION WHEN SQLSTATE 'DJA01' THEN\n",
     "                got := true;\n"
     "                held := held || rtags;  -- noted in djasync.slots by djasync_take_slot already\n"
     "            END IF;\n"
     "        EXCEPTION WHEN SQLSTATE 'DJA01' THEN\n"),
    ("        IF got AND rated THEN\n"
     "            held := held || rtags;  -- noted in djasync.slots by djasync_take_slot already\n"
     "        END IF;\n",
     ""),
    ("            -- A rate's token is timed, not given back: wait on its entry's next look (poll).\n"
     "        END;\n",
     "            -- A rate's token is timed, not given back: wait on its entry's next look (poll).\n"
     "            -- A slot taken by another worker since the look: wait on its entry, and wake\n"
     "            -- the workers at this COMMIT too (that worker may have committed before the mark).\n"
     "            IF s < 0 THEN\n"
     "                raced := true;\n"
     "                IF NOT cfg_keys[c] = ANY(waiting) THEN\n"
     "                    waiting := waiting || cfg_keys[c];\n"
     "                    PERFORM djasync_wait_on(cfg_keys[c]);\n"
     "                END IF;\n"
     "            END IF;\n"
     "        END;\n"),
    ("    IF gave <> '{}' THEN\n"
     "        IF channel IS NOT NULL THEN\n",
     "    IF raced THEN\n"
     "        gave := gave || '*'::text;  -- no key's entry: wake whoever waits\n"
     "    END IF;\n"
     "    IF gave <> '{}' THEN\n"
     "        IF channel IS NOT NULL THEN\n"),
]


def _edited(text: str, edits: list[tuple[str, str]] = EDITS) -> str:
    """``text`` with each edit made (each ``old`` must occur exactly once)."""
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


CLAIM_LIMITED = _edited(_0017.CLAIM_LIMITED)

WAKE_WAITERS = _0016.WAKE_WAITERS.replace(
    "        CONTINUE WHEN entry = '';\n",
    "        CONTINUE WHEN entry = '';\n"
    "        IF entry = '*' THEN  -- a row the claim's race left locked is free at this COMMIT\n"
    "            PERFORM pg_notify(channel, '*');\n"
    "            RETURN true;\n"
    "        END IF;\n")
assert WAKE_WAITERS != _0016.WAKE_WAITERS


class Migration(migrations.Migration):

    dependencies = [
        ("djasync", "0017_claim_limited_skips_walk_without_keys"),
    ]

    operations = [
        migrations.RunSQL(CLAIM_LIMITED + WAKE_WAITERS, _0017.CLAIM_LIMITED + _0016.WAKE_WAITERS),
    ]
