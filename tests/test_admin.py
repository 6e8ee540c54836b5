"""The admin: jobs and groups are read-only; "retry now" and "cancel" need the change right."""

import datetime
import threading
from html.parser import HTMLParser

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.utils import timezone
from django.utils.html import escape

import djasync
from djasync import executor
from djasync.models import Job, Outcome, Status
from tests import jobs
from tests.daemon import wait_for
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)

JOBS_URL = "/admin/djasync/job/"
GROUPS_URL = "/admin/djasync/group/"

#: a job's change page (``{{ original }}``) runs the job in the web process.
JOB_CALLED_BY_TEMPLATES = (
    "djasync/models.py Job.__call__ without do_not_call_in_templates: rendering the change page "
    "runs the job (or raises DjasyncError for a finished one)"
)

SAVE_REWRITES_THE_ROW = (
    "djasync/admin.py JobAdmin: a change-permission user gets Save buttons and save_model() "
    "writes every column as read at request time, so a Save racing a worker's commit puts a "
    "succeeded job back to pending (attempts 0, result NULL) and it runs again"
)

EMPTY_INLINE = {"attempt_set-TOTAL_FORMS": "0", "attempt_set-INITIAL_FORMS": "0",
                "attempt_set-MIN_NUM_FORMS": "0", "attempt_set-MAX_NUM_FORMS": "0"}


def staff_client(*codenames: str) -> Client:
    """Log in a staff user (not a superuser) who holds exactly these djasync permissions."""
    user = User.objects.create_user(f"staff-{'-'.join(codenames) or 'none'}", is_staff=True)
    permissions = Permission.objects.filter(content_type__app_label="djasync",
                                            codename__in=codenames)
    assert sorted(p.codename for p in permissions) == sorted(codenames)
    user.user_permissions.set(permissions)
    client = Client()
    client.force_login(user)
    return client


def superuser_client() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "x"))
    return client


def listed_ids(response) -> list[int]:
    assert response.status_code == 200
    return sorted(job.pk for job in response.context["cl"].result_list)


def run_action(client: Client, action: str, *jobs_: Job):
    return client.post(JOBS_URL, {"action": action, "index": "0", "select_across": "0",
                                  "_selected_action": [str(job.pk) for job in jobs_]},
                       follow=True)


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def failed_job(function=jobs.always_raise, args=None) -> Job:
    job = djasync.schedule(function, args=args, meta={"max_attempts": 1})
    [finished] = executor.run_batch()
    assert (finished.job_id, finished.status) == (job.pk, Status.FAILED)
    job.refresh_from_db()
    return job


class FormControls(HTMLParser):
    """Collect the names of the inputs, textareas and selects inside one form."""

    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id = form_id
        self.inside = False
        self.controls: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.inside = attributes.get("id") == self.form_id
        elif self.inside and tag in ("input", "textarea", "select") and attributes.get("name"):
            self.controls[attributes["name"] or ""] = attributes.get("type") or tag

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False


def form_controls(html: str, form_id: str) -> dict[str, str]:
    parser = FormControls(form_id)
    parser.feed(html)
    return parser.controls


def test_the_job_list_offers_status_queue_and_name_filters_that_filter():
    client = superuser_client()
    failed = failed_job()
    mail = djasync.schedule(jobs.add, args=[1, 2], queue="mail")
    default = djasync.schedule(jobs.echo, args=["x"])
    response = client.get(JOBS_URL)
    assert listed_ids(response) == sorted([failed.pk, mail.pk, default.pk])
    assert [spec.title for spec in response.context["cl"].filter_specs] == [
        "status", "queue", "function"]
    html = response.content.decode()
    for title in ("status", "queue", "function"):
        assert f'data-filter-title="{title}"' in html
    assert '?queue=mail"' in html and '?name=tests.jobs.echo"' in html
    assert listed_ids(client.get(JOBS_URL, {"status": "failed"})) == [failed.pk]
    assert listed_ids(client.get(JOBS_URL, {"status": "pending"})) == sorted([mail.pk, default.pk])
    assert listed_ids(client.get(JOBS_URL, {"queue": "mail"})) == [mail.pk]
    assert listed_ids(client.get(JOBS_URL, {"name": "tests.jobs.echo"})) == [default.pk]


