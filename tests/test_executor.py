"""The executor: a job's writes and its status commit together, failures are recorded."""

import datetime
import sys

import pytest
from django.db import ProgrammingError, connection, transaction
from django.test import override_settings
from django.utils import timezone

import djasync
from djasync import executor, sql
from djasync.exceptions import DjasyncError
from djasync.models import Attempt, Job, Outcome, Status
from tests import jobs
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_job_runs_and_its_write_commits_with_its_succeeded_status(other_connection):
    job = djasync.schedule(jobs.write_ledger, args=["a"])
    [finished] = executor.run_batch()
    assert finished.outcome == Outcome.SUCCEEDED
    row = other_connection.execute(
        "SELECT status, result, attempts FROM djasync_job WHERE id = %s", [job.pk]).fetchone()
    assert row == ("succeeded", "a", 1)
    assert other_connection.execute("SELECT key FROM tests_ledger").fetchall() == [("a",)]
    attempt = Attempt.objects.get(job=job)
    assert (attempt.number, attempt.outcome, attempt.worker != "") == (1, Outcome.SUCCEEDED, True)


def test_an_empty_queue_runs_nothing():
    assert executor.run_batch() == []


@override_settings(DJASYNC={})  # the real 60·n^1.6 backoff
def test_job_writes_roll_back_when_the_job_raises_and_a_retry_is_scheduled():
    job = djasync.schedule(jobs.write_then_raise, args=["k"])
    before = timezone.now()
    [finished] = executor.run_batch()
    job.refresh_from_db()
    assert Ledger.objects.count() == 0
    assert (finished.outcome, job.status, job.attempts) == (Outcome.ERROR, Status.PENDING, 1)
    assert job.run_after >= before + datetime.timedelta(seconds=59)
    attempt = Attempt.objects.get(job=job)
    assert attempt.exception_type == "builtins.RuntimeError"
    assert attempt.exception_message == "boom after writing k"
    assert "write_then_raise" in attempt.traceback and "Traceback" in attempt.traceback
    assert executor.run_batch() == []  # not due until the backoff has passed


def test_a_job_is_failed_once_its_attempts_are_used_up():
    job = djasync.schedule(jobs.always_raise, meta={"max_attempts": 3})
    outcomes = [executor.run_batch()[0].status for _ in range(3)]
    assert outcomes == [Status.PENDING, Status.PENDING, Status.FAILED]
    assert executor.run_batch() == []
    job.refresh_from_db()
    assert (job.status, job.attempts, job.attempt_set.count()) == (Status.FAILED, 3, 3)
    assert job.finished_at is not None


def test_a_result_that_is_not_json_is_a_failed_attempt_and_rolls_back_the_writes():
    job = djasync.schedule(jobs.return_unencodable, args=["x"], meta={"max_attempts": 1})
    [finished] = executor.run_batch()
    job.refresh_from_db()
    assert (finished.outcome, job.status, job.result) == (Outcome.ERROR, Status.FAILED, None)
    assert "not JSON serializable" in job.attempt_set.get().exception_message
    assert Ledger.objects.count() == 0


def test_results_go_through_djangos_encoder():
    djasync.schedule(jobs.return_decimal)
    djasync.schedule(jobs.return_datetime)
    executor.run_batch(2)
    assert sorted(Job.objects.values_list("result", flat=True)) == ["1.10", "2020-01-02T03:04:05Z"]


def test_jobs_run_by_priority_then_run_after_then_id():
    now = timezone.now()
    low = djasync.schedule(jobs.add, args=[0, 1], priority=-5)
    later = djasync.schedule(jobs.add, args=[0, 2], run_after=now - datetime.timedelta(seconds=1))
    earlier = djasync.schedule(jobs.add, args=[0, 3], run_after=now - datetime.timedelta(hours=1))
    same_time = [djasync.schedule(jobs.add, args=[0, i], run_after=now) for i in (4, 5)]
    high = djasync.schedule(jobs.add, args=[0, 6], priority=10)
    future = djasync.schedule(jobs.add, args=[0, 7], run_after=datetime.timedelta(hours=1))
    order = [f.job_id for f in executor.drain()]
    assert order == [high.pk, earlier.pk, later.pk, same_time[0].pk, same_time[1].pk, low.pk]
    assert Job.objects.get(pk=future.pk).status == Status.PENDING


