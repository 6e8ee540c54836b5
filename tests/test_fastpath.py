"""The worker's fast path (djasync.wire) must look to the job like any Django ``atomic``."""

import signal
import threading

import psycopg
import pytest
from django.db import DataError, OperationalError, connection

import djasync
from djasync import executor, wire
from djasync.models import Job, Outcome
from tests import jobs
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)


def read_transaction_isolation():
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('transaction_isolation')")
        return cursor.fetchone()[0]


def lock_rows_with_iterator(key):
    Ledger.objects.create(key=key)
    return [row.key for row in Ledger.objects.select_for_update().iterator(chunk_size=10)]


@pytest.mark.parametrize("level, name", [(3, "repeatable read"), (4, "repeatable read")])
def test_the_isolation_level_in_the_database_options_applies_to_the_workers_transaction(
        level, name):
    """Django's atomic begins with psycopg's BEGIN ISOLATION LEVEL …; so must the worker's,
    except that SERIALIZABLE runs jobs at REPEATABLE READ (see ``wire.Statements.begin``)."""
    options = connection.settings_dict["OPTIONS"]
    connection.close()
    options["isolation_level"] = level
    try:
        djasync.schedule(read_transaction_isolation)
        djasync.schedule(read_transaction_isolation)
        assert [f.result for f in executor.run_batch()] == [name]
        assert [f.result for f in executor.run_batch(5)] == [name]
    finally:
        del options["isolation_level"]
        connection.close()


def test_a_job_can_lock_rows_through_a_server_side_cursor():
    """psycopg's autocommit flag is off inside the job, as in any atomic block: Django's
    iterator() cursor is then not WITH HOLD, which PostgreSQL refuses with FOR UPDATE."""
    djasync.schedule(lock_rows_with_iterator, args=["a"])
    djasync.schedule(lock_rows_with_iterator, args=["b"])
    first = executor.run_batch()
    assert [(f.outcome, f.error, f.result) for f in first] == [(Outcome.SUCCEEDED, "", ["a"])]
    assert connection.get_autocommit() and connection.connection.autocommit
    [second] = executor.run_batch(3)
    assert (second.outcome, second.error) == (Outcome.SUCCEEDED, "")
    assert sorted(second.result) == ["a", "b"]
    assert connection.get_autocommit() and connection.connection.autocommit


def return_text(text, *codes):
    return text + "".join(map(chr, codes))  # schedule() refuses NUL and surrogates in args


def write_then_return_text(key, text, *codes):
    Ledger.objects.create(key=key)
    return return_text(text, *codes)


@pytest.mark.parametrize("codes", [[0], [0xD800], [0xDC00], [0xD83D, 0x41], [0xDE00, 0xD83D]])
def test_a_result_jsonb_cannot_store_is_a_failed_attempt_not_a_rolled_back_batch(codes):
    """jsonb refuses \\u0000 and unpaired surrogates. Found by the statement that writes the
    successes, the whole transaction rolled back with nothing recorded: the job (and its
    batch) ran again at every claim, forever."""
    poison = djasync.schedule(write_then_return_text, args=["poison", "x", *codes],
                              meta={"max_attempts": 1})
    fine = djasync.schedule(write_then_return_text, args=["fine", "ok"])
    finished = {f.job_id: f for f in executor.run_batch(5)}
    assert finished[poison.pk].outcome == Outcome.ERROR
    assert "jsonb cannot store" in finished[poison.pk].error
    assert finished[fine.pk].outcome == Outcome.SUCCEEDED
    assert list(Ledger.objects.values_list("key", flat=True)) == ["fine"]


@pytest.mark.parametrize("text, codes, stored", [
    ("\\u0000", [], "\\u0000"), ("\\\\u0000", [], "\\\\u0000"), ("\\ud800", [], "\\ud800"),
    ("\U0001f600", [], "\U0001f600"), ("", [0xD83D, 0xDE00], "\U0001f600"),
    ("é\\", [], "é\\"), ("it's \\' \"; --", [1], "it's \\' \"; --\x01"),
])
def test_results_jsonb_can_store_are_kept(text, codes, stored):
    djasync.schedule(return_text, args=[text, *codes])
    [finished] = executor.run_batch()
    assert finished.outcome == Outcome.SUCCEEDED, finished.error
    assert Job.objects.get(pk=finished.job_id).result == stored


