from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models

# The claim of a worker serving one queue walks this index (see djasync.sql.claim). Built
# CONCURRENTLY: a queue table may hold a large backlog, and scheduling must not wait on it.


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ("djasync", "0007_group_final_ready"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="job",
            index=models.Index(
                condition=models.Q(("status", "pending")),
                fields=["queue", "-priority", "run_after", "id"],
                name="djasync_job_claim_queue",
            ),
        ),
    ]
