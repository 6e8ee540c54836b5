"""Where the claim meets other features: isolation levels, queue filters on a big backlog."""

import json

import psycopg
import pytest
from django.db import connection, transaction
from django.db.models import Count

import djasync
from djasync import executor, sql, wire
from djasync.models import Attempt, Job, Status
from tests import jobs
from tests.daemon import start_worker, worker_env
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.daemon
@pytest.mark.parametrize("isolation", ["REPEATABLE_READ", "SERIALIZABLE"])
def test_competing_children_under_a_stricter_isolation_level_log_no_error(tmp_path, isolation):
    """Under REPEATABLE READ a claim that meets a row finished by another child after its
    snapshot was taken failed with "could not serialize access", logged as an ERROR with a
    reconnect each time. Every job must still run exactly once, with no error logged."""
    # Half of them near max_attempts from the start: their attempts are recounted exactly.
    djasync.schedule_many([djasync.JobSpec(jobs.write_ledger, [f"k{i}"],
                                           meta={"max_attempts": 1 + i % 2 * 4})
                           for i in range(600)])
    log = tmp_path / "w.log"
    daemon = start_worker("--settings", "tests.settings_rr", "--concurrency", "3", "--burst",
                          log=log, env=worker_env(DJASYNC_TEST_ISOLATION=isolation))
    assert daemon.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "ERROR" not in text and "Traceback" not in text and "reconnect" not in text, text[-3000:]
    counts = dict(Ledger.objects.values_list("key").annotate(n=Count("id")))
    assert len(counts) == 600 and set(counts.values()) == {1}
    assert dict(Job.objects.values_list("status").annotate(n=Count("id"))) == {
        Status.SUCCEEDED: 600}
    assert Attempt.objects.count() == 600
    assert text.count("job starting") == 600  # no job transaction was cancelled and rerun


def test_the_worker_runs_jobs_at_repeatable_read_where_serializable_is_configured():
    """Serializable job transactions conflicted through the claims of the other workers; the
    worker's own transaction takes REPEATABLE READ instead, while the application's keep
    SERIALIZABLE (``schedule()`` may begin one)."""
    statements = wire.statements()
    raw = statements.raw
    saved = raw.isolation_level
    try:
        for level, worker_level in [("SERIALIZABLE", "REPEATABLE READ"),
                                    ("REPEATABLE_READ", "REPEATABLE READ"),
                                    ("READ_COMMITTED", "READ COMMITTED")]:
            raw.isolation_level = psycopg.IsolationLevel[level]
            assert statements.begin() == f"BEGIN ISOLATION LEVEL {level.replace('_', ' ')}"
            assert statements.begin(worker=True) == f"BEGIN ISOLATION LEVEL {worker_level}"
    finally:
        raw.isolation_level = saved


def test_a_claim_for_one_queue_walks_that_queue_alone_past_a_backlog_of_others():
    """``--queue mail`` with 300,000 due jobs in ``bulk`` read past all of them for each claim
    (110 ms instead of 0.3 ms). It walks ``djasync_job_claim_queue`` from its queue on, in the
    claim's order, whatever PostgreSQL's statistics say (the worker's plan is the generic one
    of its prepared statement)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, status,
                                     attempts, identity, created_at, worker, lease_owner)
            SELECT 'tests.jobs.add', '[1, 2]', '{}', '{}', q, (i % 5) - 2,
                   now() - interval '1 hour' + (i % 1000) * interval '1 second',
                   'pending', 0, '', now(), '', ''
              FROM generate_series(1, 20000) AS i,
                   LATERAL (SELECT CASE WHEN i % 4000 = 0 THEN 'mail' ELSE 'bulk' END AS q) q
            """
        )
        cursor.execute("ANALYZE djasync_job")
        claim = sql.claim(by_queue=True, by_name_prefix=False, one_queue=True)
        prepared = claim.replace("%(queues)s", "$1::text[]").replace("%(now)s", "$2")
        cursor.execute("PREPARE djasync_test_claim AS " + prepared)  # outlives transactions
        try:
            with transaction.atomic():
                for statement in (*sql.CLAIM_PLAN,
                                  "SET LOCAL plan_cache_mode = force_generic_plan"):
                    cursor.execute(statement)
                cursor.execute("EXPLAIN (ANALYZE, COSTS OFF) "
                               "EXECUTE djasync_test_claim('{mail}', NULL)")
                plan = "\n".join(row[0] for row in cursor.fetchall())
                transaction.set_rollback(True)
        finally:
            cursor.execute("DEALLOCATE djasync_test_claim")
    assert "Index Scan using djasync_job_claim_queue" in plan, plan
    assert "Index Cond: ((queue)::text = ($1)[1])" in plan, plan  # the queue bounds the walk
    assert "Sort" not in plan.split("SubPlan")[0], plan
    assert "Rows Removed by Filter" not in plan.split("SubPlan")[0], plan  # no bulk row read