def test_the_job_list_searches_by_function_name_identity_and_id():
    client = superuser_client()
    add = djasync.schedule(jobs.add, args=[1, 2])
    echo = djasync.schedule(jobs.echo, args=["x"])
    response = client.get(JOBS_URL)
    assert 'name="q"' in response.content.decode()
    assert listed_ids(client.get(JOBS_URL, {"q": "jobs.ech"})) == [echo.pk]
    assert listed_ids(client.get(JOBS_URL, {"q": add.identity})) == [add.pk]
    assert add.pk in listed_ids(client.get(JOBS_URL, {"q": str(add.pk)}))
    assert listed_ids(client.get(JOBS_URL, {"q": "no-such-function"})) == []



def test_the_function_filter_and_the_search_know_a_task_job_by_its_tasks_path():
    from tests import tasks

    client = superuser_client()
    task_job = Job.objects.get(pk=int(tasks.add.enqueue(1, 2).id))
    mail = Job.objects.get(pk=int(tasks.send_mail.enqueue("a@example.com").id))
    plain = djasync.schedule(jobs.add, args=[1, 2])
    html = client.get(JOBS_URL).content.decode()
    assert '?name=tests.tasks.add"' in html and '?name=tests.tasks.send_mail"' in html
    assert "?name=djasync.backends.run_task" not in html
    assert listed_ids(client.get(JOBS_URL, {"name": "tests.tasks.add"})) == [task_job.pk]
    assert listed_ids(client.get(JOBS_URL, {"name": "tests.jobs.add"})) == [plain.pk]
    assert listed_ids(client.get(JOBS_URL, {"q": "tasks.send_m"})) == [mail.pk]
    assert listed_ids(client.get(JOBS_URL, {"q": "add"})) == sorted([task_job.pk, plain.pk])


def test_viewing_a_pending_job_in_the_admin_does_not_run_it():
    client = superuser_client()
    job = djasync.schedule(jobs.write_ledger, args=["viewed"])
    response = client.get(f"{JOBS_URL}{job.pk}/change/")
    assert response.status_code == 200
    job.refresh_from_db()
    assert (job.status, job.attempts) == (Status.PENDING, 0)
    assert not Ledger.objects.exists() and not job.attempt_set.exists()



