import importlib
import re

from django.db import migrations

# djasync_claim_limited (0010) stopped its walk of the jobs with keys at the n-th best job
# without keys, running or not: while a better-ranked job without keys ran elsewhere (an atomic
# job holds its row lock for its whole run), a job with keys ranked after it was not claimed,
# even by a claim that found nothing else to do: a worker sat idle next to a runnable job for
# as long as the other job ran. And it compared every job with keys with the n-th job without
# keys however many it had taken already, so a batch took jobs with keys that ranked after
# jobs without keys it left behind.
#
# Now the walk stops at the (n - taken)-th best job without keys, and when it would stop, it
# first makes sure of that job: a probe in a subtransaction locks the n best jobs without keys
# that no one else holds (SKIP LOCKED), notes them, and rolls back (giving the row locks
# back). The walk stops only if the candidate ranks after the (n - taken)-th of those. The
# probe runs at most once per claim, and only when a job with keys ranks after a job without
# keys; a claim with no job with keys waiting pays nothing.

_0010 = importlib.import_module("djasync.migrations.0010_flow_control")
BEFORE = _0010.FLOW_CONTROL[_0010.FLOW_CONTROL.index("CREATE FUNCTION djasync_claim_limited("):]
BEFORE = BEFORE[:BEFORE.index("\n$$;\n") + len("\n$$;\n")].replace(
    "CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")

_B_SELECT = re.compile(
    r"        SELECT j\.priority, j\.run_after, j\.id INTO b_priority, b_run_after, b_id\n"
    r"          FROM djasync_job j\n(?P<where>(?:         (?:WHERE|  AND) .*\n)+)"
    r"         ORDER BY j\.priority DESC, j\.run_after, j\.id\n"
    r"         LIMIT 1 OFFSET n - 1;\n")
_match = _B_SELECT.search(BEFORE)
assert _match is not None
_WHERE = _match["where"]

_STOP = """\
        EXIT WHEN b_id IS NOT NULL AND (cand.priority < b_priority
            OR (cand.priority = b_priority
                AND (cand.run_after, cand.id) > (b_run_after, b_id)));
"""
assert BEFORE.count(_STOP) == 1

_RANKS_AFTER_B = """b_at <= coalesce(cardinality(b_ids), 0) AND (cand.priority < b_pri[b_at]
               OR (cand.priority = b_pri[b_at]
                   AND (cand.run_after, cand.id) > (b_ra[b_at], b_ids[b_at])))"""

_NEW_STOP = f"""\
        -- Stop at a job ranking after the (n - taken)-th best job without keys: the plain
        -- part below takes that one and those before it.
        b_at := n - taken;
        IF {_RANKS_AFTER_B} THEN
            EXIT WHEN b_exact;
            -- Some of those may be running elsewhere (an atomic job's row stays locked while
            -- it runs): the plain part skips them, and this job must not wait for them. Find
            -- the n best that this claim can lock, and give the locks back at once.
            b_exact := true;
            b_pri := '{{}}';
            b_ra := '{{}}';
            b_ids := '{{}}';
            BEGIN
                FOR u IN
                    SELECT j.priority, j.run_after, j.id FROM djasync_job j
{_WHERE.replace("         ", "                     ")}\
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
            EXIT WHEN {_RANKS_AFTER_B};
        END IF;
"""

_DECLARE = "    b_priority smallint;\n    b_run_after timestamptz;\n    b_id bigint;\n"
_NEW_DECLARE = """\
    -- The n best jobs without keys (priority, run_after, id), in claim order.
    b_pri smallint[];
    b_ra timestamptz[];
    b_ids bigint[];
    -- Whether those are the ones no one else holds (the probe ran).
    b_exact boolean := false;
    b_at integer;
    u record;
"""
assert BEFORE.count(_DECLARE) == 1

_COMMENT = """\
        -- The n-th best job without keys: jobs with keys that rank after it wait for the next
        -- claim (it may be running elsewhere right now: then they wait one claim more).
"""
_NEW_COMMENT = """\
        -- The n best jobs without keys, running or not (a probe below sorts that out only if
        -- it matters).
"""
assert BEFORE.count(_COMMENT) == 1

AFTER = (
    _B_SELECT.sub(lambda m: (
        "        SELECT array_agg(t.priority ORDER BY t.priority DESC, t.run_after, t.id),\n"
        "               array_agg(t.run_after ORDER BY t.priority DESC, t.run_after, t.id),\n"
        "               array_agg(t.id ORDER BY t.priority DESC, t.run_after, t.id)\n"
        "          INTO b_pri, b_ra, b_ids\n"
        "          FROM (SELECT j.priority, j.run_after, j.id FROM djasync_job j\n"
        + m["where"].replace("         ", "                 ")
        + "                 ORDER BY j.priority DESC, j.run_after, j.id\n"
        "                 LIMIT n) t;\n"), BEFORE)
    .replace(_STOP, _NEW_STOP)
    .replace(_DECLARE, _NEW_DECLARE)
    .replace(_COMMENT, _NEW_COMMENT)
)
assert "OFFSET n - 1" not in AFTER and "b_exact" in AFTER and "b_id bigint" not in AFTER


class Migration(migrations.Migration):

    dependencies = [
        ("djasync", "0012_job_arguments_may_be_empty"),
    ]

    operations = [
        migrations.RunSQL(AFTER, BEFORE),
    ]
