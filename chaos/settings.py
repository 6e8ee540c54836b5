"""Django settings of the chaos project: djasync plus the ``chaos`` app, nothing else.

The database comes from ``DATABASE_URL`` (``chaos/run.py`` sets it to its own server).
"""

import os

from psycopg.conninfo import conninfo_to_dict

DATABASE_URL = os.environ.get("DATABASE_URL")
if not DATABASE_URL:
    raise RuntimeError("DATABASE_URL is not set: run the harness with `python chaos/run.py`.")
_conninfo = conninfo_to_dict(DATABASE_URL)

SECRET_KEY = "djasync-chaos-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["djasync", "chaos"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _conninfo.get("dbname", "postgres"),
        "USER": _conninfo.get("user", ""),
        "PASSWORD": _conninfo.get("password", ""),
        "HOST": _conninfo.get("host", ""),
        "PORT": _conninfo.get("port", ""),
        # The harness's own sessions (producers, pruner) commit durably even while the chaos
        # runs the server with synchronous_commit = off: what they were told committed did.
        "OPTIONS": ({"options": "-c synchronous_commit=on"}
                    if os.environ.get("CHAOS_HARNESS") else {}),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

#: A job may run TIMEOUT seconds: its statements get that statement_timeout, its transaction
#: may sit idle TIMEOUT + 10 s (djasync's margin), and the supervisor kills it at TIMEOUT + 1 s.
#: Short, so that a SIGSTOPped child is noticed within the run. Retries come back quickly, so
#: the queue can drain within seconds of the last fault.
CHAOS_TIMEOUT = 4
#: Long jobs (meta atomic=False) run for up to LONG_JOB_SECONDS under leases this short: a few
#: renewals per run, and a lease that expires within the run when renewals stop.
LEASE_SECONDS = 2
#: Periodic jobs: every second, and every 10 s (longer than the pruning's retention, so a slot
#: record is pruned while its slot is still the latest one a starting daemon looks at).
PERIODIC = [
    {"cron": "* * * * * *", "function": "chaos.jobs.periodic", "name": "every-second",
     "args": ["every-second"], "priority": 10},
    {"cron": "*/10 * * * * *", "function": "chaos.jobs.periodic", "name": "every-10s",
     "args": ["every-10s"], "priority": 10},
]
#: Flow control (issue 16): the flow jobs hold one ``tenant:<n>`` key of concurrency 2, and
#: some the ``api`` key, 10 starts per second. The checker checks these figures
#: (chaos/checker.py FLOW_*). CHAOS_FLOW_CONCURRENCY in the workers' environment (the
#: harness's --flow-enforced-concurrency) enforces another figure: a run with it above 2
#: must fail the check (the check's own negative control).
FLOW_CONCURRENCY = int(os.environ.get("CHAOS_FLOW_CONCURRENCY", "2"))
FLOW_RATE = 10
LIMITS = {
    "tenant:*": {"concurrency": FLOW_CONCURRENCY},
    "api": {"rate": f"{FLOW_RATE}/s"},
}
DJASYNC = {
    "LIMITS": LIMITS,
    "TIMEOUT": CHAOS_TIMEOUT,
    "MAX_ATTEMPTS": 10,
    "BACKOFF": "chaos.jobs.short_backoff",
    "LEASE_SECONDS": LEASE_SECONDS,
    "PERIODIC": PERIODIC,
}
#: The daemon the harness runs through PgBouncer (``--pgbouncer``): its LISTEN goes straight
#: to PostgreSQL, as docs/howto/pgbouncer.md says to.
if os.environ.get("CHAOS_LISTEN_URL"):
    DJASYNC["LISTEN_URL"] = os.environ["CHAOS_LISTEN_URL"]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"djasync": {"handlers": ["console"], "level": "ERROR"}},
}
