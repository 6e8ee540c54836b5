"""djasync as a backend for Django's Tasks framework: Django's backend contract, on real rows."""

import datetime
import logging
import os
import socket
import subprocess
import sys
from importlib.util import find_spec
from io import StringIO
from signal import SIGINT

import pytest

if find_spec("django.tasks") is None:
    pytest.importorskip("django_tasks", reason="needs Django 6 or the django-tasks backport")

from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone
from django.utils.text import slugify

import djasync
from djasync import executor
from djasync.backends import (
    RUNNER,
    DjasyncBackend,
    InvalidTask,
    TaskResultDoesNotExist,
    TaskResultStatus,
    WorkerLost,
    task_enqueued,
    task_finished,
    task_started,
)
from djasync.exceptions import ForbiddenFunction, FunctionNotFound
from djasync.models import Attempt, Job, Outcome, Status
from tests import jobs, tasks
from tests.daemon import ROOT, run_worker, start_worker, stop, wait_for, worker_env
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)

READY, RUNNING = TaskResultStatus.READY, TaskResultStatus.RUNNING
SUCCESSFUL, FAILED = TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED
#: Where Django's own receivers log the three signals (the backport logs under its own name).
TASKS_LOGGER = "django.tasks" if find_spec("django.tasks") else "django_tasks"


def backend(alias="default"):
    return tasks.task_backends[alias]


def ledger():
    return list(Ledger.objects.order_by("id").values_list("key", flat=True))


# -- enqueue ----------------------------------------------------------------------------------


def test_enqueue_writes_one_job_and_returns_a_ready_result_whose_id_is_the_job_id():
    result = tasks.add.enqueue(2, 3)
    job = Job.objects.get()
    assert result.id == str(job.pk) and isinstance(result.id, str) and len(result.id) < 64
    assert (result.status, result.args, result.kwargs, result.backend) == (READY, [2, 3], {},
                                                                            "default")
    assert result.task == tasks.add and result.enqueued_at is not None
    assert (result.started_at, result.finished_at, result.last_attempted_at) == (None,) * 3
    assert (result.errors, result.worker_ids, result.attempts) == ([], [], 0)
    assert (job.name, job.args, job.queue, job.priority) == (
        RUNNER, ["tests.tasks.add", [2, 3], {}], "default", 0)
    assert job.meta == {"max_attempts": 3}  # TASKS["default"]["OPTIONS"]["MAX_ATTEMPTS"]
    fetched = backend().get_result(result.id)
    assert (fetched.status, fetched.task, fetched.args, fetched.enqueued_at) == (
        READY, tasks.add, [2, 3], result.enqueued_at)
    with pytest.raises(ValueError, match="not finished"):
        fetched.return_value  # noqa: B018


def test_a_task_round_trips_through_a_real_worker():
    result = tasks.write_ledger.enqueue("via the worker")
    done = run_worker("--burst")
    assert done.returncode == 0, done.stderr
    result.refresh()
    assert (result.status, result.return_value, result.errors) == (SUCCESSFUL, "via the worker",
                                                                   [])
    [worker] = result.worker_ids  # the child process that ran it: host:pid
    assert worker.startswith(f"{socket.gethostname()}:") and not worker.endswith(f":{os.getpid()}")
    assert result.enqueued_at <= result.started_at == result.last_attempted_at
    assert result.started_at <= result.finished_at
    assert ledger() == ["via the worker"]


def test_flush_queue_runs_enqueued_tasks_in_process():
    results = [tasks.add.enqueue(i, i) for i in range(3)]
    out = StringIO()
    call_command("flush_queue", stdout=out)
    assert "3 attempts: 3 succeeded" in out.getvalue()
    for i, result in enumerate(results):
        result.refresh()
        assert (result.status, result.return_value, result.attempts) == (SUCCESSFUL, 2 * i, 1)


def test_arguments_that_are_not_json_are_refused_at_enqueue_and_nothing_is_written():
    with pytest.raises(TypeError, match="Unsupported type"):
        tasks.add.enqueue(timezone.now(), 1)
    assert not Job.objects.exists()