@pytest.mark.parametrize("batch", [1, 3])
def test_a_job_that_deletes_its_own_row_commits_and_its_callbacks_run(batch):
    """Its success is written to no row after the COMMIT went through: nothing may raise then,
    or Django's atomic would drop the committed job's on_commit callbacks."""

    jobs.ON_COMMIT_CALLS.clear()
    djasync.schedule(jobs.delete_own_row, args=["gone"])
    djasync.schedule(jobs.write_ledger, args=["kept"])
    finished = executor.run_batch(batch) + (executor.run_batch(batch) if batch == 1 else [])
    assert [f.outcome for f in finished] == [Outcome.SUCCEEDED, Outcome.SUCCEEDED]
    assert jobs.ON_COMMIT_CALLS == ["gone"]
    assert list(Job.objects.values_list("name", flat=True)) == ["tests.jobs.write_ledger"]
    assert list(Ledger.objects.values_list("key", flat=True)) == ["kept"]


@pytest.mark.parametrize("batch", [1, 3])
def test_parameters_are_quoted_as_sql_literals_whatever_they_hold(batch):
    """The finish statement's parameters are written into its EXECUTE as literals (quoted by
    libpq): a worker name or a result with quotes, backslashes and non-ASCII text is stored
    exactly as given."""
    from djasync.models import Attempt

    worker = "o'brien \\\\ \"host\"; DROP TABLE x; -- é🎉"
    job = djasync.schedule(return_text, args=["'; SELECT 1; --"])
    [finished] = executor.run_batch(batch, worker=worker)
    assert finished.outcome == Outcome.SUCCEEDED, finished.error
    job.refresh_from_db()
    attempt = Attempt.objects.get(job=job)
    assert (job.result, job.worker, attempt.worker) == ("'; SELECT 1; --", worker, worker)
    assert job.started_at == attempt.started_at <= attempt.finished_at


@pytest.mark.parametrize("runner", ["run_batch", "run_batches"])
def test_a_later_failure_in_a_batch_keeps_the_on_commit_callbacks_of_earlier_jobs(runner):
    """Every job of a batch runs in a savepoint of the same name; rolling back one job's must
    not drop the callbacks of the jobs before it, whose work commits."""

    jobs.ON_COMMIT_CALLS.clear()
    first = djasync.schedule(jobs.on_commit_then_return, args=["A"]).pk
    failing = djasync.schedule(jobs.on_commit_then_raise, args=["B"],
                               meta={"max_attempts": 1}).pk
    last = djasync.schedule(jobs.on_commit_then_return, args=["C"]).pk
    if runner == "run_batch":
        finished = executor.run_batch(3)
    else:
        finished = []
        executor.run_batches(3, lambda batch: finished.extend(batch) or True)
    assert [(f.job_id, f.outcome) for f in finished] == [
        (first, Outcome.SUCCEEDED), (failing, Outcome.ERROR), (last, Outcome.SUCCEEDED)]
    assert jobs.ON_COMMIT_CALLS == ["A", "C"]


@pytest.mark.parametrize("option", ["name_prefix", "worker"])
def test_a_nul_character_in_a_parameter_is_refused_not_cut_short(option):
    """libpq's quoting stops at a NUL: "\\x00x" would become '' (a prefix matching every job)."""
    from psycopg import DataError as PsycopgDataError

    djasync.schedule(return_text, args=["x"])
    with pytest.raises((DataError, PsycopgDataError), match="NUL"):
        executor.run_batch(1, **{option: "\x00no.such.module"})
    assert Job.objects.get().status == "pending"


def test_waiting_for_postgresql_lets_the_processs_other_threads_run():
    """libpq's blocking calls would hold the GIL for the whole wait (a web process's other
    threads frozen while schedule() waits): the pipeline polls the socket instead."""
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.wait(0.005):
            ticks.append(1)

    statements = wire.statements()
    thread = threading.Thread(target=tick)
    thread.start()
    try:
        (result,) = statements.send([statements.command("SELECT pg_sleep(0.5)")])
    finally:
        stop.set()
        thread.join()
    assert result.status == psycopg.pq.ExecStatus.TUPLES_OK
    assert len(ticks) >= 20  # about 100 if the thread ran all along; 0 or 1 if it was held


def test_a_connection_lost_mid_exchange_raises_and_is_closed(other_connection):
    statements = wire.statements()
    pid = statements.rows(statements.send([statements.command("SELECT pg_backend_pid()")])[0])
    other_connection.execute("SELECT pg_terminate_backend(%s, 5000)", pid[0])
    with pytest.raises(OperationalError):
        statements.send([statements.command("SELECT 1")])
    assert connection.connection.closed
    connection.close()
    djasync.schedule(jobs.write_ledger, args=["after"])  # a new connection, new statements
    assert [f.outcome for f in executor.drain()] == [Outcome.SUCCEEDED]
    assert wire.statements() is not statements


