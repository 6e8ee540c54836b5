import importlib

from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations, models

# Jobs with flow-control keys (``limits`` NOT NULL) leave the claim indexes: the plain claim
# (and djasync_claim_queues) take only jobs without keys, and djasync_claim_limited walks
# djasync_job_claim_limited for the others. However many jobs wait on a full key, a claim of
# other work never reads past them. Built CONCURRENTLY, as 0008: scheduling must not wait.

_0009 = importlib.import_module("djasync.migrations.0009_claim_queues")
_FILTER = "AND j.run_after <= due AND j.queue = ANY(served)"
CLAIM_QUEUES = (
    _0009.CREATE.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")
    .replace("WHERE j.queue = q.name AND j.status = 'pending' AND j.run_after <= due",
             "WHERE j.queue = q.name AND j.status = 'pending' AND j.limits IS NULL\n"
             "                          AND j.run_after <= due")
    .replace(_FILTER, _FILTER + " AND j.limits IS NULL")
)
assert CLAIM_QUEUES.count("j.limits IS NULL") == 2
CLAIM_QUEUES_BEFORE = _0009.CREATE.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")


def _claim_index(name: str, fields: list[str], limited: bool) -> models.Index:
    condition = (models.Q(("limits__isnull", True), ("status", "pending")) if limited
                 else models.Q(("status", "pending")))
    return models.Index(condition=condition, fields=fields, name=name)


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ("djasync", "0010_flow_control"),
    ]

    operations = [
        RemoveIndexConcurrently(model_name="job", name="djasync_job_claim"),
        AddIndexConcurrently(
            model_name="job",
            index=_claim_index("djasync_job_claim", ["-priority", "run_after", "id"], True)),
        RemoveIndexConcurrently(model_name="job", name="djasync_job_claim_queue"),
        AddIndexConcurrently(
            model_name="job",
            index=_claim_index("djasync_job_claim_queue",
                               ["queue", "-priority", "run_after", "id"], True)),
        migrations.RunSQL(CLAIM_QUEUES, CLAIM_QUEUES_BEFORE),
    ]
