"""The worker's chained transactions (``executor.run_batches``): each batch's finish message
also claims the next batch, so a job costs one round trip. What must hold: every job still
runs once, in its own transaction, reported only after its COMMIT; the next jobs are locked
(no other worker can take them) from that moment; jobs claimed but not wanted are rolled back
unstarted; and nothing that must run outside a transaction (``on_commit`` callbacks, long jobs)
ever runs inside the next one."""

import psycopg
import pytest
from django.db import DatabaseError, connection

import djasync
from djasync import executor, wire
from djasync.models import Attempt, Job, Outcome, Status
from tests import jobs
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)


def schedule_ledger(*keys, **options):
    return [djasync.schedule(jobs.write_ledger, args=[key], **options).pk for key in keys]


def unlocked_pending(conn):
    """Pending jobs another worker could claim right now (it skips locked rows)."""
    return [row[0] for row in conn.execute(
        "SELECT id FROM djasync_job WHERE status = 'pending' ORDER BY id "
        "FOR NO KEY UPDATE SKIP LOCKED").fetchall()]


def statuses(conn, ids):
    rows = dict(conn.execute("SELECT id, status FROM djasync_job WHERE id = ANY(%s)",
                             [ids]).fetchall())
    return [rows[i] for i in ids]


def assert_connection_idle():
    assert not connection.in_atomic_block and connection.get_autocommit()
    assert connection.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_each_batch_is_committed_when_reported_and_the_next_one_is_already_locked(
        other_connection):
    ids = schedule_ledger("a", "b", "c", "d", "e")
    seen = []

    def on_batch(batch):
        # Read by another session while the chain holds the next claim open.
        seen.append(([f.job_id for f in batch], statuses(other_connection, ids),
                     unlocked_pending(other_connection)))
        return True

    executor.run_batches(1, on_batch)
    done = "succeeded"
    assert seen == [
        ([ids[0]], [done, "pending", "pending", "pending", "pending"], ids[2:]),
        ([ids[1]], [done, done, "pending", "pending", "pending"], ids[3:]),
        ([ids[2]], [done, done, done, "pending", "pending"], ids[4:]),
        ([ids[3]], [done, done, done, done, "pending"], []),
        ([ids[4]], [done] * 5, []),
    ]
    assert sorted(Ledger.objects.values_list("key", flat=True)) == ["a", "b", "c", "d", "e"]
    assert Attempt.objects.filter(outcome=Outcome.SUCCEEDED).count() == 5
    assert_connection_idle()
    assert unlocked_pending(other_connection) == []


def test_batches_of_several_jobs_chain_too():
    ids = schedule_ledger(*"abcdefg")
    sizes = []
    executor.run_batches(3, lambda batch: sizes.append([f.job_id for f in batch]) or True)
    assert sizes == [ids[0:3], ids[3:6], ids[6:7]]
    assert Ledger.objects.count() == 7
    assert_connection_idle()


def test_stopping_rolls_the_next_claim_back_and_leaves_those_jobs_untouched(other_connection):
    ids = schedule_ledger("a", "b", "c")
    reported = []
    executor.run_batches(1, lambda batch: reported.extend(f.job_id for f in batch) and False)
    assert reported == [ids[0]]
    assert_connection_idle()
    # The job claimed for the next batch was never started: no attempt, no effect, no lock.
    assert statuses(other_connection, ids) == ["succeeded", "pending", "pending"]
    assert list(Attempt.objects.values_list("job_id", flat=True)) == [ids[0]]
    assert list(Ledger.objects.values_list("key", flat=True)) == ["a"]
    assert unlocked_pending(other_connection) == ids[1:]
    assert Job.objects.get(pk=ids[1]).attempts == 0


def test_on_commit_callbacks_run_after_their_commit_outside_any_transaction():
    jobs.AFTER_COMMIT_SEEN.clear()
    first = schedule_ledger("a")
    hooked = djasync.schedule(jobs.write_after_commit, args=["hooked"]).pk
    last = schedule_ledger("z")
    reported = []
    executor.run_batches(1, lambda batch: reported.extend(f.job_id for f in batch) or True)
    assert reported == [*first, hooked, *last]
    # Not in the next job's transaction: its row would then depend on that job's fate.
    assert jobs.AFTER_COMMIT_SEEN == [("hooked", False, "IDLE")]
    assert sorted(Ledger.objects.values_list("key", flat=True)) == [
        "a", "hooked", "hooked after commit", "z"]
    assert_connection_idle()