def test_a_task_outside_the_allowed_modules_is_refused_at_enqueue():
    outsider = tasks.task(slugify)  # a module-level function of django.utils.text
    with pytest.raises(ForbiddenFunction, match="django.utils.text.slugify"):
        outsider.enqueue("Hello")
    assert not Job.objects.exists()


def test_aenqueue_and_aget_result_work_from_async_code():
    async def enqueue_and_read():
        result = await tasks.add.aenqueue(20, 22)
        return result, await tasks.add.aget_result(result.id)

    result, fetched = async_to_sync(enqueue_and_read)()
    assert (fetched.id, fetched.status) == (result.id, READY)
    executor.drain()
    async_to_sync(result.arefresh)()
    assert result.return_value == 42


# -- transactions -----------------------------------------------------------------------------


def test_an_enqueued_task_is_invisible_to_other_connections_until_commit(other_connection):
    with transaction.atomic():
        result = tasks.add.enqueue(1, 1)
        assert other_connection.execute("SELECT count(*) FROM djasync_job").fetchone() == (0,)
    assert other_connection.execute("SELECT id FROM djasync_job").fetchall() == [(int(result.id),)]


def test_a_rolled_back_enqueue_never_runs(other_connection):
    with transaction.atomic():
        result = tasks.write_ledger.enqueue("ghost")
        transaction.set_rollback(True)
    assert other_connection.execute("SELECT count(*) FROM djasync_job").fetchone() == (0,)
    assert executor.drain() == []
    assert ledger() == []
    with pytest.raises(TaskResultDoesNotExist):
        backend().get_result(result.id)


# -- failures and retries ---------------------------------------------------------------------


def test_a_failing_task_is_retried_then_failed_with_one_error_and_traceback_per_attempt():
    result = tasks.write_then_raise.enqueue("k")
    statuses = []
    for _ in range(3):  # OPTIONS: MAX_ATTEMPTS 3; the test settings retry at once
        executor.run_batch()
        result.refresh()
        statuses.append(result.status)
    assert statuses == [READY, READY, FAILED]  # a retry goes back to READY
    assert executor.run_batch() == []
    assert ledger() == []  # each attempt's writes rolled back
    assert (result.attempts, len(result.errors)) == (3, 3)
    for error in result.errors:
        assert error.exception_class_path == "builtins.ValueError"
        assert error.exception_class is ValueError
        assert "Traceback" in error.traceback and "write_then_raise" in error.traceback
        assert "boom after writing k" in error.traceback
    attempts = list(Attempt.objects.order_by("number"))
    assert result.started_at == attempts[0].started_at
    assert result.last_attempted_at == attempts[-1].started_at
    assert result.finished_at == Job.objects.get().finished_at is not None
    with pytest.raises(ValueError, match="Task failed"):
        result.return_value  # noqa: B018


def test_per_task_options_override_the_backend_options():
    result = tasks.fail_once.enqueue("once")
    assert Job.objects.get().meta == {"max_attempts": 1, "timeout": 30}
    [finished] = executor.run_batch()
    assert finished.status == Status.FAILED
    result.refresh()
    assert (result.status, result.attempts) == (FAILED, 1)


