"""A job whose success cannot be written: the finish statement, the RELEASE before it or the
COMMIT after it fails because of what the job did (a deferred trigger that raises, a search
path or a role that hides djasync's tables, a database error the job caught itself). Each
must end as a failed attempt, recorded in a new transaction with the real error, so that
``max_attempts`` bounds it; the innocent jobs of its batch must succeed, once each."""

from __future__ import annotations

from io import StringIO

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import Count

import djasync
from djasync import executor
from djasync.models import Attempt, Job, Outcome, Status
from tests import finish_jobs, jobs
from tests.daemon import run_worker
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def rejected_at_commit(other_connection):
    """A DEFERRABLE INITIALLY DEFERRED constraint trigger that raises (P0001) at COMMIT for
    ledger rows whose key starts with ``finish_jobs.REJECTED``."""
    other_connection.execute(f"""
        CREATE FUNCTION djasync_test_reject() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.key LIKE '{finish_jobs.REJECTED}%' THEN
                RAISE EXCEPTION 'ledger row % refused at commit', NEW.key;
            END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER djasync_test_reject AFTER INSERT ON tests_ledger
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION djasync_test_reject();
    """)
    yield
    other_connection.execute("DROP TRIGGER djasync_test_reject ON tests_ledger;"
                             " DROP FUNCTION djasync_test_reject()")


@pytest.fixture
def limited_role(other_connection):
    """A role that may not read or write djasync's tables (but may use the ledger)."""
    name = f"djasync_limited_{connection.settings_dict['NAME']}"[:63]
    other_connection.execute(f'DROP ROLE IF EXISTS "{name}"')
    other_connection.execute(f'CREATE ROLE "{name}"')
    other_connection.execute(f'GRANT "{name}" TO CURRENT_USER')
    other_connection.execute(f'GRANT ALL ON tests_ledger, tests_ledger_id_seq TO "{name}"')
    yield name
    other_connection.execute(f'REVOKE ALL ON tests_ledger, tests_ledger_id_seq FROM "{name}"')
    other_connection.execute(f'DROP ROLE "{name}"')


#: (job function, its arguments, a fragment of the error its attempts must record)
CULPRITS = {
    "rejected-at-commit": (finish_jobs.write_rejected_at_commit, ["bad"],
                           "refused at commit"),
    "set-local-search-path": (finish_jobs.write_then_leave_search_path, ["bad"],
                              'relation "djasync_job" does not exist'),
    "session-search-path": (finish_jobs.write_then_leave_search_path, ["bad", False],
                            'relation "djasync_job" does not exist'),
    "raw-caught-error": (finish_jobs.catch_an_error_on_the_raw_connection, ["bad"],
                         "writes are lost"),
}


def schedule_culprit(kind: str, priority: int = 0):
    function, args, _ = CULPRITS[kind]
    return djasync.schedule(function, args=args, priority=priority,
                            meta={"max_attempts": 2, "backoff": 0}).pk


def statuses(ids):
    rows = dict(Job.objects.filter(pk__in=ids).values_list("pk", "status"))
    return [rows[i] for i in ids]


def ledger_counts():
    return dict(Ledger.objects.values_list("key").annotate(n=Count("id")))


def run_batches_at_most(limit: int, batches: int = 40) -> list[tuple[int, Outcome]]:
    """``executor.run_batches`` until nothing is due, or stop after ``batches`` batches (a
    job that runs again and again would otherwise keep the test busy for ever)."""
    seen: list[tuple[int, Outcome]] = []
    count = 0

    def on_batch(batch):
        nonlocal count
        count += 1
        seen.extend((f.job_id, f.outcome) for f in batch)
        return count < batches

    executor.run_batches(limit, on_batch)
    return seen


def assert_failed_for_good(job_id: int, kind: str) -> None:
    errors = list(Attempt.objects.filter(job_id=job_id).order_by("number")
                  .values_list("outcome", "exception_message"))
    assert len(errors) == 2, errors
    assert all(outcome == Outcome.ERROR and CULPRITS[kind][2] in message
               for outcome, message in errors), errors
    assert Job.objects.get(pk=job_id).status == Status.FAILED


@pytest.mark.usefixtures("rejected_at_commit")
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", CULPRITS)
def test_a_job_whose_success_cannot_be_written_fails_after_max_attempts_and_its_batch_mates_succeed(
        kind, batch):
    good = [djasync.schedule(jobs.write_ledger, args=[f"good-{i}"]).pk for i in range(4)]
    bad = schedule_culprit(kind, priority=1)  # first in its batch's claim order
    outcomes = run_batches_at_most(batch)
    assert_failed_for_good(bad, kind)
    assert [o for j, o in outcomes if j == bad] == [Outcome.ERROR, Outcome.ERROR]
    assert statuses(good) == [Status.SUCCEEDED] * 4
    assert ledger_counts() == {f"good-{i}": 1 for i in range(4)}
    assert Attempt.objects.exclude(job_id=bad).filter(outcome=Outcome.SUCCEEDED).count() == 4
    assert not Attempt.objects.exclude(job_id=bad).exclude(outcome=Outcome.SUCCEEDED).exists()
    # The worker's connection is usable and clean for what comes next.
    later = djasync.schedule(jobs.write_ledger, args=["later"]).pk
    assert run_batches_at_most(batch) == [(later, Outcome.SUCCEEDED)]


