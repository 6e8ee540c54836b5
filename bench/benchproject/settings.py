"""Settings of the benchmark project: djasync plus one app holding the benchmark's job functions.

The database comes from ``BENCH_DATABASE_URL`` (bench/run.py sets it to the server it started),
falling back to ``DATABASE_URL``. Only what the queue needs is installed: no admin, no sessions.
"""

import os

from psycopg.conninfo import conninfo_to_dict

_url = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("DATABASE_URL")
if not _url:
    raise RuntimeError("BENCH_DATABASE_URL is not set: run the benchmark with bench/run.py")
_conninfo = conninfo_to_dict(_url)

SECRET_KEY = "djasync-bench-not-secret"
DEBUG = False  # DEBUG=True would keep every query in memory (and skew W5)
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["djasync", "benchapp"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _conninfo.get("dbname", "postgres"),
        "USER": _conninfo.get("user", ""),
        "PASSWORD": _conninfo.get("password", ""),
        "HOST": _conninfo.get("host", ""),
        "PORT": _conninfo.get("port", ""),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DJASYNC: dict = {}  # the defaults, as a user gets them
if os.environ.get("BENCH_LIMITS"):  # the flow-control rows (bench/run.py's ``flow``)
    import json

    DJASYNC["LIMITS"] = json.loads(os.environ["BENCH_LIMITS"])