@pytest.mark.parametrize("options, message", [
    ({"MAX_ATTEMPTS": 0}, "max_attempts"),
    ({"TIMEOUT": -1}, "timeout"),
    ({"RETRIES": 3}, "unknown key.*RETRIES"),
    # A backoff function is the DJASYNC setting: a job row holds JSON, not code to import.
    ({"BACKOFF": "myapp.backoff"}, r"TASKS\['bad'\]\['OPTIONS'\].*belongs in the "
                                   r"DJASYNC\['BACKOFF'\] setting"),
    ({"BACKOFF": -1}, r"meta\['backoff'\] must be a number of seconds"),
    ({"BACKOFF": float("inf")}, r"meta\['backoff'\] must be a number of seconds"),
    ({"BACKOFF": True}, r"meta\['backoff'\] must be a number of seconds"),
    ({"BACKOFF": None}, r"meta\['backoff'\] must be a number of seconds"),
    ({"BACKOFF": {"factor": 2}}, r"meta\['backoff'\] must be .*'base'"),
    ({"BACKOFF": {"base": 1, "jitter": 0.1}}, r"meta\['backoff'\] must be .*'base'"),
    ({"BACKOFF": {"base": 1, "factor": 0.5}}, r"meta\['backoff'\]\['factor'\] must be"),
    ({"BACKOFF": {"base": 1, "max": 31 * 86400}}, r"meta\['backoff'\]\['max'\] must be"),
])
def test_bad_options_are_refused_when_the_backend_is_built(options, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        DjasyncBackend("bad", {"OPTIONS": options})


@pytest.mark.parametrize("backoff", [0, 30, 2.5, {"base": 5}, {"base": 5, "factor": 3, "max": 60}])
def test_a_backoff_option_sets_the_backoff_of_every_job_of_the_backend(backoff):
    built = DjasyncBackend("ok", {"OPTIONS": {"BACKOFF": backoff, "MAX_ATTEMPTS": 4}})
    assert built.meta == {"backoff": backoff, "max_attempts": 4}
    assert built.check() == []


def retry_delay(job_id, failed_at):
    """Seconds between a failed attempt's end (``failed_at``, taken just after it) and the
    retry's stored ``run_after``, give or take the attempt's own duration."""
    return (Job.objects.get(pk=job_id).run_after - failed_at).total_seconds()


def test_a_tasks_own_backoff_sets_when_its_retry_runs():
    result = tasks.fail_with_backoff.enqueue("k")
    assert Job.objects.get().meta == {"max_attempts": 2, "backoff": 120}  # OPTIONS say 3
    before = timezone.now()
    [finished] = executor.run_batch()
    after = timezone.now()
    assert finished.status == Status.PENDING
    run_after = Job.objects.get().run_after
    # DJASYNC["BACKOFF"] of the tests is 0: the Task's 120 s is what decided.
    assert before + datetime.timedelta(seconds=120) <= run_after
    assert run_after <= after + datetime.timedelta(seconds=120)
    assert executor.run_batch() == []  # not due for two minutes
    result.refresh()
    assert (result.status, result.attempts) == (READY, 1)
    [finished] = executor.run_batch(now=run_after)
    result.refresh()
    assert (finished.status, result.status, result.attempts) == (Status.FAILED, FAILED, 2)


@override_settings(TASKS={"default": {
    "BACKEND": "djasync.backends.DjasyncBackend",
    "OPTIONS": {"MAX_ATTEMPTS": 4, "BACKOFF": {"base": 10, "factor": 3, "max": 50}},
}})
def test_the_backoff_option_waits_base_times_factor_to_the_attempt_capped_at_max():
    result = tasks.write_then_raise.enqueue("k")
    job_id = int(result.id)
    delays = []
    for _ in range(3):
        due = Job.objects.get(pk=job_id).run_after
        [finished] = executor.run_batch(now=due)
        failed_at = timezone.now()
        assert finished.status == Status.PENDING
        delays.append(retry_delay(job_id, failed_at))
    # 10·3^0, 10·3^1, then 10·3^2 = 90 capped at 50 (each within the attempt's run time).
    assert [round(d) for d in delays] == [10, 30, 50], delays
    [finished] = executor.run_batch(now=Job.objects.get(pk=job_id).run_after)
    assert finished.status == Status.FAILED and finished.run_after is None
    result.refresh()
    assert (result.status, len(result.errors)) == (FAILED, 4)


@override_settings(TASKS={"default": {
    "BACKEND": "djasync.backends.DjasyncBackend", "OPTIONS": {"BACKOFF": 3600},
}})
def test_a_tasks_backoff_overrides_the_backend_option():
    tasks.fail_with_backoff.enqueue("mine")
    tasks.write_then_raise.enqueue("the backend's")
    assert [j.meta["backoff"] for j in Job.objects.order_by("id")] == [120, 3600]


def test_a_per_task_backoff_that_is_not_a_valid_shape_is_an_invalid_task():
    with pytest.raises(InvalidTask, match=r"meta\['backoff'\] must be"):
        tasks.with_options(backoff="tests.jobs.hourly_backoff")(tasks.add.func)
    with pytest.raises(InvalidTask, match=r"meta\['backoff'\]\['base'\] must be"):
        tasks.with_options(backoff={"base": -5})(tasks.add.func)


def test_a_task_with_a_dict_backoff_is_still_hashable():
    task = tasks.with_options(backoff={"base": 5})(tasks.add.func)
    assert hash(task) == hash(tasks.with_options(backoff={"base": 5})(tasks.add.func))


def test_a_per_task_option_out_of_range_is_an_invalid_task():
    with pytest.raises(InvalidTask, match="max_attempts"):
        tasks.with_options(max_attempts=0)(tasks.add.func)


def test_a_return_value_that_is_not_json_fails_the_attempt():
    result = tasks.return_a_set.enqueue()
    executor.drain()
    result.refresh()
    assert result.status == FAILED and result.errors[0].exception_class is TypeError


def test_a_task_that_swallows_a_database_error_fails_instead_of_losing_its_writes_quietly():
    result = tasks.swallow_integrity_error.enqueue("lost")
    executor.drain()
    result.refresh()
    assert result.status == FAILED and ledger() == []
    assert result.errors[0].exception_class_path == "djasync.executor.JobWritesLost"


@pytest.mark.parametrize("path, error", [
    ("os.system", "ForbiddenFunction"),  # never imported, let alone called
    ("tests.jobs.add", "FunctionNotFound"),  # allowed, but not a Task
])
def test_a_job_row_naming_something_other_than_an_allowed_task_fails_for_good(path, error):
    job = djasync.schedule(RUNNER, args=[path, ["echo hi"], {}], kwargs={"backend": "default"})
    [finished] = executor.run_batch()
    assert finished.status == Status.FAILED  # at once, although three attempts are allowed
    assert Attempt.objects.get().exception_type == f"djasync.exceptions.{error}"
    with pytest.raises(TaskResultDoesNotExist, match=path):
        backend().get_result(str(job.pk))


def test_a_task_whose_name_is_not_its_functions_is_refused_at_enqueue():
    with pytest.raises(FunctionNotFound, match="module-level name of a Task"):
        tasks.misnamed.enqueue()


@pytest.mark.daemon
def test_a_task_that_kills_its_worker_is_failed_with_a_worker_lost_error():
    result = tasks.kill_self.enqueue()
    done = run_worker("--burst")
    assert done.returncode == 0, done.stderr
    result.refresh()
    assert (result.status, result.attempts) == (FAILED, 1)
    [error] = result.errors
    assert error.exception_class is WorkerLost and "SIGKILL" in error.traceback


# -- how a Task job is shown ------------------------------------------------------------------


def test_a_task_job_is_shown_by_its_tasks_path_in_the_worker_log_lines(caplog):
    caplog.set_level(logging.DEBUG, logger="djasync.executor")
    result = tasks.write_then_raise.enqueue("k")
    executor.run_batch()
    [line] = [r for r in caplog.records if r.getMessage().startswith("job will retry")]
    assert f"id={result.id} name=tests.tasks.write_then_raise attempt=1" in line.getMessage()
    assert line.job_name == "tests.tasks.write_then_raise"  # the --log-format json field
    assert Job.objects.get().name == RUNNER  # what the worker resolves is unchanged


def test_a_task_job_is_shown_by_its_tasks_path_in_flush_queue_and_str():
    result = tasks.add.enqueue(1, 2)
    assert str(Job.objects.get()) == f"tests.tasks.add(1, 2) #{result.id}"
    out = StringIO()
    call_command("flush_queue", stdout=out)
    assert f"{result.id}: tests.tasks.add attempt 1" in out.getvalue()


def test_current_job_inside_a_task_names_the_task():
    result = tasks.report_job_name.enqueue()
    executor.drain()
    result.refresh()
    assert result.return_value == "tests.tasks.report_job_name"


def test_the_admin_job_list_shows_the_tasks_path(admin_client):
    tasks.add.enqueue(1, 2)
    plain = djasync.schedule(jobs.add, args=[1, 2])
    html = admin_client.get("/admin/djasync/job/").content.decode()
    assert '<td class="field-function">tests.tasks.add</td>' in html
    assert f'<td class="field-function">{plain.name}</td>' in html


@pytest.mark.parametrize("args", [["os.system", ["echo hi"], {}], ["not a name"], [7], []])
def test_a_task_path_the_allow_list_refuses_is_never_shown(args):
    job = djasync.schedule(RUNNER, args=args, kwargs={"backend": "default"})
    assert job.display_name == RUNNER and str(job).startswith(f"{RUNNER}(")
    [finished] = executor.run_batch()  # the log lines and flush_queue show the same name
    assert finished.name == RUNNER and finished.outcome == Outcome.ERROR


# -- context ----------------------------------------------------------------------------------


def test_the_context_attempt_starts_at_1_and_sees_the_running_result():
    result = tasks.report_context.enqueue()
    [finished] = executor.run_batch()
    result.refresh()
    assert result.return_value == {
        "attempt": 1, "id": result.id, "status": "RUNNING", "worker_ids": result.worker_ids,
        "status_seen_by_get_result": "RUNNING",  # its own job: running, though no lock is seen
    }
    assert result.worker_ids == [Attempt.objects.get(job_id=finished.job_id).worker]


def test_the_context_attempt_grows_with_each_retry_and_earlier_errors_are_visible():
    result = tasks.fail_before_attempt.enqueue(succeed_on=3)
    executor.drain()
    result.refresh()
    assert result.return_value == {"attempt": 3, "errors": 2, "worker_ids": 3}
    assert ledger() == ["attempt 3"]  # the failed attempts' writes rolled back
    assert [e.exception_class for e in result.errors] == [LookupError, LookupError]


# -- priorities, queues, run_after ------------------------------------------------------------


def test_priorities_map_one_to_one_over_the_full_range_and_the_highest_runs_first():
    for priority in (0, -100, 100, 7):
        tasks.write_ledger.using(priority=priority).enqueue(f"p{priority}")
    assert sorted(Job.objects.values_list("priority", flat=True)) == [-100, 0, 7, 100]
    executor.drain()
    assert ledger() == ["p100", "p7", "p0", "p-100"]


@pytest.mark.parametrize("priority", [101, -101, 1.5])
def test_a_priority_outside_the_tasks_range_is_an_invalid_task(priority):
    with pytest.raises(InvalidTask, match="priority must be a whole number"):
        tasks.add.using(priority=priority)


def test_queue_names_are_validated_against_QUEUES_and_tasks_run_in_their_queue():
    with pytest.raises(InvalidTask, match="Queue 'reports' is not valid for backend."):
        tasks.add.using(queue_name="reports")
    result = tasks.send_mail.enqueue("ada@example.com")
    assert Job.objects.get().queue == "emails"
    assert executor.drain(queues=["default"]) == []
    call_command("flush_queue", "--queue", "emails", stdout=StringIO())
    result.refresh()
    assert result.return_value == "sent to ada@example.com"


def test_a_backend_without_QUEUES_still_refuses_queue_names_djasync_cannot_store():
    assert tasks.add.using(backend="other", queue_name="anything:goes").queue_name
    with pytest.raises(InvalidTask, match="queue name 'no spaces' is invalid"):
        tasks.add.using(backend="other", queue_name="no spaces")


def test_run_after_defers_a_task_until_its_time():
    when = timezone.now() + datetime.timedelta(hours=1)
    result = tasks.add.using(run_after=when).enqueue(1, 1)
    assert executor.drain() == []
    assert Job.objects.get().run_after == when
    assert backend().get_result(result.id).task.run_after == when
    Job.objects.update(run_after=timezone.now())  # the hour has passed
    executor.drain()
    result.refresh()
    assert (result.status, result.return_value, result.task.run_after) == (SUCCESSFUL, 2, when)


def test_a_naive_run_after_is_an_invalid_task():
    with pytest.raises(InvalidTask, match="run_after must be an aware datetime"):
        tasks.add.using(run_after=datetime.datetime(2030, 1, 1))


# -- signals and log lines --------------------------------------------------------------------


@pytest.fixture
def signals_seen():
    seen = []

    def receiver(signal, sender, task_result, **kwargs):
        name = {task_enqueued: "enqueued", task_started: "started", task_finished: "finished"}
        seen.append((name[signal], sender, task_result.status, sys.exc_info()[0]))

    for signal in (task_enqueued, task_started, task_finished):
        signal.connect(receiver, weak=False, dispatch_uid="test_backends")
    yield seen
    for signal in (task_enqueued, task_started, task_finished):
        signal.disconnect(dispatch_uid="test_backends")


def test_signals_are_sent_with_the_backend_class_as_sender(signals_seen):
    tasks.add.enqueue(1, 2)
    executor.drain()
    assert signals_seen == [("enqueued", DjasyncBackend, READY, None),
                            ("started", DjasyncBackend, RUNNING, None),
                            ("finished", DjasyncBackend, SUCCESSFUL, None)]


def test_task_finished_for_a_failure_is_sent_inside_the_except_on_every_attempt(signals_seen):
    tasks.write_then_raise.enqueue("k")
    executor.drain()
    finished = [seen[2:] for seen in signals_seen if seen[0] == "finished"]
    # READY while an attempt is left (it will be retried), FAILED after the last one.
    assert finished == [(READY, ValueError), (READY, ValueError), (FAILED, ValueError)]


def test_the_django_tasks_log_lines(caplog):
    caplog.set_level(logging.DEBUG, logger=TASKS_LOGGER)
    ok = tasks.add.enqueue(1, 2)
    failing = tasks.fail_once.enqueue("logged")
    executor.drain()
    lines = [(r.levelno, r.getMessage(), r.exc_info[0] if r.exc_info else None)
             for r in caplog.records if r.name == TASKS_LOGGER]
    add, fail = "path=tests.tasks.add", "path=tests.tasks.fail_once"
    assert lines == [
        (logging.DEBUG, f"Task id={ok.id} {add} enqueued backend=default", None),
        (logging.DEBUG, f"Task id={failing.id} {fail} enqueued backend=default", None),
        (logging.INFO, f"Task id={ok.id} {add} state=RUNNING", None),
        (logging.INFO, f"Task id={ok.id} {add} state=SUCCESSFUL", None),
        (logging.INFO, f"Task id={failing.id} {fail} state=RUNNING", None),
        (logging.ERROR, f"Task id={failing.id} {fail} state=FAILED", ValueError),
    ]


# -- get_result -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["999999", "0", "-1", "abc", "", " 1", "1.0", "١",
                                    "99999999999999999999", 1, None])
