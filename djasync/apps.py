from django.apps import AppConfig


class DjasyncConfig(AppConfig):
    name = "djasync"
    verbose_name = "Job queue"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        import importlib.util

        from djasync import checks  # noqa: F401  (registers the system checks)

        # Django registers the Tasks framework's checks (and so DjasyncBackend.check()) when
        # django.tasks is first imported; make sure `manage.py check` sees them.
        if importlib.util.find_spec("django.tasks") is not None:
            import django.tasks  # noqa: F401
