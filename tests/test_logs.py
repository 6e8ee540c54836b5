"""The worker's log lines: one per finished job, plain or Task, and RFC 3339 times in JSON."""

import datetime
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

import djasync
from djasync import executor
from djasync_worker import logs
from tests import jobs, tasks

pytestmark = pytest.mark.django_db(transaction=True)

LOGGERS = ("djasync", "djasync_worker", "django.tasks", "django_tasks")


@pytest.fixture
def worker_logging() -> Iterator[list[dict]]:
    """Configure logging as ``djasync-worker --log-format json`` does (level info); yield the
    JSON lines written so far, each time it is read; then put the loggers back."""
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level,
                    logging.getLogger(name).propagate, logging.getLogger(name).filters[:])
             for name in LOGGERS}
    logs.configure("info", "json")
    stream = io.StringIO()
    [handler] = logging.getLogger("djasync").handlers  # the one handler every logger shares
    handler.setStream(stream)  # type: ignore[attr-defined]

    class Lines(list):
        def read(self) -> list[dict]:
            self[:] = [json.loads(line) for line in stream.getvalue().splitlines()]
            return self

    try:
        yield Lines()
    finally:
        for name, (handlers, level, propagate, filters) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate, logger.filters[:] = handlers, propagate, filters
            logger.setLevel(level)


def test_json_log_time_is_rfc_3339_with_milliseconds_and_an_offset():
    record = logging.LogRecord("djasync", logging.INFO, __file__, 1, "hello", (), None)
    record.created = datetime.datetime(2026, 5, 4, 3, 2, 1, 987654,
                                       tzinfo=datetime.UTC).timestamp()
    data = json.loads(logs.JSONFormatter().format(record))
    assert data["time"] == "2026-05-04T03:02:01.987+00:00"
    parsed = datetime.datetime.fromisoformat(data["time"])
    assert parsed.utcoffset() == datetime.timedelta(0)


def test_a_succeeded_plain_job_logs_one_line_at_info(worker_logging):
    job = djasync.schedule(jobs.add, args=[1, 2])
    executor.run_batch()
    lines = [line for line in worker_logging.read() if line["level"] == "info"]
    assert [(line["message"].split(" id=")[0], line["job_id"], line["job_name"])
            for line in lines] == [("job succeeded", job.pk, "tests.jobs.add")]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", lines[0]["time"])


def test_a_succeeded_task_logs_the_same_one_line_as_a_plain_job(worker_logging):
    result = tasks.add.enqueue(1, 2)
    executor.run_batch()
    lines = [line for line in worker_logging.read() if line["level"] == "info"]
    # Django's own RUNNING and SUCCESSFUL lines are left out: one rule for every job.
    assert [(line["message"].split(" id=")[0], line["job_id"], line["job_name"])
            for line in lines] == [("job succeeded", int(result.id), "tests.tasks.add")]


def test_a_failed_task_still_logs_djangos_failed_line_and_djasyncs(worker_logging):
    djasync.schedule(jobs.always_raise, meta={"max_attempts": 1})
    result = tasks.fail_once.enqueue("k")
    executor.drain()
    levels = [(line["logger"], line["level"]) for line in worker_logging.read()]
    assert levels.count(("djasync.executor", "error")) == 2
    assert any(line["logger"] == "django.tasks" and line["level"] == "error"
               and f"id={result.id}" in line["message"] for line in worker_logging)


def test_log_finished_jobs_off_leaves_no_line_for_a_succeeded_job(worker_logging, settings):
    settings.DJASYNC = {**settings.DJASYNC, "LOG_FINISHED_JOBS": False}
    djasync.schedule(jobs.add, args=[1, 2])
    tasks.add.enqueue(1, 2)
    executor.drain()
    assert worker_logging.read() == []


def test_log_finished_jobs_must_be_a_boolean():
    from djasync import conf
    from djasync.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="LOG_FINISHED_JOBS"):
        conf.load({"LOG_FINISHED_JOBS": "yes"})
