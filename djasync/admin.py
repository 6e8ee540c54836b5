"""Read-only admin for jobs and groups, with "retry now" and "cancel" actions; paused queues.

Nobody types a function name or arguments into a form: jobs are created by code only.
The two actions need the change permission on jobs. The queue dashboard
(``admin/djasync/job/dashboard/``) needs the view permission on jobs.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils.html import format_html

from djasync import charts, dashboard, limits, scheduling
from djasync.models import Attempt, Group, Job, PausedQueue, shown_name, task_path
from djasync.registry import TASK_RUNNER


class ReadOnlyMixin:
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The change permission is what the list's actions ("retry now", "cancel") check. A
        # single object's form is never editable: a Save would write back every column as it
        # was read, and could undo what a worker committed meanwhile.
        if obj is not None:
            return False
        return super().has_change_permission(request, obj)  # type: ignore[misc]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AttemptInline(admin.TabularInline):
    model = Attempt
    extra = 0
    max_num = 0
    can_delete = False
    fields = ("number", "outcome", "started_at", "finished_at", "worker", "exception_type",
              "exception_message", "traceback_text")
    readonly_fields = fields
    ordering = ["number", "id"]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="traceback")
    def traceback_text(self, obj: Attempt) -> str:
        # As written, in the admin's monospace <pre>: the default rendering of a TextField
        # (a <p> with <br> per line, in the text font) loses the indentation that makes a
        # traceback readable.
        return format_html("<pre>{}</pre>", obj.traceback) if obj.traceback else ""


class FunctionFilter(admin.SimpleListFilter):
    """Filter by function, a Task job by its Task's path (``?name=tests.tasks.add``)."""

    title = "function"
    parameter_name = "name"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        rows = (Job.objects.annotate(task=task_path()).values_list("name", "task")
                .order_by().distinct())  # no ordering: it would join the DISTINCT
        return [(name, name) for name in sorted({shown_name(n, t) for n, t in rows})]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Job]) -> QuerySet[Job]:
        value = self.value()
        if value is None:
            return queryset
        return queryset.filter(Q(name=value) | Q(name=TASK_RUNNER, args__0=value))


@admin.register(Job)
class JobAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ["id", "function", "queue", "priority", "status", "attempts", "run_after",
                    "finished_at", "group"]
    list_filter = ["status", "queue", FunctionFilter]
    search_fields = ["name", "=id", "=identity"]
    date_hierarchy = "created_at"
    inlines = [AttemptInline]
    actions = ["retry_now", "cancel"]
    list_select_related = ["group"]
    show_full_result_count = False  # count(*) on a big jobs table is slow

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in Job._meta.fields]

    def get_urls(self) -> list[URLPattern]:
        # Before the model's own URLs: "<path:object_id>/" would take "dashboard/" otherwise.
        view = self.admin_site.admin_view(self.dashboard_view)
        return [path("dashboard/", view, name="djasync_job_dashboard"), *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> TemplateResponse:
        """The last hour of the queue: depth, attempts, pickup latency, names, workers."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {**self.admin_site.each_context(request), "opts": self.opts,
                   "title": "Queue dashboard", **charts.context(dashboard.collect())}
        return TemplateResponse(request, "admin/djasync/dashboard.html", context)

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Job],
                           search_term: str) -> tuple[QuerySet[Job], bool]:
        """Search the Task path of Task jobs too, as the function column shows it."""
        results, may_have_duplicates = super().get_search_results(request, queryset,
                                                                  search_term)
        term = search_term.strip()
        if term:
            results = results | queryset.filter(name=TASK_RUNNER, args__0__icontains=term)
        return results, may_have_duplicates

    @admin.display(description="function", ordering="name")
    def function(self, obj: Job) -> str:
        # A Task job's function is djasync.backends.run_task: show the Task it runs instead.
        return obj.display_name

    @admin.action(description="Retry the selected jobs now", permissions=["change"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        count = scheduling.retry_now(queryset.values_list("id", flat=True))
        self.message_user(request, f"{count} job(s) queued to run now.", messages.SUCCESS)

    @admin.action(description="Cancel the selected pending jobs", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        count = scheduling.cancel(queryset.values_list("id", flat=True))
        self.message_user(request, f"{count} job(s) cancelled.", messages.SUCCESS)


@admin.register(Group)
class GroupAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ["id", "reference", "created_at", "final", "progress_display"]
    search_fields = ["reference"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in Group._meta.fields] + ["progress_display"]

    @admin.display(description="progress")
    def progress_display(self, obj: Group) -> str:
        progress = obj.progress()
        finished = progress["total"] - progress["pending"]
        return (f"{finished}/{progress['total']} finished "
                f"({progress['succeeded']} ok, {progress['failed']} failed, "
                f"{progress['cancelled']} cancelled)")


@admin.register(PausedQueue)
class PausedQueueAdmin(admin.ModelAdmin):
    """Paused queues: add one to pause it, delete it to resume (``djasync.pause_queue``)."""

    list_display = ["queue", "paused_at"]
    fields = ["queue"]
    actions = ["resume"]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # nothing to edit: a queue is paused or not

    def save_model(self, request: HttpRequest, obj: PausedQueue, form: Any, change: bool) -> None:
        limits.pause_queue(obj.queue)

    def delete_model(self, request: HttpRequest, obj: PausedQueue) -> None:
        limits.resume_queue(obj.queue)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[PausedQueue]) -> None:
        for queue in queryset.values_list("queue", flat=True):
            limits.resume_queue(queue)

    @admin.action(description="Resume the selected queues", permissions=["delete"])
    def resume(self, request: HttpRequest, queryset: QuerySet[PausedQueue]) -> None:
        self.delete_queryset(request, queryset)
        self.message_user(request, "Queue(s) resumed.", messages.SUCCESS)