def test_the_change_page_shows_the_attempts_inline_with_their_traceback():
    client = superuser_client()
    job = failed_job()
    attempt = job.attempt_set.get()
    response = client.get(f"{JOBS_URL}{job.pk}/change/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'class="field-traceback_text"' in html and 'class="field-exception_message"' in html
    assert "Traceback (most recent call last):" in html
    assert escape('raise ValueError("this job always fails")') in html
    assert escape(attempt.exception_type) in html and attempt.outcome == Outcome.ERROR


def test_the_change_page_shows_a_traceback_in_pre_with_its_lines_and_no_br():
    client = superuser_client()
    job = failed_job()
    html = client.get(f"{JOBS_URL}{job.pk}/change/").content.decode()
    traceback = job.attempt_set.get().traceback
    assert f"<pre>{escape(traceback)}</pre>" in html
    assert "Traceback (most recent call last):<br>" not in html



def test_every_field_of_the_change_page_is_read_only_even_with_the_change_permission():
    client = staff_client("view_job", "change_job")
    job = failed_job()
    response = client.get(f"{JOBS_URL}{job.pk}/change/")
    assert response.status_code == 200
    controls = form_controls(response.content.decode(), "job_form")
    assert controls, "the job form was not found"
    editable = {name: kind for name, kind in controls.items()
                if kind != "hidden" and kind != "submit" and not name.startswith("attempt_set-")}
    assert editable == {}
    for field in ("name", "args", "kwargs", "meta", "queue", "priority", "status"):
        assert field not in controls


def test_posting_a_function_name_and_arguments_to_the_change_page_changes_nothing():
    job = djasync.schedule(jobs.add, args=[1, 2])
    tampered = {"name": "os.system", "args": '["rm -rf /"]', "queue": "other", "priority": "5",
                "status": "succeeded", "_save": "Save", **EMPTY_INLINE}
    viewer = staff_client("view_job")
    assert viewer.post(f"{JOBS_URL}{job.pk}/change/", tampered).status_code == 403
    response = superuser_client().post(f"{JOBS_URL}{job.pk}/change/", tampered)
    assert response.status_code in (302, 403), response.status_code  # saved as is, or refused
    saved = Job.objects.get(pk=job.pk)
    assert (saved.name, saved.args, saved.queue, saved.priority, saved.status) == (
        "tests.jobs.add", [1, 2], "default", 0, Status.PENDING)



def test_saving_the_change_page_while_a_worker_finishes_the_job_does_not_undo_its_success(
        other_connection):
    client = superuser_client()
    job = djasync.schedule(jobs.add, args=[1, 2])
    responses, errors = [], []

    def save_in_the_admin() -> None:
        try:
            responses.append(client.post(f"{JOBS_URL}{job.pk}/change/",
                                         {"_save": "Save", **EMPTY_INLINE}))
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            connection.close()

    def admin_waits_on_our_lock() -> bool:
        return bool(other_connection.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted "
            "AND pg_backend_pid() = ANY(pg_blocking_pids(pid))").fetchone()[0])

    saver = threading.Thread(target=save_in_the_admin)
    with other_connection.transaction():  # a worker running the job, about to commit
        other_connection.execute(
            "SELECT id FROM djasync_job WHERE id = %s FOR NO KEY UPDATE", [job.pk])
        other_connection.execute(
            "UPDATE djasync_job SET status = 'succeeded', attempts = 1, result = '3' "
            "WHERE id = %s", [job.pk])
        saver.start()
        wait_for(lambda: not saver.is_alive() or admin_waits_on_our_lock(),
                 what="the admin's save to finish or to wait on the job's lock")
    saver.join(20)
    assert not saver.is_alive() and not errors, errors
    saved = Job.objects.get(pk=job.pk)
    assert (saved.status, saved.attempts, saved.result) == (Status.SUCCEEDED, 1, 3)


def test_there_is_no_add_and_no_delete_for_jobs_or_groups():
    client = superuser_client()
    job = djasync.schedule(jobs.add, args=[1, 2], group="g")
    assert client.get(f"{JOBS_URL}add/").status_code == 403
    assert client.get(f"{GROUPS_URL}add/").status_code == 403
    assert client.get(f"{JOBS_URL}{job.pk}/delete/").status_code == 403
    assert client.post(f"{JOBS_URL}{job.pk}/delete/", {"post": "yes"}).status_code == 403
    assert client.get(f"{GROUPS_URL}{job.group_id}/delete/").status_code == 403
    response = client.get(JOBS_URL)
    html = response.content.decode()
    assert f'href="{JOBS_URL}add/"' not in html
    assert 'value="delete_selected"' not in html
    assert 'value="retry_now"' in html and 'value="cancel"' in html  # the page has actions
    deleted = run_action(client, "delete_selected", job)
    assert deleted.status_code == 200
    assert Job.objects.filter(pk=job.pk).exists()