def test_two_connections_claiming_at_once_never_get_the_same_job(other_connection):
    first, second = djasync.schedule(jobs.add, args=[1, 1]), djasync.schedule(jobs.add, args=[2, 2])
    claim_sql = executor.sql.claim(by_queue=False, by_name_prefix=False)
    with other_connection.transaction():
        other_connection.execute("SET LOCAL lock_timeout = '2s'")
        [held] = other_connection.execute(claim_sql, {"limit": 1, "now": None}).fetchall()
        assert held[0] == first.pk
        with transaction.atomic():
            # SKIP LOCKED: the locked row is passed over at once, never waited on.
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '1s'")
            claimed = executor.claim(10)
        assert [job.id for job in claimed] == [second.pk]


def test_a_foreign_key_reference_to_a_job_does_not_hide_it_from_the_claim(other_connection):
    job = djasync.schedule(jobs.add, args=[1, 1])
    with other_connection.transaction():
        # An application transaction inserting a row that references the job takes a
        # FOR KEY SHARE lock on the job row; FOR NO KEY UPDATE does not conflict with it.
        other_connection.execute("INSERT INTO tests_jobreference (job_id) VALUES (%s)", [job.pk])
        with transaction.atomic():
            assert [j.id for j in executor.claim(1)] == [job.pk]


def test_a_batch_commits_each_jobs_writes_with_its_status_and_isolates_a_failure():
    ok_1 = djasync.schedule(jobs.write_ledger, args=["one"], priority=3)
    bad = djasync.schedule(jobs.write_then_raise, args=["two"], priority=2)
    ok_3 = djasync.schedule(jobs.write_ledger, args=["three"], priority=1)
    results = executor.run_batch(3)
    assert [f.job_id for f in results] == [ok_1.pk, bad.pk, ok_3.pk]
    assert sorted(Ledger.objects.values_list("key", flat=True)) == ["one", "three"]
    statuses = dict(Job.objects.values_list("pk", "status"))
    assert statuses[ok_1.pk] == statuses[ok_3.pk] == Status.SUCCEEDED
    assert statuses[bad.pk] == Status.PENDING


def test_a_job_past_its_timeout_is_stopped_by_statement_timeout():
    job = djasync.schedule(jobs.pg_sleep, args=[5], meta={"timeout": 0.3, "max_attempts": 1})
    [finished] = executor.run_batch()
    assert (finished.outcome, finished.status) == (Outcome.TIMED_OUT, Status.FAILED)
    assert finished.duration < 3
    assert "statement timeout" in job.attempt_set.get().exception_message


