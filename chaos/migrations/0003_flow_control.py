"""Flow control (issue 16): where the flow jobs record their runs, and a log of every rate
token stamped.

``chaos_flowrun``: one row per run of a flow job, written on an autocommit connection of the
job's process (so a run killed mid-way is recorded too): its start, and ``seen``, moved every
25 ms while it runs (``finished`` once it completed). ``chaos_flowcommit``: written in an atomic
flow job's own transaction (it commits exactly when the run's claim does), with that
transaction's id. ``chaos_tokenlog``: a trigger copies every stamp of a rate token, with the
stamping transaction's id, in that transaction (so only stamps that committed are logged).
Plain SQL tables: only the checker reads them.
"""

from django.db import migrations

TABLES = """
CREATE TABLE chaos_flowrun (
    id bigserial PRIMARY KEY,
    job_key text NOT NULL,
    tenant text NOT NULL,
    rated boolean NOT NULL,
    queue text NOT NULL,
    kind text NOT NULL,
    pid integer NOT NULL,
    started timestamptz NOT NULL,
    seen timestamptz NOT NULL,
    finished timestamptz
);
CREATE TABLE chaos_flowcommit (
    run_id bigint PRIMARY KEY,
    xid bigint NOT NULL
);
CREATE TABLE chaos_tokenlog (
    id bigserial PRIMARY KEY,
    key text NOT NULL,
    slot integer NOT NULL,
    used_at timestamptz NOT NULL,
    xid bigint NOT NULL
);
CREATE FUNCTION chaos_log_token() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.used_at IS DISTINCT FROM OLD.used_at THEN
        INSERT INTO chaos_tokenlog (key, slot, used_at, xid)
        VALUES (NEW.key, NEW.slot, NEW.used_at, txid_current());
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER chaos_log_token AFTER UPDATE ON djasync_ratetoken
    FOR EACH ROW EXECUTE FUNCTION chaos_log_token();
"""

DROP = """
DROP TRIGGER chaos_log_token ON djasync_ratetoken;
DROP FUNCTION chaos_log_token();
DROP TABLE chaos_tokenlog;
DROP TABLE chaos_flowcommit;
DROP TABLE chaos_flowrun;
"""


class Migration(migrations.Migration):

    dependencies = [
        ("chaos", "0002_mixed_workload"),
        ("djasync", "0010_flow_control"),
    ]

    operations = [migrations.RunSQL(TABLES, DROP)]