def test_retry_now_makes_a_failed_job_pending_and_due_now_and_it_then_runs():
    client = staff_client("view_job", "change_job")
    job = failed_job(jobs.raise_unless_ledger, args=["fixed"])
    assert job.status == Status.FAILED
    Ledger.objects.create(key="fixed")  # the cause of the failure is repaired
    before = timezone.now()
    assert job.run_after < before
    response = run_action(client, "retry_now", job)
    after = timezone.now()
    assert messages_of(response) == ["1 job(s) queued to run now."]
    job.refresh_from_db()
    assert job.status == Status.PENDING and job.finished_at is None
    assert before <= job.run_after <= after
    assert job.attempt_set.count() == 1  # the history is kept
    [finished] = executor.run_batch()
    assert (finished.job_id, finished.attempt, finished.outcome) == (job.pk, 2, Outcome.SUCCEEDED)
    job.refresh_from_db()
    assert (job.status, job.result, job.attempts) == (Status.SUCCEEDED, "fixed", 2)


def test_retry_now_makes_a_job_waiting_for_its_backoff_due_now():
    client = staff_client("view_job", "change_job")
    job = djasync.schedule(jobs.add, args=[1, 2], run_after=datetime.timedelta(hours=2))
    assert executor.run_batch() == []
    run_action(client, "retry_now", job)
    [finished] = executor.run_batch()
    assert (finished.job_id, finished.outcome, finished.result) == (job.pk, Outcome.SUCCEEDED, 3)


def test_cancel_cancels_the_selected_pending_job_only():
    client = staff_client("view_job", "change_job")
    cancelled = djasync.schedule(jobs.write_ledger, args=["cancelled"])
    kept = djasync.schedule(jobs.write_ledger, args=["kept"])
    response = run_action(client, "cancel", cancelled)
    assert messages_of(response) == ["1 job(s) cancelled."]
    assert Job.objects.get(pk=cancelled.pk).status == Status.CANCELLED
    assert [f.job_id for f in executor.drain()] == [kept.pk]
    assert list(Ledger.objects.values_list("key", flat=True)) == ["kept"]


def test_cancel_leaves_a_finished_job_alone():
    client = staff_client("view_job", "change_job")
    job = djasync.schedule(jobs.add, args=[1, 2])
    executor.run_batch()
    response = run_action(client, "cancel", job)
    assert messages_of(response) == ["0 job(s) cancelled."]
    assert Job.objects.get(pk=job.pk).status == Status.SUCCEEDED


def test_a_staff_user_with_only_the_view_permission_gets_no_actions_and_posting_them_does_nothing():
    client = staff_client("view_job")
    failed = failed_job()
    pending = djasync.schedule(jobs.add, args=[1, 2])
    response = client.get(JOBS_URL)
    assert listed_ids(response) == sorted([failed.pk, pending.pk])
    html = response.content.decode()
    assert 'value="retry_now"' not in html and 'value="cancel"' not in html
    for action, job in (("retry_now", failed), ("cancel", pending)):
        response = run_action(client, action, job)
        assert response.status_code == 200, response.status_code
    assert Job.objects.get(pk=failed.pk).status == Status.FAILED
    assert Job.objects.get(pk=pending.pk).status == Status.PENDING


def test_a_staff_user_without_a_job_permission_cannot_see_the_job_list():
    client = staff_client()
    assert client.get(JOBS_URL).status_code == 403


def test_the_group_list_shows_each_groups_progress_without_its_final_job():
    client = superuser_client()
    ok = djasync.schedule(jobs.add, args=[1, 2], group="nightly", priority=2)
    djasync.schedule(jobs.always_raise, group="nightly", priority=1, meta={"max_attempts": 1})
    djasync.schedule(jobs.add, args=[3, 4], group="nightly", run_after=datetime.timedelta(days=1))
    ok.group.on_completion(djasync.schedule(jobs.echo, args=["done"]))
    assert len(executor.run_batch(5)) == 2
    response = client.get(GROUPS_URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert "nightly" in html
    assert "2/3 finished (1 ok, 1 failed, 0 cancelled)" in html
    change = client.get(f"{GROUPS_URL}{ok.group_id}/change/")
    assert change.status_code == 200
    assert "2/3 finished (1 ok, 1 failed, 0 cancelled)" in change.content.decode()