def test_a_failing_job_is_recorded_and_the_chain_goes_on():
    failing = djasync.schedule(jobs.write_then_raise, args=["lost"],
                               meta={"max_attempts": 1}).pk
    fine = schedule_ledger("kept")
    outcomes = []
    executor.run_batches(1, lambda batch: outcomes.extend(
        (f.job_id, f.outcome) for f in batch) or True)
    assert outcomes == [(failing, Outcome.ERROR), (fine[0], Outcome.SUCCEEDED)]
    assert list(Ledger.objects.values_list("key", flat=True)) == ["kept"]
    assert Job.objects.get(pk=failing).status == Status.FAILED
    assert_connection_idle()


def test_a_long_job_runs_after_its_claim_committed_then_the_chain_resumes(other_connection):
    before = schedule_ledger("before")
    long = djasync.schedule(jobs.long_job, args=["long"], meta={"atomic": False}).pk
    after = schedule_ledger("after")
    reported = []
    executor.run_batches(1, lambda batch: reported.extend(
        (f.job_id, f.outcome) for f in batch) or True)
    assert reported == [(before[0], Outcome.SUCCEEDED), (long, Outcome.SUCCEEDED),
                        (after[0], Outcome.SUCCEEDED)]
    assert sorted(Ledger.objects.values_list("key", flat=True)) == ["after", "before", "long"]
    assert statuses(other_connection, [*before, long, *after]) == ["succeeded"] * 3
    assert_connection_idle()


def test_a_claim_failing_after_the_commit_keeps_the_committed_job_and_the_next_run_recovers(
        other_connection):
    dropper = djasync.schedule(jobs.drop_the_claim_statement, args=["dropper"]).pk
    later = schedule_ledger("later")
    reported = []
    with pytest.raises(DatabaseError, match="does not exist"):
        executor.run_batches(1, lambda batch: reported.extend(f.job_id for f in batch) or True)
    # The COMMIT went through before the claim failed: the job is done, once.
    assert reported == []
    assert statuses(other_connection, [dropper, *later]) == ["succeeded", "pending"]
    assert list(Attempt.objects.values_list("job_id", flat=True)) == [dropper]
    assert_connection_idle()
    executor.run_batches(1, lambda batch: reported.extend(f.job_id for f in batch) or True)
    assert reported == later
    assert sorted(Ledger.objects.values_list("key", flat=True)) == ["dropper", "later"]


def django_books():
    raw = connection.connection
    return (connection.in_atomic_block, list(connection.savepoint_ids),
            connection.needs_rollback, list(connection.run_on_commit),
            connection.get_autocommit(), raw.autocommit, raw.info.transaction_status.name)


CLEAN_BOOKS = (False, [], False, [], True, True, "IDLE")


def test_a_keyboard_interrupt_in_a_chained_job_rolls_back_only_that_job(other_connection):
    first = schedule_ledger("first")
    bad = djasync.schedule(jobs.raise_keyboard_interrupt, args=["bad"]).pk
    reported = []
    with pytest.raises(KeyboardInterrupt):
        executor.run_batches(1, lambda batch: reported.extend(f.job_id for f in batch) or True)
    assert reported == first
    assert django_books() == CLEAN_BOOKS
    assert statuses(other_connection, [*first, bad]) == ["succeeded", "pending"]
    assert list(Attempt.objects.values_list("job_id", flat=True)) == first
    assert list(Ledger.objects.values_list("key", flat=True)) == ["first"]
    assert unlocked_pending(other_connection) == [bad]


