"""django-tasks-db: Django's task framework with the database backend and its db_worker."""

import os

from psycopg.conninfo import conninfo_to_dict

_c = conninfo_to_dict(os.environ["PEER_DSN"])
SECRET_KEY = "bench"
USE_TZ = True
DEBUG = False
INSTALLED_APPS = ["django_tasks_db", "djt_app"]
DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": _c["dbname"],
                         "USER": _c.get("user", ""), "HOST": _c.get("host", ""),
                         "PORT": _c.get("port", "")}}
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
