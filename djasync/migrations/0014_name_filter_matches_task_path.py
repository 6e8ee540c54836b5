import importlib

from django.db import migrations

# ``flush_queue -f PREFIX`` (the claim's name_prefix) matched the stored function name only, and
# every Task job stores the same one (djasync.backends.run_task), its Task's path being its first
# argument: Task jobs could not be picked by their Task's path, which queue_health, the
# dashboard and the admin show them by. The prefix now matches either. The claim functions of
# 0011 (djasync_claim_queues) and 0013 (djasync_claim_limited) get the same predicate as
# djasync.sql.claim.

_0011 = importlib.import_module("djasync.migrations.0011_claim_without_limited")
_0013 = importlib.import_module("djasync.migrations.0013_claim_limited_skips_running")

_OLD = "(name_prefix IS NULL OR starts_with(j.name, name_prefix))"
_NEW = ("(name_prefix IS NULL OR starts_with(j.name, name_prefix)\n"
        "                    OR (j.name = 'djasync.backends.run_task'\n"
        "                        AND starts_with(j.args ->> 0, name_prefix)))")

CLAIM_QUEUES = _0011.CLAIM_QUEUES.replace(_OLD, _NEW)
CLAIM_LIMITED = _0013.AFTER.replace(_OLD, _NEW)
assert _0011.CLAIM_QUEUES.count(_OLD) == 2 and _0013.AFTER.count(_OLD) == 6


class Migration(migrations.Migration):

    dependencies = [
        ("djasync", "0013_claim_limited_skips_running"),
    ]

    operations = [
        migrations.RunSQL(CLAIM_QUEUES, _0011.CLAIM_QUEUES),
        migrations.RunSQL(CLAIM_LIMITED, _0013.AFTER),
    ]