def test_a_job_calling_sys_exit_fails_like_any_error():
    job = djasync.schedule(jobs.exit_process_politely, args=["x"], meta={"max_attempts": 1}).pk
    outcomes = []
    executor.run_batches(1, lambda batch: outcomes.extend(batch) or True)
    [finished] = outcomes
    assert (finished.job_id, finished.outcome, finished.status) == (
        job, Outcome.ERROR, Status.FAILED)
    assert finished.error == "SystemExit: 3"
    assert Ledger.objects.count() == 0  # its write rolled back with its savepoint


def test_a_stop_before_a_long_job_gives_its_lease_back(other_connection):
    long = djasync.schedule(jobs.long_job, args=["long"], meta={"atomic": False}).pk

    class Stop(Exception):
        pass

    def stop(job):
        raise Stop

    with pytest.raises(Stop):
        executor.run_batches(1, lambda batch: True, before_each=stop)
    # Claimable again at once, not when the lease (taken in the claim) would have expired.
    row = other_connection.execute(
        "SELECT status, lease_owner, lease_expires, attempts FROM djasync_job WHERE id = %s",
        [long]).fetchone()
    assert row == ("pending", "", None, 0)
    assert Ledger.objects.count() == 0


@pytest.mark.parametrize("batch", [1, 3])
def test_a_job_whose_commit_is_refused_gets_a_failed_attempt_not_endless_reruns(
        batch, other_connection):
    """Its writes break a constraint checked at COMMIT: nothing of its transaction is kept, so
    the failure is recorded in a new one. In a batch, the batch is refused as a whole; the next
    jobs then run one at a time, which finds the culprit alone."""
    bad = djasync.schedule(jobs.reference_a_missing_job, args=["bad"],
                           meta={"max_attempts": 2, "backoff": 0}).pk
    good = schedule_ledger("good-1", "good-2")
    outcomes = []
    executor.run_batches(batch, lambda b: outcomes.extend((f.job_id, f.outcome) for f in b)
                         or True)
    # The retry (backoff 0) is due after the good jobs, which were scheduled before it.
    assert outcomes == [(bad, Outcome.ERROR), *[(pk, Outcome.SUCCEEDED) for pk in good],
                        (bad, Outcome.ERROR)]
    assert statuses(other_connection, [bad, *good]) == ["failed", "succeeded", "succeeded"]
    errors = list(Attempt.objects.filter(job_id=bad).values_list("exception_message", flat=True))
    assert len(errors) == 2 and all("violates foreign key constraint" in e for e in errors)
    assert sorted(Ledger.objects.values_list("key", flat=True)) == ["good-1", "good-2"]
    assert django_books() == CLEAN_BOOKS


@pytest.fixture
def without_pipeline_mode(monkeypatch):
    """As with a libpq older than 14: the statements go one round trip each."""
    monkeypatch.setattr(psycopg.Pipeline, "is_supported", classmethod(lambda cls: False))
    connection.close()  # the next connection's statements are made without pipeline mode
    yield
    connection.close()


def test_without_pipeline_mode_the_chain_keeps_every_guarantee(without_pipeline_mode,
                                                               other_connection):
    failing = djasync.schedule(jobs.write_then_raise, args=["lost"],
                               meta={"max_attempts": 1}).pk
    fine = schedule_ledger("kept")
    dropper = djasync.schedule(jobs.drop_the_claim_statement, args=["dropper"]).pk
    later = schedule_ledger("later")
    reported = []
    with pytest.raises(DatabaseError, match="does not exist"):
        executor.run_batches(1, lambda batch: reported.extend(
            (f.job_id, f.outcome) for f in batch) or True)
    assert reported == [(failing, Outcome.ERROR), (fine[0], Outcome.SUCCEEDED)]
    assert not wire.statements().pipeline
    # The COMMIT went through before the claim failed, and nothing after it ran.
    assert statuses(other_connection, [failing, *fine, dropper, *later]) == [
        "failed", "succeeded", "succeeded", "pending"]
    assert_connection_idle()
    executor.run_batches(1, lambda batch: reported.extend(
        (f.job_id, f.outcome) for f in batch) or True)
    assert reported[2:] == [(later[0], Outcome.SUCCEEDED)]
    assert sorted(Ledger.objects.values_list("key", flat=True)) == ["dropper", "kept", "later"]