def test_a_worker_serving_one_queue_runs_its_jobs_in_priority_order():
    """The one-queue claim keeps the claim's order (the index after its queue)."""
    low = djasync.schedule(jobs.add, args=[1, 1], queue="mail", priority=-5)
    high = djasync.schedule(jobs.add, args=[2, 2], queue="mail", priority=5)
    djasync.schedule(jobs.add, args=[3, 3], queue="bulk", priority=50)
    order = [f.job_id for f in executor.drain(queues=["mail"])]
    assert order == [high.pk, low.pk]
    assert Job.objects.get(queue="bulk").status == Status.PENDING


def test_the_poison_recount_sees_a_crash_committed_after_the_claims_snapshot(other_connection):
    """Under REPEATABLE READ the recount of a job near its max_attempts read the claiming
    transaction's snapshot, so a crash recorded (and the row's lock released) after that
    snapshot was taken went uncounted: the job ran once past max_attempts."""
    job = djasync.schedule(jobs.write_ledger, args=["poison"], meta={"max_attempts": 2})
    crash = ("INSERT INTO djasync_attempt (job_id, number, started_at, finished_at, outcome, "
             "exception_type, exception_message, traceback, worker) "
             "VALUES (%s, %s, now(), now(), 'crashed', 'djasync.exceptions.WorkerLost', "
             "'killed', '', 'w')")
    other_connection.execute(crash, [job.pk, 1])
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cursor.execute("SELECT count(*) FROM djasync_attempt")  # the snapshot is taken
        other_connection.execute(crash, [job.pk, 2])  # the supervisor records a second crash
        try:
            [finished] = executor.run_batch(1)
        finally:
            counter = getattr(executor._counter, "connection", None)
            if counter is not None:  # the recount's own connection (see executor._recount)
                counter.close()
    assert finished.status == Status.FAILED
    assert not Ledger.objects.exists()  # it did not run a third time
    assert Job.objects.get(pk=job.pk).status == Status.FAILED



def _fill_bulk(cursor, jobs_in_bulk: int) -> None:
    """``jobs_in_bulk`` due jobs in queue ``bulk``, ranked before every job scheduled later."""
    cursor.execute(
        """
        INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, status,
                                 attempts, identity, created_at, worker, lease_owner)
        SELECT 'tests.jobs.add', '[1, 2]', '{}', '{}', 'bulk', 0,
               now() - interval '1 hour' + (i %% 1000) * interval '1 second',
               'pending', 0, '', now(), '', ''
          FROM generate_series(1, %s) AS i
        """,
        [jobs_in_bulk],
    )


def _claim_buffers(queues: list[str], limit: int) -> tuple[int, list[str]]:
    """The shared buffers that the worker's claim for ``queues`` reads (its prepared
    statement's generic plan, under the claim's plan settings, caches warm), and the queues of
    the jobs it claims; rolled back."""
    claim = sql.claim(by_queue=True, by_name_prefix=False, limit=limit,
                      one_queue=len(queues) == 1)
    prepared = claim.replace("%(queues)s", "$1::text[]").replace("%(now)s", "$2")
    execute = "EXECUTE djasync_test_claim(%s, NULL)"
    with connection.cursor() as cursor:
        cursor.execute("PREPARE djasync_test_claim AS " + prepared)  # outlives transactions
        try:
            for explain in ("", "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "):
                with transaction.atomic():
                    for statement in (*sql.CLAIM_PLAN,
                                      "SET LOCAL plan_cache_mode = force_generic_plan"):
                        cursor.execute(statement)
                    cursor.execute(explain + execute, [queues])
                    result = cursor.fetchall()
                    transaction.set_rollback(True)
        finally:
            cursor.execute("DEALLOCATE djasync_test_claim")
    plan = result[0][0]
    [plan] = json.loads(plan) if isinstance(plan, str) else plan
    with transaction.atomic():
        claimed = [job.queue for job in executor.claim(limit, queues=queues)]
        transaction.set_rollback(True)
    top = plan["Plan"]
    return top["Shared Hit Blocks"] + top["Shared Read Blocks"], claimed


def test_a_claim_for_several_queues_reads_a_few_pages_past_a_backlog_of_others():
    """``--queue mail --queue sms`` with 300,000 due jobs in ``bulk`` read past all of them for
    each claim (256 ms instead of 1 ms), filtering ``djasync_job_claim`` by queue. It reads a
    few pages of each served queue's own index instead, whatever the backlog elsewhere: here
    20,000 jobs (about 20,000 pages read by the old claim)."""
    with connection.cursor() as cursor:
        _fill_bulk(cursor, 20000)
    low = djasync.schedule(jobs.add, args=[1, 1], queue="mail", priority=-2)
    high = djasync.schedule(jobs.add, args=[2, 2], queue="sms", priority=-1)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE djasync_job")
    for limit, expected in [(1, ["sms"]), (5, ["sms", "mail"])]:
        buffers, claimed = _claim_buffers(["mail", "sms"], limit)
        assert claimed == expected
        assert buffers < 100, buffers
    assert (low.queue, high.queue) == ("mail", "sms")
    # The one-queue claim stays as cheap (its own index, see the test above).
    buffers, claimed = _claim_buffers(["mail"], 1)
    assert claimed == ["mail"] and buffers < 100, buffers