def test_unknown_or_malformed_ids_raise_task_result_does_not_exist(bad_id):
    tasks.add.enqueue(1, 1)
    with pytest.raises(TaskResultDoesNotExist):
        backend().get_result(bad_id)


def test_a_plain_job_or_another_backends_task_is_not_a_result_of_this_backend():
    job = djasync.schedule(jobs.add, args=[1, 2])
    with pytest.raises(TaskResultDoesNotExist):
        backend().get_result(str(job.pk))
    other = tasks.add.using(backend="other").enqueue(1, 2)
    with pytest.raises(TaskResultDoesNotExist):
        backend().get_result(other.id)
    assert backend("other").get_result(other.id).backend == "other"


def test_task_get_result_reads_its_own_results_and_refuses_another_tasks():
    result = tasks.add.enqueue(1, 1)
    assert tasks.add.get_result(result.id).id == result.id
    with pytest.raises(Exception, match="Task does not match") as caught:
        tasks.write_ledger.get_result(result.id)
    assert type(caught.value).__name__ == "TaskResultMismatch"


@pytest.mark.daemon
def test_a_result_is_running_while_a_worker_holds_its_job(tmp_path, other_connection):
    go = tmp_path / "go"
    result = tasks.wait_for_file.enqueue(str(go), "slow")
    daemon = start_worker("--concurrency", "1", log=tmp_path / "worker.log")
    try:
        wait_for(lambda: backend().get_result(result.id).status == RUNNING, what="RUNNING")
        # The probe's share lock was not kept: the worker still owns the row, nothing waits.
        # (Sessions of this database only: pg_locks is server-wide, and a lock wait elsewhere
        # on the server made this fail once.)
        waiting = other_connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'").fetchone()
        assert waiting == (0,)
        with transaction.atomic():  # inside a caller's transaction too
            assert backend().get_result(result.id).status == RUNNING
        go.write_text("go")
        wait_for(lambda: backend().get_result(result.id).status == SUCCESSFUL, what="SUCCESSFUL")
    finally:
        assert stop(daemon) == 0, (tmp_path / "worker.log").read_text()[-2000:]
    assert ledger() == ["slow"]


