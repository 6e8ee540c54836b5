"""The mixed workload: a run's start in the ledger, and triggers that archive what pruning
deletes and log every periodic slot inserted.

The archive keeps rows as jsonb (``to_jsonb(OLD)``), so columns djasync adds later archive
too; the checker reads them back with ``jsonb_populate_record``.
"""

from django.db import migrations, models

TRIGGERS = """
CREATE FUNCTION chaos_archive_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_pruned (source, row_id, row, group_pending, pruned_at)
    VALUES ('job', OLD.id, to_jsonb(OLD),
            CASE WHEN OLD.group_id IS NULL THEN 0 ELSE (
                SELECT count(*) FROM djasync_job o
                 WHERE o.group_id = OLD.group_id AND o.id <> OLD.id AND o.status = 'pending')
            END,
            clock_timestamp());
    RETURN OLD;
END
$$;
CREATE TRIGGER chaos_archive_job BEFORE DELETE ON djasync_job
    FOR EACH ROW EXECUTE FUNCTION chaos_archive_job();

CREATE FUNCTION chaos_archive_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_pruned (source, row_id, row, group_pending, pruned_at)
    VALUES ('attempt', OLD.id, to_jsonb(OLD), 0, clock_timestamp());
    RETURN OLD;
END
$$;
CREATE TRIGGER chaos_archive_attempt BEFORE DELETE ON djasync_attempt
    FOR EACH ROW EXECUTE FUNCTION chaos_archive_attempt();

CREATE FUNCTION chaos_log_slot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_slotlog (name, slot, logged_at) VALUES (NEW.name, NEW.slot, clock_timestamp());
    RETURN NEW;
END
$$;
CREATE TRIGGER chaos_log_slot AFTER INSERT ON djasync_periodicslot
    FOR EACH ROW EXECUTE FUNCTION chaos_log_slot();
"""

DROP = """
DROP TRIGGER chaos_log_slot ON djasync_periodicslot;
DROP FUNCTION chaos_log_slot();
DROP TRIGGER chaos_archive_attempt ON djasync_attempt;
DROP FUNCTION chaos_archive_attempt();
DROP TRIGGER chaos_archive_job ON djasync_job;
DROP FUNCTION chaos_archive_job();
"""


class Migration(migrations.Migration):

    dependencies = [
        ("chaos", "0001_initial"),
        ("djasync", "0007_group_final_ready"),
    ]

    operations = [
        migrations.AddField(
            model_name="ledgerentry",
            name="run_started",
            field=models.DateTimeField(null=True),
        ),
        migrations.CreateModel(
            name="Pruned",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                           verbose_name="ID")),
                ("source", models.CharField(max_length=16)),
                ("row_id", models.BigIntegerField()),
                ("row", models.JSONField()),
                ("group_pending", models.IntegerField(default=0)),
                ("pruned_at", models.DateTimeField()),
            ],
        ),
        migrations.CreateModel(
            name="SlotLog",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                           verbose_name="ID")),
                ("name", models.CharField(max_length=200)),
                ("slot", models.DateTimeField()),
                ("logged_at", models.DateTimeField()),
            ],
        ),
        migrations.RunSQL(TRIGGERS, DROP),
    ]
