from django.db import migrations

# Jobs cancelled before 0006 have no finished_at, so prune_jobs never deleted them and the
# dashboard left them out; give them the last moment known of them.
FILL = """
UPDATE djasync_job SET finished_at = coalesce(started_at, run_after, created_at)
 WHERE status = 'cancelled' AND finished_at IS NULL
"""


class Migration(migrations.Migration):

    dependencies = [
        ("djasync", "0005_partial_indexes"),
    ]

    operations = [migrations.RunSQL(FILL, migrations.RunSQL.noop)]