def test_reading_a_result_locks_no_row(other_connection):
    """Whether a pending job runs is read from its row's locker, never by locking the row: a
    lock, even for an instant, makes a worker's claim at that instant pass the job over until
    its next poll. A transaction that locked a row has a transaction id; reading results,
    pending or running, gives ours none."""
    waiting, running = tasks.add.enqueue(1, 1), tasks.add.enqueue(2, 2)
    other_connection.execute("BEGIN")
    other_connection.execute("SELECT 1 FROM djasync_job WHERE id = %s FOR NO KEY UPDATE",
                             [int(running.id)])
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            assert backend().get_result(waiting.id).status == READY
            assert backend().get_result(running.id).status == RUNNING
            cursor.execute("SELECT pg_current_xact_id_if_assigned()")
            assert cursor.fetchone() == (None,)
    finally:
        other_connection.execute("ROLLBACK")
    assert backend().get_result(running.id).status == READY


def test_a_cancelled_task_is_failed_without_errors():
    result = tasks.add.enqueue(1, 1)
    Job.objects.update(status=Status.CANCELLED)
    fetched = backend().get_result(result.id)
    assert (fetched.status, fetched.errors, fetched.worker_ids) == (FAILED, [], [])


# -- async tasks ------------------------------------------------------------------------------