def test_a_hand_written_row_naming_os_system_is_failed_without_import(other_connection, tmp_path,
                                                                      monkeypatch):
    # A module outside the allowed ones whose import would leave a mark.
    (tmp_path / "sideeffect_mod.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\ndef f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("os.system", "sideeffect_mod.f", "builtins.print"):
        other_connection.execute(
            "INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, status,"
            " attempts, identity, created_at, worker) VALUES (%s, '[\"id\"]', '{}', '{}', "
            "'default', 0, now(), 'pending', 0, '', now(), '')", [name])
    results = executor.drain()
    assert [(f.outcome, f.status) for f in results] == [(Outcome.ERROR, Status.FAILED)] * 3
    assert all("not in an allowed module" in f.error for f in results)
    assert "sideeffect_mod" not in sys.modules and not (tmp_path / "imported").exists()


@pytest.mark.parametrize("column, value, reason", [
    ("args", '{"a": 1}', "args must be a JSON array"),
    ("kwargs", '[1]', "kwargs must be a JSON object"),
    ("meta", '{"retries": 1}', "unknown meta key"),
    ("name", "'not a name'", "not a dotted Python name"),
])
def test_malformed_hand_written_rows_are_failed_with_their_reason(other_connection, column,
                                                                   value, reason):
    values = {"name": "'tests.jobs.add'", "args": "'[1, 2]'", "kwargs": "'{}'", "meta": "'{}'"}
    values[column] = f"'{value}'" if column != "name" else value
    other_connection.execute(
        "INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, status, "
        f"attempts, identity, created_at, worker) VALUES ({values['name']}, {values['args']}, "
        f"{values['kwargs']}, {values['meta']}, 'default', 0, now(), 'pending', 0, '', now(), '')")
    [finished] = executor.drain()
    assert finished.status == Status.FAILED
    assert reason in finished.error
    djasync.schedule(jobs.add, args=[1, 2])
    assert [f.outcome for f in executor.drain()] == [Outcome.SUCCEEDED]  # the queue still works


def test_a_job_whose_earlier_attempts_crashed_is_failed_without_running_again():
    job = djasync.schedule(jobs.write_ledger, args=["poison"], meta={"max_attempts": 2})
    for _ in range(2):
        executor.record_lost_attempt(job.pk, outcome=Outcome.CRASHED, started=timezone.now(),
                                     worker="w", reason="worker process died (SIGKILL)")
    [finished] = executor.run_batch()
    job.refresh_from_db()
    assert (finished.status, job.status) == (Status.FAILED, Status.FAILED)
    assert "used up its 2 attempts" in finished.error
    assert Ledger.objects.count() == 0
    assert list(job.attempt_set.values_list("number", "outcome")) == [
        (1, Outcome.CRASHED), (2, Outcome.CRASHED)]


def test_calling_a_job_runs_it_now_through_the_executor():
    job = djasync.schedule(jobs.add, args=[2, 3], run_after=datetime.timedelta(days=1))
    assert job() == 5
    job.refresh_from_db()
    assert (job.status, job.result) == (Status.SUCCEEDED, 5)
    with pytest.raises(DjasyncError, match="succeeded"):
        job()


def test_calling_a_failing_job_records_the_failure_then_raises_it():
    job = djasync.schedule(jobs.write_then_raise, args=["call"])
    with pytest.raises(RuntimeError, match="boom after writing call"):
        job()
    job.refresh_from_db()
    assert (job.status, job.attempt_set.count(), Ledger.objects.count()) == (Status.PENDING, 1, 0)


def test_a_job_called_inside_a_transaction_commits_or_rolls_back_with_it():
    job = djasync.schedule(jobs.write_ledger, args=["nested"])
    with pytest.raises(RuntimeError), transaction.atomic():
        job()
        assert Ledger.objects.count() == 1
        raise RuntimeError("the request failed after calling the job")
    job.refresh_from_db()
    assert (job.status, Ledger.objects.count()) == (Status.PENDING, 0)


def test_on_commit_callbacks_of_a_failed_job_are_discarded():
    jobs.ON_COMMIT_CALLS.clear()
    job = djasync.schedule(jobs.on_commit_then_raise, args=["hook"], meta={"max_attempts": 1})
    executor.run_batch()
    assert jobs.ON_COMMIT_CALLS == []
    job2 = djasync.schedule(jobs.on_commit_then_return, args=["hook2"])
    executor.run_batch()
    assert jobs.ON_COMMIT_CALLS == ["hook2"]
    assert {job.pk, job2.pk} == set(Job.objects.values_list("pk", flat=True))


def test_a_job_that_swallows_a_database_error_is_a_failed_attempt_not_a_silent_success():
    job = djasync.schedule(jobs.swallow_integrity_error, args=["lost"], meta={"max_attempts": 1})
    [finished] = executor.run_batch()
    assert (finished.outcome, finished.status) == (Outcome.ERROR, Status.FAILED)
    assert "writes are lost" in finished.error
    assert Ledger.objects.count() == 0
    assert job.attempt_set.get().exception_type == "djasync.executor.JobWritesLost"


def test_calling_a_job_inside_a_transaction_leaves_its_timeouts_alone():
    job = djasync.schedule(jobs.add, args=[1, 1], meta={"timeout": 30})
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL statement_timeout = '2s'")
        assert job() == 2
        with connection.cursor() as cursor:
            cursor.execute("SHOW statement_timeout")
            assert cursor.fetchone()[0] == "2s"


def test_calling_a_final_job_before_its_group_is_done_says_why():
    member = djasync.schedule(jobs.add, args=[1, 1], group="g")
    final = member.group.on_completion(djasync.schedule(jobs.add, args=[2, 2]))
    with pytest.raises(DjasyncError, match="other jobs of the group are pending"):
        final()


def test_an_attempt_committed_by_the_previous_holder_of_the_row_is_counted(other_connection):
    # The claim's snapshot may predate the attempt the previous holder committed just before
    # releasing the row: the attempt number must still be right.
    job = djasync.schedule(jobs.always_raise, meta={"max_attempts": 5})
    with other_connection.transaction():
        other_connection.execute(
            "INSERT INTO djasync_attempt (job_id, number, started_at, finished_at, outcome, "
            "exception_type, exception_message, traceback, worker) "
            "VALUES (%s, 1, now(), now(), 'crashed', '', '', '', 'w')", [job.pk])
    [finished] = executor.run_batch()
    assert finished.attempt == 2
    assert list(job.attempt_set.values_list("number", flat=True)) == [1, 2]


def test_a_job_can_read_its_own_run_through_current_job():
    job = djasync.schedule(jobs.report_current_job, meta={"max_attempts": 4}, queue="q1",
                           priority=7)
    [finished] = executor.run_batch()
    assert finished.result == {"id": job.pk, "name": "tests.jobs.report_current_job",
                               "queue": "q1", "priority": 7, "attempt": 1, "max_attempts": 4}
    assert executor.current_job() is None


def test_an_async_job_runs_and_its_writes_commit_with_it():
    job = djasync.schedule(jobs.async_write_ledger, args=["async"])
    [finished] = executor.run_batch()
    assert (finished.outcome, finished.result) == (Outcome.SUCCEEDED, "async")
    assert list(Ledger.objects.values_list("key", flat=True)) == ["async"]
    assert Job.objects.get(pk=job.pk).status == Status.SUCCEEDED


def test_an_async_job_that_raises_rolls_back_its_writes():
    djasync.schedule(jobs.async_write_then_raise, args=["gone"], meta={"max_attempts": 1})
    [finished] = executor.run_batch()
    assert (finished.outcome, finished.status) == (Outcome.ERROR, Status.FAILED)
    assert Ledger.objects.count() == 0


def _prepared_by_name() -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT name, statement FROM pg_prepared_statements")
        return dict(cursor.fetchall())


def test_the_claim_and_the_finish_are_prepared_once_per_connection():
    """Django turns psycopg's prepared statements off; without them PostgreSQL plans the
    claim for every job. djasync prepares its own per-job statements and nothing else."""
    connection.close()
    for key in "abcd":
        djasync.schedule(jobs.write_ledger, args=[key])
    assert len(executor.drain()) == 4
    assert [f.outcome for f in executor.run_batch(5)] == []
    by_name = _prepared_by_name()
    prepared = list(by_name.values())
    assert sum("FOR NO KEY UPDATE OF j SKIP LOCKED" in s for s in prepared) == 2  # limits 1, 5
    assert sum("WITH job AS (\n    UPDATE djasync_job" in s for s in prepared) == 1  # the finish
    assert sum("INSERT INTO djasync_job" in s for s in prepared) == 1  # schedule()
    # The transaction's own statements before the job runs too (protocol-level, as pgbench
    # -M prepared does); not those after its code (see the next test).
    claim_settings = sql.CLAIM_SETTINGS.replace("%(statement)s", "$1").replace("%(idle)s", "$2")
    for statement in ("BEGIN", 'SAVEPOINT "djasync_job"', claim_settings, *sql.CLAIM_PLAN_DONE):
        assert prepared.count(statement) == 1, statement
    assert "COMMIT" not in prepared
    assert 'RELEASE SAVEPOINT "djasync_job"' not in prepared
    assert not any("tests_ledger" in s for s in prepared)  # the job's own statement is not
    assert all(name.startswith("djasync_") for name in by_name)


def test_prepared_statements_dropped_by_someone_else_are_prepared_again():
    """DEALLOCATE ALL or DISCARD ALL (someone's code, a pooler) drops djasync's prepared
    statements: the one transaction that finds them gone fails and rolls back, whole and
    loudly; the next one prepares them again."""
    djasync.schedule(jobs.write_ledger, args=["a"])
    assert [f.outcome for f in executor.drain()] == [Outcome.SUCCEEDED]
    with connection.cursor() as cursor:
        cursor.execute("DISCARD ALL")
    with pytest.raises(ProgrammingError, match="does not exist"):
        djasync.schedule(jobs.write_ledger, args=["lost"])
    djasync.schedule(jobs.write_ledger, args=["b"])
    assert [f.outcome for f in executor.drain()] == [Outcome.SUCCEEDED]
    djasync.schedule(jobs.write_ledger, args=["c"])
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    with pytest.raises(ProgrammingError, match="does not exist"):
        executor.run_batch()
    assert [f.outcome for f in executor.drain()] == [Outcome.SUCCEEDED]
    assert sorted(Ledger.objects.values_list("key", flat=True)) == ["a", "b", "c"]
    assert Job.objects.count() == 3  # the failed schedule() left nothing


def test_a_job_that_drops_the_prepared_statements_then_fails_still_has_its_failure_recorded():
    """The statements after a job's code (RELEASE, COMMIT) are sent unprepared: the job's
    failure, written before them, commits; the next claim prepares everything again."""
    djasync.schedule(jobs.write_ledger, args=["warm-up"])  # everything prepared once
    assert [f.outcome for f in executor.drain()] == [Outcome.SUCCEEDED]
    job = djasync.schedule(jobs.deallocate_then_raise, args=["x"], meta={"max_attempts": 1})
    djasync.schedule(jobs.write_ledger, args=["after"])
    assert [f.outcome for f in executor.run_batch(1)] == [Outcome.ERROR]
    job.refresh_from_db()
    assert (job.status, job.attempt_set.count()) == (Status.FAILED, 1)
    # As after any DEALLOCATE ALL: the next transaction finds its statements gone and rolls
    # back, unstarted; the one after prepares them again.
    with pytest.raises(ProgrammingError, match="does not exist"):
        executor.drain()
    assert [f.outcome for f in executor.drain()] == [Outcome.SUCCEEDED]
    assert sorted(Ledger.objects.values_list("key", flat=True)) == ["after", "warm-up"]


@pytest.mark.parametrize("threshold", [None, 5])
def test_prepare_threshold_in_the_database_options_means_no_prepared_statements(threshold):
    """``prepare_threshold: None`` says a PgBouncer that cannot keep prepared statements is in
    front; a number turns psycopg's own on (and its DEALLOCATE ALL after a ROLLBACK). Either
    way djasync prepares nothing of its own, and jobs still run."""
    options = connection.settings_dict["OPTIONS"]
    connection.close()
    options["prepare_threshold"] = threshold
    try:
        djasync.schedule(jobs.write_ledger, args=["x"])
        djasync.schedule(jobs.write_then_raise, args=["y"], meta={"max_attempts": 1})
        assert sorted(f.outcome for f in executor.drain()) == [Outcome.ERROR, Outcome.SUCCEEDED]
        assert not any(name.startswith("djasync_") for name in _prepared_by_name())
    finally:
        del options["prepare_threshold"]
        connection.close()


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "3"])
def test_a_claim_limit_that_is_not_a_positive_integer_is_refused(limit):
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        executor.run_batch(limit)


def test_a_direct_connection_takes_the_default_job_timeouts_as_its_sessions_own():
    """Straight to PostgreSQL (its session is the one the connection was given a key for),
    the worker also makes the default timeouts the session's, for a long job's statements;
    behind a pooler nothing is set (tests/test_pgbouncer.py)."""
    try:
        assert executor.set_session_timeouts_if_direct() is True
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('statement_timeout'),"
                           " current_setting('idle_in_transaction_session_timeout')")
            assert cursor.fetchone() == ("5min", "310s")
    finally:
        connection.close()  # the next test gets a session without them
