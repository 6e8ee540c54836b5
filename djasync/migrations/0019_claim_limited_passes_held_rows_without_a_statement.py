import importlib

from django.db import migrations

# djasync_claim_limited: cheaper per job where several workers claim jobs with keys at once
# (issue 16's bench: a key with concurrency 8, --concurrency 4). perf of the server during that
# drain: the function was a third of PostgreSQL's CPU, and nearly half of the time of its
# statements went to starting their executors (each statement of a PL/pgSQL function sets up
# its plan's nodes and expressions again at each execution), not to running them.
#
# - A row another claim holds (the job another worker runs: its row stays locked while it
#   runs, and such rows come first in claim order) cost a statement each: the row lock that
#   SKIP LOCKED then passes over. At --concurrency c the walk tried ~c - 1 of them per claim.
#   Now a claim that locks a job with keys also takes a mark, an advisory lock of its own on
#   the job's id (transaction-level: it ends with the row lock), and the walk looks at the mark
#   before it locks a row (a lock taken and given back at once, as for a slot): a marked row
#   is passed over without a statement. The look at the job's keys comes first, as before: a
#   full key marks this session waiting on it even when the row is held, since its holder may
#   give it back unrun (a rollback, a crash) and then wakes whoever waits on its keys. A row
#   locked without a mark (an application's lock, a claim between its row lock and its mark)
#   is tried as before, SKIP LOCKED. A mark is never wrong the
#   other way: it is taken only while its claim holds the row, and it ends with it (or with
#   the subtransaction that tried a job of several keys or a rate). The mark's two keys are
#   the id's high and low bits, the high ones mixed with hashtext('djasync.job') (a slot's
#   first key is hashtext('djasync.limit:' || key), its second a slot number).
# - The best jobs without keys, read once per claim with jobs with keys due, are gathered
#   without per-aggregate ORDER BY (three sorts set up per claim): the subquery's rows come in
#   claim order (its ORDER BY ... LIMIT), and a plain aggregate keeps the order it reads them in.
#
# Nothing else changes (0018's text, edited below).
_0018 = importlib.import_module("djasync.migrations.0018_claim_limited_race_strands_nothing")

_MARK = ("hashtext('djasync.job') # (cand.id >> 31)::integer, "
         "(cand.id & 2147483647)::integer")

EDITS = [
    ("            SELECT array_agg(t.priority ORDER BY t.priority DESC, t.run_after, t.id),\n"
     "                   array_agg(t.run_after ORDER BY t.priority DESC, t.run_after, t.id),\n"
     "                   array_agg(t.id ORDER BY t.priority DESC, t.run_after, t.id)\n",
     "            SELECT array_agg(t.priority), array_agg(t.run_after), array_agg(t.id)\n"),
    # After the look at its keys (see above).
    ("        got := false;\n"
     "        s := 0;\n",
     "        -- A row another claim holds, marked: passed over without a statement (0019).\n"
     f"        CONTINUE WHEN NOT pg_try_advisory_lock({_MARK});\n"
     f"        ignored := pg_advisory_unlock({_MARK});\n"
     "        got := false;\n"
     "        s := 0;\n"),
    ("               FOR NO KEY UPDATE OF j SKIP LOCKED;\n"
     "            CONTINUE WHEN NOT FOUND;\n",
     "               FOR NO KEY UPDATE OF j SKIP LOCKED;\n"
     "            CONTINUE WHEN NOT FOUND;\n"
     f"            ignored := pg_try_advisory_xact_lock({_MARK});  -- the row's mark (0019)\n"),
    ("            rtags := '';\n"
     "            IF FOUND THEN\n",
     "            rtags := '';\n"
     "            IF FOUND THEN\n"
     f"                ignored := pg_try_advisory_xact_lock({_MARK});  -- the row's mark\n"),
]


CLAIM_LIMITED = _0018._edited(_0018.CLAIM_LIMITED, EDITS)


class Migration(migrations.Migration):

    dependencies = [
        ("djasync", "0018_claim_limited_race_strands_nothing"),
    ]

    operations = [
        migrations.RunSQL(CLAIM_LIMITED, _0018.CLAIM_LIMITED),
    ]
