"""The server session each flow run ran in (``chaos_flowrun.backend``), and when the chaos
ended sessions (``chaos_sessionend``, filled by the harness from the server log at the end):
a run whose session was ended mid-way held its slot until then, not until its process's last
mark (its child runs on for the few ms its supervisor takes to notice and kill it)."""

from django.db import migrations

TABLES = """
ALTER TABLE chaos_flowrun ADD COLUMN backend integer;
CREATE TABLE chaos_sessionend (backend integer NOT NULL, at timestamptz NOT NULL);
"""
DROP = """
DROP TABLE chaos_sessionend;
ALTER TABLE chaos_flowrun DROP COLUMN backend;
"""


class Migration(migrations.Migration):

    dependencies = [("chaos", "0003_flow_control")]

    operations = [migrations.RunSQL(TABLES, DROP)]
