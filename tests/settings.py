"""Settings for djasync's own test suite: a real PostgreSQL named by ``DATABASE_URL``."""

import os

from psycopg.conninfo import conninfo_to_dict

DATABASE_URL = os.environ.get("DATABASE_URL")
if not DATABASE_URL:
    raise RuntimeError(
        "DATABASE_URL is not set. Run the tests with `make test` (it starts a throwaway "
        "PostgreSQL), or set DATABASE_URL=postgresql://user@host:5432/dbname."
    )
_conninfo = conninfo_to_dict(DATABASE_URL)

SECRET_KEY = "djasync-tests-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    # Serves the admin's CSS (and the dashboard's) in the browser test's live server.
    "django.contrib.staticfiles",
    "djasync",
    "tests",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
ROOT_URLCONF = "tests.urls"
STATIC_URL = "static/"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _conninfo.get("dbname", "postgres"),
        "USER": _conninfo.get("user", ""),
        "PASSWORD": _conninfo.get("password", ""),
        "HOST": _conninfo.get("host", ""),
        "PORT": _conninfo.get("port", ""),
        # Daemon tests run the worker against the test database; it must see the tables.
        "TEST": {"NAME": os.environ.get("DJASYNC_TEST_DB_NAME") or None},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DJASYNC = {
    # Retries in tests come back quickly; tests that need the real backoff set their own.
    "BACKOFF": "tests.jobs.no_backoff",
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"djasync": {"handlers": ["console"], "level": "WARNING"}},
}

# Django's Tasks framework (django.tasks, or the django-tasks backport on Django 5.2).
TASKS = {
    "default": {
        "BACKEND": "djasync.backends.DjasyncBackend",
        "QUEUES": ["default", "emails"],
        "OPTIONS": {"MAX_ATTEMPTS": 3},
    },
    "other": {"BACKEND": "djasync.backends.DjasyncBackend", "QUEUES": []},
}
