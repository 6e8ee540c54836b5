"""Django settings for building the docs: enough for autodoc to import djasync's modules.

Nothing connects to this database; it is never used.
"""

SECRET_KEY = "djasync-docs-build-not-secret"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "djasync",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "djasync_docs"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
