from django.db import migrations

# The claim's test "a group's final job waits until no other job of its group is pending",
# as a function. Written inline, the test was a subquery that PostgreSQL sets up (two index
# scans and a join) for every claim, although it runs only for jobs in a group: about 6% of
# the worker's throughput with no-op jobs (issue 5). A function call costs nothing until
# called. STABLE: it reads with the claim's own snapshot, as the subquery did.
CREATE = """
CREATE FUNCTION djasync_group_final_ready(job_id bigint) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN NOT EXISTS (
        SELECT 1 FROM djasync_group g JOIN djasync_job o ON o.group_id = g.id
         WHERE g.final_id = job_id AND o.id <> job_id AND o.status = 'pending');
END
$$
"""

DROP = "DROP FUNCTION djasync_group_final_ready(bigint)"


class Migration(migrations.Migration):

    dependencies = [
        ("djasync", "0006_cancelled_finished_at"),
    ]

    operations = [migrations.RunSQL(CREATE, DROP)]
