from django.apps import AppConfig


class DjasyncConfig(AppConfig):
    name = "djasync"
    verbose_name = "Job queue"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from djasync import checks  # noqa: F401  (registers the system checks)
