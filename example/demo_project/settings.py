"""Settings of the djasync example project: a shop whose receipts are written by jobs.

The database comes from ``DATABASE_URL`` (``make demo`` sets it, starting a throwaway
PostgreSQL when you have none).
"""

import os

from psycopg.conninfo import conninfo_to_dict

DATABASE_URL = os.environ.get("DATABASE_URL")
if not DATABASE_URL:
    raise RuntimeError(
        "DATABASE_URL is not set. Run the example with `make demo` (it starts a throwaway "
        "PostgreSQL), or set DATABASE_URL=postgresql://user@host:5432/dbname."
    )
_conninfo = conninfo_to_dict(DATABASE_URL)
_named = {"dbname": "NAME", "user": "USER", "password": "PASSWORD", "host": "HOST", "port": "PORT"}

SECRET_KEY = "djasync-example-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",  # only so that `runserver` serves the admin's CSS
    "djasync",
    "shop",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
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
ROOT_URLCONF = "demo_project.urls"
STATIC_URL = "static/"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        **{_named[key]: value for key, value in _conninfo.items() if key in _named},
        # Anything else in the URL (sslmode, connect_timeout, ...) goes to psycopg as is.
        "OPTIONS": {key: value for key, value in _conninfo.items() if key not in _named},
        # A view and the jobs it schedules commit (or roll back) together.
        "ATOMIC_REQUESTS": True,
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DJASYNC = {
    # The default backoff waits 60·n^1.6 seconds before retry n (1 min, 3 min, 5.8 min, ...).
    # The demo wants its retries to happen while you watch, so here a failed job is due again
    # at once. Do not copy this into a real project: a failing job would retry in a tight loop.
    "BACKOFF": "shop.jobs.demo_backoff",
    "MAX_ATTEMPTS": 5,
    "TIMEOUT": 30,
}