@pytest.mark.usefixtures("rejected_at_commit")
@pytest.mark.parametrize("kind", CULPRITS)
def test_flush_queue_records_a_success_that_cannot_be_written_as_a_failed_attempt(kind):
    bad = schedule_culprit(kind, priority=1)
    good = djasync.schedule(jobs.write_ledger, args=["good"]).pk
    out = StringIO()
    with pytest.raises(CommandError, match="1 jobs failed for good"):
        call_command("flush_queue", stdout=out, stderr=StringIO())
    assert_failed_for_good(bad, kind)
    assert statuses([good]) == [Status.SUCCEEDED]
    assert ledger_counts() == {"good": 1}
    assert out.getvalue().splitlines()[-1] == (
        "3 attempts: 1 succeeded, 1 failed and will be retried, 1 failed for good")


@pytest.mark.parametrize("limits", [None, {"solo": {"concurrency": 1}}])
def test_a_job_that_drops_the_prepared_finish_statement_gets_a_failed_attempt_not_a_rerun(
        settings, limits):
    """DEALLOCATE ALL in a job: its finish statement, prepared before, is gone (with LIMITS,
    the wake-up call before it too). The failure is recorded on a new connection, which has
    nothing stale for the next job."""
    if limits:
        settings.DJASYNC = {**settings.DJASYNC, "LIMITS": limits}
    djasync.schedule(jobs.write_ledger, args=["warm-up"])  # every statement prepared once
    executor.drain()
    bad = djasync.schedule(finish_jobs.write_then_deallocate_all, args=["bad"],
                           meta={"max_attempts": 1}).pk
    [finished] = executor.drain()
    assert (finished.job_id, finished.outcome, finished.status) == (
        bad, Outcome.ERROR, Status.FAILED)
    assert "does not exist" in Attempt.objects.get(job_id=bad).exception_message
    later = djasync.schedule(jobs.write_ledger, args=["later"]).pk
    assert [(f.job_id, f.outcome) for f in executor.drain()] == [(later, Outcome.SUCCEEDED)]
    assert ledger_counts() == {"warm-up": 1, "later": 1}


@pytest.mark.parametrize("batch", [1, 3])
def test_a_job_that_switches_to_a_role_without_rights_on_djasync_fails_and_later_jobs_run(
        limited_role, batch):
    bad = djasync.schedule(finish_jobs.write_then_set_role, args=["bad", limited_role],
                           meta={"max_attempts": 2, "backoff": 0}, priority=1).pk
    good = [djasync.schedule(jobs.write_ledger, args=[f"good-{i}"]).pk for i in range(3)]
    run_batches_at_most(batch)
    messages = list(Attempt.objects.filter(job_id=bad).values_list("exception_message",
                                                                   flat=True))
    assert len(messages) == 2 and all("permission denied" in m for m in messages), messages
    assert statuses([bad, *good]) == [Status.FAILED] + [Status.SUCCEEDED] * 3
    assert ledger_counts() == {f"good-{i}": 1 for i in range(3)}
    with connection.cursor() as cursor:  # the role did not outlive the job
        cursor.execute("SELECT current_user = session_user")
        assert cursor.fetchone() == (True,)


def test_a_job_left_in_an_aborted_transaction_is_caught_before_its_release():
    """No round trip needed: psycopg knows the transaction status after each statement."""
    bad = schedule_culprit("raw-caught-error")
    [finished] = executor.run_batch()
    assert (finished.job_id, finished.outcome, finished.status) == (
        bad, Outcome.ERROR, Status.PENDING)
    attempt = Attempt.objects.get(job_id=bad)
    assert attempt.exception_type == "djasync.executor.JobWritesLost"
    assert connection.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert Ledger.objects.count() == 0


@pytest.mark.daemon
@pytest.mark.usefixtures("rejected_at_commit")
def test_the_daemon_fails_a_job_whose_success_cannot_be_written_and_finishes_its_batch_mates():
    culprits = [schedule_culprit(kind) for kind in CULPRITS]
    good = [djasync.schedule(jobs.write_ledger, args=[f"good-{i}"]).pk for i in range(12)]
    result = run_worker("--concurrency", "1", "--batch-size", "3", "--burst", timeout=120)
    assert result.returncode == 0, result.stderr
    for kind, bad in zip(CULPRITS, culprits, strict=True):
        assert_failed_for_good(bad, kind)
    assert statuses(good) == [Status.SUCCEEDED] * 12
    assert ledger_counts() == {f"good-{i}": 1 for i in range(12)}


@pytest.mark.daemon
@pytest.mark.usefixtures("rejected_at_commit")
def test_a_child_that_closes_its_own_session_after_lost_writes_is_not_fenced(tmp_path):
    """``executor.BEFORE_DELIBERATE_CLOSE``: a job whose success cannot be written has its
    session closed by the executor itself (the rollback undoes the job's transactional
    changes, the close the rest), and its failure written on a new connection. The child
    tells the supervisor first, through that hook: else the fence would see the session end
    while the job is published as running in it, kill the child as cut off from its job, and
    the run would be neither charged nor recorded (the job running again and again)."""
    from tests.daemon import start_worker, stop, wait_for

    log = tmp_path / "worker.log"
    worker = start_worker("--concurrency", "1", "--poll-interval", "0.2", log=log)
    try:
        culprits = [schedule_culprit("rejected-at-commit") for _ in range(5)]
        wait_for(lambda: statuses(culprits) == [Status.FAILED] * 5, timeout=60,
                 what="the culprits to fail")
        for bad in culprits:
            assert_failed_for_good(bad, "rejected-at-commit")
        text = log.read_text()
        assert "database session ended while it ran" not in text, text[-3000:]
        assert "its database session had ended" not in text, text[-3000:]
        assert text.count("child started slot=0") == 1, text[-3000:]  # never replaced
    finally:
        assert stop(worker) == 0, log.read_text()[-3000:]
