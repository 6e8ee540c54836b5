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
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

#: A job may run TIMEOUT seconds: its statements get that statement_timeout, its transaction
#: may sit idle TIMEOUT + 10 s (djasync's margin), and the supervisor kills it at TIMEOUT + 1 s.
#: Short, so that a SIGSTOPped child is noticed within the run. Retries come back quickly, so
#: the queue can drain within seconds of the last fault.
CHAOS_TIMEOUT = 4
DJASYNC = {
    "TIMEOUT": CHAOS_TIMEOUT,
    "MAX_ATTEMPTS": 10,
    "BACKOFF": "chaos.jobs.short_backoff",
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"djasync": {"handlers": ["console"], "level": "ERROR"}},
}