def test_a_second_statements_object_on_the_workers_connection_breaks_nothing():
    """A job whose helper thread schedules, then schedules itself: each thread has its own
    Statements, and every Statements of one connection shares what it has prepared (a stale
    copy would try to prepare a statement again: "already exists", batch after batch)."""
    connection.close()  # a fresh connection: nothing prepared yet
    djasync.schedule(jobs.schedule_from_a_thread_then_here, args=["first"])
    assert [f.outcome for f in executor.run_batch(1)] == [Outcome.SUCCEEDED]
    for key in ("second", "third"):
        djasync.schedule(jobs.write_ledger, args=[key])
    outcomes = [f.outcome for f in executor.drain()]
    assert outcomes == [Outcome.SUCCEEDED] * 4  # the two adds and the two ledger jobs
    assert sorted(Ledger.objects.values_list("key", flat=True)) == ["first", "second", "third"]


def test_ctrl_c_while_waiting_cancels_and_leaves_django_a_usable_connection(other_connection):
    """As psycopg does: the statement is cancelled, the exchange read to its end, and the
    connection stays open (closing it behind Django's back would break every later query)."""
    Ledger.objects.count()
    with other_connection.transaction():
        other_connection.execute("LOCK TABLE djasync_job IN EXCLUSIVE MODE")

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            with pytest.raises(KeyboardInterrupt):
                djasync.schedule(jobs.add, args=[1, 2])  # waits on the lock
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    assert not connection.connection.closed
    assert Ledger.objects.count() == 0  # the next query on Django's connection
    assert Job.objects.count() == 0  # the cancelled INSERT's transaction rolled back
    djasync.schedule(jobs.add, args=[1, 2])
    assert Job.objects.count() == 1


def test_the_exchange_holds_psycopgs_connection_lock():
    """psycopg connections are thread-safe because each operation holds ``conn.lock``: so does
    the pipeline, or a second thread's query would interleave with it."""
    statements = wire.statements()
    raw = statements.raw
    errors = []

    def other():
        try:
            assert raw.execute("SELECT 42").fetchone() == (42,)
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    thread = threading.Timer(0.1, other)
    thread.start()
    (result,) = statements.send([statements.command("SELECT 7 FROM pg_sleep(0.4)")])
    thread.join()
    assert (statements.rows(result), errors) == ([(7,)], [])


def test_an_interruption_between_two_sends_leaves_the_connection_usable(monkeypatch,
                                                                          other_connection):
    """Ctrl-C after the claim message's BEGIN went out but before the rest: the pipeline is
    closed with a Sync and read to its end; Django's atomic rolls the transaction back; the
    job was never claimed."""
    job = djasync.schedule(jobs.write_ledger, args=["later"]).pk
    put = wire.Statements._put
    calls = []

    def interrupted_put(self, command):
        calls.append(command[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        put(self, command)

    monkeypatch.setattr(wire.Statements, "_put", interrupted_put)
    with pytest.raises(KeyboardInterrupt):
        executor.run_batch(1)
    monkeypatch.setattr(wire.Statements, "_put", put)
    assert calls[0].startswith(b"BEGIN")
    assert not connection.connection.closed
    assert not connection.in_atomic_block and connection.get_autocommit()
    assert connection.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert other_connection.execute("SELECT status FROM djasync_job WHERE id = %s",
                                    [job]).fetchone() == ("pending",)
    assert [f.outcome for f in executor.drain()] == [Outcome.SUCCEEDED]


def test_notifications_that_arrive_during_an_exchange_reach_psycopg(other_connection):
    """Code that LISTENs on Django's own connection: a NOTIFY read along with djasync's
    results is handed to psycopg, as its own reads do, not left in libpq's queue."""
    connection.ensure_connection()
    raw = connection.connection
    raw.execute("LISTEN djasync_test")
    statements = wire.statements()
    sent = threading.Timer(0.1, other_connection.execute, ["NOTIFY djasync_test, 'hi'"])
    sent.start()
    statements.send([statements.command("SELECT pg_sleep(0.5)")])
    sent.join()
    received = [n.payload for n in raw.notifies(timeout=0.5, stop_after=1)]
    assert received == ["hi"]