def test_async_tasks_run_and_their_orm_writes_commit_with_the_job(other_connection):
    results = [tasks.async_add.enqueue(1, 2), tasks.async_write.enqueue("acreate"),
               tasks.async_write_through_sync_to_async.enqueue("sync_to_async")]
    executor.drain()
    for result in results:
        result.refresh()
    assert [r.return_value for r in results] == [3, "acreate", "sync_to_async"]
    rows = other_connection.execute("SELECT key FROM tests_ledger ORDER BY id").fetchall()
    assert rows == [("acreate",), ("sync_to_async",)]


def test_an_async_tasks_writes_belong_to_the_jobs_transaction(other_connection):
    tasks.async_write.enqueue("inside")
    job = Job.objects.get()
    with transaction.atomic():  # job() nests the executor's transaction in this one
        assert job() == "inside"
        assert ledger() == ["inside"]  # written on this thread's connection...
        count = "SELECT count(*) FROM tests_ledger"
        assert other_connection.execute(count).fetchone() == (0,)  # ...and not committed
        transaction.set_rollback(True)
    assert ledger() == [] and Job.objects.get().status == Status.PENDING


def test_an_async_tasks_writes_roll_back_when_it_raises():
    result = tasks.async_write_then_raise.enqueue("async")
    executor.drain()
    result.refresh()
    assert (result.status, result.attempts, ledger()) == (FAILED, 3, [])
    assert {e.exception_class for e in result.errors} == {RuntimeError}


