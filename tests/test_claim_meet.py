"""Where the claim meets other features: isolation levels, queue filters on a big backlog."""

import psycopg
import pytest
from django.db.models import Count

import djasync
from djasync import wire
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
    djasync.schedule_many([djasync.JobSpec(jobs.write_ledger, [f"k{i}"]) for i in range(600)])
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
