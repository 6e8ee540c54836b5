"""Where the claim meets other features: isolation levels, queue filters on a big backlog."""

import datetime
import json

import psycopg
import pytest
from django.db import connection, transaction
from django.db.models import Count
from django.utils import timezone

import djasync
from djasync import executor, sql, wire
from djasync.models import Attempt, Job, Status
from tests import jobs
from tests.conftest import conninfo
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
            executor.close_fresh_counter()  # the recount's own connection (executor._recount)
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
    few pages of each served queue's own index instead, whatever the backlog elsewhere (here
    20,000 jobs: about 20,000 pages read by the old claim) and whatever the statistics say
    (taken before the backlog came, then after)."""
    djasync.schedule(jobs.add, args=[1, 1], queue="mail", priority=-2)
    djasync.schedule(jobs.add, args=[2, 2], queue="sms", priority=-1)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE djasync_job")
        _fill_bulk(cursor, 20000)
    for analyze in (False, True):
        if analyze:
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE djasync_job")
        for limit, expected in [(1, ["sms"]), (5, ["sms", "mail"])]:
            buffers, claimed = _claim_buffers(["mail", "sms"], limit)
            assert claimed == expected
            assert buffers < 100, buffers
    # The one-queue claim stays as cheap (its own index, see the test above).
    buffers, claimed = _claim_buffers(["mail"], 1)
    assert claimed == ["mail"] and buffers < 100, buffers


def _claim_ids(limit: int, queues: list[str], **options) -> list[int]:
    """The jobs a claim for ``queues`` locks, best first; rolled back."""
    with transaction.atomic():
        ids = [job.id for job in executor.claim(limit, queues=queues, **options)]
        transaction.set_rollback(True)
    return ids


def test_a_claim_for_several_queues_takes_the_best_jobs_across_them_in_the_claims_order():
    def job(queue, priority, seconds_ago=60):
        due = timezone.now() - datetime.timedelta(seconds=seconds_ago)
        return djasync.schedule(jobs.add, args=[1, priority], queue=queue, priority=priority,
                                run_after=due).pk

    mail_1, mail_3 = job("mail", 1), job("mail", 3)
    sms_5, sms_minus_1, sms_3_older = job("sms", 5), job("sms", -1), job("sms", 3, 120)
    job("bulk", 50)
    expected = [sms_5, sms_3_older, mail_3, mail_1, sms_minus_1]
    assert _claim_ids(10, ["mail", "sms"]) == expected
    assert _claim_ids(2, ["sms", "mail"]) == expected[:2]
    assert _claim_ids(10, ["mail", "sms", "mail"]) == expected  # a queue named twice
    assert _claim_ids(10, ["mail", "nothing here"]) == [mail_3, mail_1]
    order = [f.job_id for f in executor.drain(queues=["mail", "sms"])]
    assert order == expected
    assert Job.objects.get(queue="bulk").status == Status.PENDING


def test_a_job_held_at_the_head_of_one_queue_is_passed_over_without_hiding_the_rest(
        other_connection):
    """A worker running the best job of ``mail`` holds its row: the claim takes the next
    best jobs, of both queues, in order."""
    mail = [djasync.schedule(jobs.add, args=[i, i], queue="mail", priority=10 - 2 * i).pk
            for i in range(3)]
    sms = djasync.schedule(jobs.add, args=[0, 0], queue="sms", priority=7).pk
    with other_connection.transaction():
        other_connection.execute("SELECT 1 FROM djasync_job WHERE id = %s FOR NO KEY UPDATE",
                                 [mail[0]])
        assert _claim_ids(1, ["mail", "sms"]) == [mail[1]]
        assert _claim_ids(5, ["mail", "sms"]) == [mail[1], sms, mail[2]]
    assert _claim_ids(5, ["mail", "sms"]) == [mail[0], mail[1], sms, mail[2]]


def test_a_claim_for_several_queues_finds_the_best_free_job_behind_many_held_ones(
        other_connection):
    """50 running jobs at the head of ``mail`` (more than the first look at each queue covers):
    the claim looks further until it knows that the best free job is ``mail``'s 51st, not the
    lower-priority job of ``sms`` it had seen."""
    held = djasync.schedule_many([djasync.JobSpec(jobs.add, [i, i], queue="mail", priority=9)
                                  for i in range(50)])
    next_in_mail = djasync.schedule(jobs.add, args=[0, 1], queue="mail", priority=5).pk
    sms = djasync.schedule(jobs.add, args=[0, 2], queue="sms", priority=1).pk
    with other_connection.transaction():
        other_connection.execute("SELECT 1 FROM djasync_job WHERE id = ANY(%s) "
                                 "FOR NO KEY UPDATE", [[job.pk for job in held]])
        assert _claim_ids(1, ["mail", "sms"]) == [next_in_mail]
        assert _claim_ids(3, ["sms", "mail"]) == [next_in_mail, sms]
        # A job taken before the claim looks further is not taken twice.
        first = djasync.schedule(jobs.add, args=[0, 3], queue="sms", priority=10).pk
        assert _claim_ids(3, ["sms", "mail"]) == [first, next_in_mail, sms]
    assert _claim_ids(3, ["sms", "mail"]) == [first, *(job.pk for job in held[:2])]


def test_a_claim_for_several_queues_locks_only_the_jobs_it_returns(other_connection):
    """Every other due job stays free for the other workers while the claiming transaction
    runs its job: no job is held hostage."""
    ids = {queue: [djasync.schedule(jobs.add, args=[i, i], queue=queue, priority=i).pk
                   for i in range(3)]
           for queue in ("a", "b", "c")}
    every = {pk for queue_ids in ids.values() for pk in queue_ids}
    with psycopg.connect(**conninfo(), autocommit=True) as third, third.transaction():
        third.execute("SELECT 1 FROM djasync_job WHERE id = %s FOR NO KEY UPDATE",
                      [ids["a"][2]])  # another worker runs a's best job
        for limit in (1, 2):
            with transaction.atomic():
                claimed = {job.id for job in executor.claim(limit, queues=["a", "b", "c"])}
                free = {pk for [pk] in other_connection.execute(
                    "SELECT id FROM djasync_job WHERE status = 'pending' "
                    "FOR NO KEY UPDATE SKIP LOCKED")}
                transaction.set_rollback(True)
            assert len(claimed) == limit and ids["a"][2] not in claimed
            assert free == every - claimed - {ids["a"][2]}


def test_a_claim_for_several_queues_respects_group_finals_leases_run_after_and_name_prefix():
    now = timezone.now()
    member = djasync.schedule(jobs.add, args=[1, 1], queue="sms", group="g").pk
    final = Job.objects.get(pk=member).group.on_completion(
        djasync.schedule(jobs.echo, queue="mail", priority=100)).pk
    leased = djasync.schedule(jobs.echo, args=["leased"], queue="mail", priority=90).pk
    expired = djasync.schedule(jobs.echo, args=["expired"], queue="mail", priority=80).pk
    Job.objects.filter(pk=leased).update(lease_owner="host:1/x",
                                         lease_expires=now + datetime.timedelta(hours=1))
    Job.objects.filter(pk=expired).update(lease_owner="host:2/y",
                                          lease_expires=now - datetime.timedelta(minutes=1))
    later = djasync.schedule(jobs.echo, queue="sms", priority=70,
                             run_after=datetime.timedelta(hours=1)).pk
    assert _claim_ids(10, ["mail", "sms"]) == [expired, member]
    assert _claim_ids(10, ["mail", "sms"], name_prefix="tests.jobs.echo") == [expired]
    assert _claim_ids(10, ["mail", "sms"], now=now + datetime.timedelta(hours=2)) == [
        expired, later, member]
    Job.objects.filter(pk=member).update(status=Status.SUCCEEDED)
    assert _claim_ids(10, ["mail", "sms"]) == [final, expired]


def test_a_claim_for_several_queues_reads_a_job_as_the_one_queue_claim_does():
    """The same columns, of the same types, as every other claim (the worker's readers)."""
    job = djasync.schedule(jobs.echo, args=[{"a": [1]}], kwargs={"k": None}, queue="mail",
                           priority=-3, meta={"max_attempts": 4}, group="g")
    Attempt.objects.create(job=job, number=1, started_at=job.run_after,
                           finished_at=job.run_after, outcome="crashed")
    Job.objects.filter(pk=job.pk).update(lease_expires=job.run_after)  # run out
    with transaction.atomic():
        [one] = executor.claim(5, queues=["mail"])
        transaction.set_rollback(True)
    with transaction.atomic():
        [several] = executor.claim(5, queues=["mail", "sms"])
        transaction.set_rollback(True)
    assert several == one
    assert (several.previous_attempts, several.lease_expired, several.due_at) == (
        1, True, job.run_after)


@pytest.mark.daemon
def test_a_worker_serving_two_queues_drains_both_and_leaves_the_others(tmp_path):
    djasync.schedule_many([djasync.JobSpec(jobs.write_ledger, [f"{queue}{i}"], queue=queue)
                           for queue in ("a", "b", "c") for i in range(30)])
    log = tmp_path / "w.log"
    daemon = start_worker("--queue", "a", "--queue", "b", "--concurrency", "2",
                          "--batch-size", "3", "--burst", log=log)
    assert daemon.wait(timeout=120) == 0, log.read_text()[-3000:]
    counts = dict(Ledger.objects.values_list("key").annotate(n=Count("id")))
    assert set(counts) == {f"{queue}{i}" for queue in ("a", "b") for i in range(30)}
    assert set(counts.values()) == {1}
    statuses = {(queue, status): n for queue, status, n in
                Job.objects.values_list("queue", "status").annotate(n=Count("id"))}
    assert statuses == {("a", Status.SUCCEEDED): 30, ("b", Status.SUCCEEDED): 30,
                        ("c", Status.PENDING): 30}


def test_a_thread_that_recounted_above_read_committed_leaves_no_session_behind():
    """The recount above READ COMMITTED asks a connection of the thread's own; a thread that
    ends (a web server's, a test's) closes it, instead of leaving an open session for the
    garbage collector to warn about (and a test database that cannot be dropped)."""
    import gc
    import threading

    job = djasync.schedule(jobs.write_ledger, ["x"], meta={"max_attempts": 1})

    def sessions():
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity "
                           "WHERE datname = current_database()")
            return cursor.fetchone()[0]

    counted = []

    def recount():
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                counted.append(executor._recount(job.pk))
        finally:
            connection.close()

    before = sessions()
    thread = threading.Thread(target=recount)
    thread.start()
    thread.join(30)
    gc.collect()
    assert counted == [0]
    deadline = timezone.now() + datetime.timedelta(seconds=10)
    while sessions() > before and timezone.now() < deadline:
        pass
    assert sessions() == before