def test_an_async_task_gets_its_context_and_its_current_job():
    result = tasks.async_report_context.enqueue()
    executor.drain()
    result.refresh()
    assert result.return_value == {"attempt": 1, "job_id": int(result.id)}


# -- check and construction -------------------------------------------------------------------


def test_check_is_clean_on_postgresql_with_djasync_installed():
    assert backend().check() == []
    assert backend("other").check() == []


def test_check_reports_a_missing_app_and_a_database_that_is_not_postgresql(monkeypatch):
    monkeypatch.setattr(connection, "vendor", "sqlite")  # the attribute only: no query is made
    with override_settings(INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"]):
        errors = backend().check()
    assert [e.id for e in errors] == ["djasync.E101", "djasync.E102"]
    assert "INSTALLED_APPS" in errors[0].msg and "sqlite" in errors[1].msg


def test_check_reports_queue_names_djasync_cannot_store():
    errors = DjasyncBackend("odd", {"QUEUES": ["default", "has space"]}).check()
    assert [e.id for e in errors] == ["djasync.E103"]


def test_the_backend_is_built_and_tasks_declared_before_django_is_set_up():
    code = "\n".join([
        "import sys, django.apps",
        "from django.tasks import task" if find_spec("django.tasks")
        else "from django_tasks import task",
        "def hello(): pass",
        "hello = task(hello)",
        "assert hello.get_backend().__class__.__name__ == 'DjasyncBackend'",
        "assert not django.apps.apps.ready and 'djasync.models' not in sys.modules",
        "print('ok')",
    ])
    env = worker_env(DJANGO_SETTINGS_MODULE="tests.settings")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


# -- tasks that end the process's way: exit(), KeyboardInterrupt --------------------------------


def finished_signals():
    seen = []

    def receiver(sender, task_result, **kwargs):
        seen.append((task_result.id, task_result.status,
                     [e.exception_class_path for e in task_result.errors]))

    task_finished.connect(receiver)
    return seen, receiver


@pytest.mark.parametrize(("task", "path"), [("exit_one", "builtins.SystemExit"),
                                            ("raise_keyboard_interrupt",
                                             "builtins.KeyboardInterrupt")])
def test_a_task_ending_with_exit_or_keyboard_interrupt_fails_and_flush_queue_goes_on(
        task, path):
    """As Django's reference backends do: FAILED, the traceback kept, task_finished sent, and
    the next task runs (KeyboardInterrupt used to stop flush_queue with exit 130, the task READY
    again; exit() sent no task_finished)."""
    ending = getattr(tasks, task).enqueue()
    after = tasks.add.enqueue(1, 2)
    seen, receiver = finished_signals()
    try:
        with pytest.raises(Exception, match="failed for good"):
            call_command("flush_queue", stdout=StringIO())
    finally:
        task_finished.disconnect(receiver)
    assert seen[0] == (ending.id, FAILED, [path]) and seen[1][:2] == (after.id, SUCCESSFUL)
    ending.refresh()
    assert ending.status == FAILED
    [error] = ending.errors
    assert error.exception_class_path == path
    assert f"{path.split('.')[1]}" in error.traceback and "tests/tasks.py" in error.traceback
    assert tasks.add.get_result(after.id).return_value == 3


@pytest.mark.daemon
def test_a_task_raising_keyboard_interrupt_in_the_daemon_fails_without_killing_the_child(
        tmp_path):
    ending = tasks.raise_keyboard_interrupt.enqueue()
    after = tasks.add.enqueue(2, 2)
    done = run_worker("--concurrency", "1", "--burst")
    assert done.returncode == 0, done.stderr
    ending.refresh()
    assert ending.status == FAILED
    assert [e.exception_class_path for e in ending.errors] == ["builtins.KeyboardInterrupt"]
    assert not Attempt.objects.filter(outcome=Outcome.CRASHED).exists()
    assert tasks.add.get_result(after.id).return_value == 4
    # The one child ran both: it was not replaced after the interrupt.
    assert len(set(Attempt.objects.values_list("worker", flat=True))) == 1


def test_a_real_ctrl_c_still_stops_flush_queue_and_leaves_the_task_queued(tmp_path):
    """Only the task's own KeyboardInterrupt is its failure: SIGINT (Ctrl-C) still interrupts
    flush_queue, rolls the running task back, and leaves it READY."""
    go = tmp_path / "go"
    result = tasks.wait_for_file.enqueue(str(go), "interrupted")
    command = [sys.executable, "-m", "django", "flush_queue", "--settings", "tests.settings"]
    process = subprocess.Popen(command, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: backend().get_result(result.id).status == RUNNING, what="RUNNING")
        process.send_signal(SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert backend().get_result(result.id).status == READY
    assert not Attempt.objects.exists() and ledger() == []


@pytest.mark.daemon
def test_a_running_result_shows_its_worker_and_when_it_started(tmp_path):
    go = tmp_path / "go"
    result = tasks.wait_for_file.enqueue(str(go), "slow")
    daemon = start_worker("--concurrency", "1", log=tmp_path / "worker.log")
    try:
        running = wait_for(lambda: (r := backend().get_result(result.id)).status == RUNNING
                           and r.worker_ids and r, what="RUNNING with its worker", timeout=30)
        [worker] = running.worker_ids  # the daemon's name in the registry: host:pid:…
        assert worker.startswith(f"{socket.gethostname()}:{daemon.pid}:"), worker
        assert running.started_at is not None and running.last_attempted_at == running.started_at
        assert running.enqueued_at <= running.started_at <= timezone.now()
        go.write_text("go")
        wait_for(lambda: backend().get_result(result.id).status == SUCCESSFUL, what="SUCCESSFUL")
    finally:
        assert stop(daemon) == 0, (tmp_path / "worker.log").read_text()[-2000:]
