"""``djasync-worker --metrics-port``: scraped over HTTP from a real daemon."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

import djasync
from djasync.models import Job, Status
from djasync_worker import cli as worker_cli
from djasync_worker import metrics
from tests import jobs
from tests.conftest import conninfo
from tests.daemon import database_url, run_worker, start_worker, stop, wait_for, worker_env

WRITE = "tests.jobs.write_ledger"
RAISE = "tests.jobs.always_raise"
KILL = "tests.jobs.kill_self"
PG_SLEEP = "tests.jobs.pg_sleep"
BUSY = "tests.jobs.busy_loop"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, timeout: float = 10.0) -> Samples:
    """Every sample of one scrape, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def by_labels(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples of one metric, keyed by the values of ``labels``.

    Series at 0 are left out: the multiprocess files of a process may hold a label set it
    never counted (a forked child starts with its parent's series, at 0).
    """
    found = {}
    for (sample_name, sample_labels), value in samples.items():
        if sample_name == name and value:
            values = dict(sample_labels)
            found[tuple(values[label] for label in labels)] = value
    return found


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


class TcpProxy:
    """Forward a local port to PostgreSQL; ``cut()`` drops every connection and refuses new
    ones (as a database that went away), ``restore()`` lets them through again."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.passing = True
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()

    def __enter__(self) -> TcpProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.listener.close()
        self.cut()

    def cut(self) -> None:
        self.passing = False
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self.passing = True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.passing:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "worker.log"


@pytest.fixture
def metrics_daemon(log: Path) -> Iterator[Callable[..., tuple[int, subprocess.Popen]]]:
    """Start daemons with --metrics-port on a free port; stop them after the test."""
    started: list[subprocess.Popen] = []

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[int, subprocess.Popen]:
        port = free_port()
        started.append(start_worker("--metrics-port", str(port), *args, log=log, env=env))
        wait_for(lambda: accepts(port) or started[-1].poll() is not None, what="the port")
        assert started[-1].poll() is None, log.read_text()[-3000:]
        return port, started[-1]

    yield start
    for process in started:
        assert stop(process) == 0, log.read_text()[-3000:]


def multiprocess_directory(log: Path) -> Path:
    match = wait_for(lambda: re.search(r"serving metrics url=\S+ directory=(\S+)",
                                       log.read_text()), what="the metrics log line")
    return Path(match.group(1))


@pytest.mark.daemon
@pytest.mark.django_db(transaction=True)
def test_a_scrape_counts_every_outcome_per_queue_and_name_and_reports_queue_depth(
        metrics_daemon, log):
    djasync.schedule_many([djasync.JobSpec(jobs.write_ledger, [f"k{i}"]) for i in range(3)])
    djasync.schedule(jobs.always_raise, queue="mail", meta={"max_attempts": 2})
    djasync.schedule(jobs.kill_self, meta={"max_attempts": 2})
    djasync.schedule(jobs.pg_sleep, args=[5], meta={"max_attempts": 1, "timeout": 0.2})
    djasync.schedule(jobs.busy_loop, args=[5], meta={"max_attempts": 1, "timeout": 0.2})
    # A row written by hand, naming a function outside the allow-list: refused, not run.
    Job.objects.create(name="os.system", args=["true"])
    later = djasync.schedule(jobs.write_ledger, args=["later"],
                             run_after=datetime.timedelta(hours=1))
    # Due for a minute, in a queue this daemon does not serve.
    unserved = djasync.schedule(jobs.write_ledger, args=["unserved"], queue="elsewhere",
                                run_after=timezone.now() - datetime.timedelta(seconds=60))
    port, daemon = metrics_daemon("--concurrency", "2", "--queue", "default,mail")
    directory = multiprocess_directory(log)
    assert directory.is_dir()

    served = Job.objects.exclude(pk__in=[later.pk, unserved.pk])
    wait_for(lambda: not served.filter(status=Status.PENDING).exists(), timeout=30,
             what="every served job to finish")
    assert dict(served.values_list("name", "status").distinct()) == {
        WRITE: Status.SUCCEEDED, RAISE: Status.FAILED, KILL: Status.FAILED,
        PG_SLEEP: Status.FAILED, BUSY: Status.FAILED, "os.system": Status.FAILED,
    }
    expected = {
        "djasync_jobs_started_total": {("default", WRITE): 3, ("mail", RAISE): 2,
                                       ("default", KILL): 2, ("default", PG_SLEEP): 1,
                                       ("default", BUSY): 1},
        "djasync_jobs_succeeded_total": {("default", WRITE): 3},
        "djasync_jobs_retried_total": {("mail", RAISE): 1},
        # The poison job and the one killed past its timeout are failed by the claim after
        # their last attempt, without running again.
        "djasync_jobs_failed_total": {("mail", RAISE): 1, ("default", KILL): 1,
                                      ("default", PG_SLEEP): 1, ("default", BUSY): 1,
                                      # Its name is not a label: rows may name anything.
                                      ("default", metrics.REFUSED_NAME): 1},
        "djasync_jobs_crashed_total": {("default", KILL): 2},
        # One statement timeout (seen by the child), one kill by the supervisor's watchdog.
        "djasync_jobs_timed_out_total": {("default", PG_SLEEP): 1, ("default", BUSY): 1},
        # Only attempts that finished have a run time.
        "djasync_job_run_time_seconds_count": {("default", WRITE): 3, ("mail", RAISE): 2,
                                               ("default", PG_SLEEP): 1},
    }

    def counted() -> Samples | None:
        samples = scrape(port)
        return samples if all(by_labels(samples, name, "queue", "name") == counts
                              for name, counts in expected.items()) else None

    # The children count a batch just after it commits: the rows may be seen a moment before.
    try:
        samples = wait_for(counted, timeout=10, what="the counters", interval=0.1)
    except AssertionError:
        samples = scrape(port)
        for name, counts in expected.items():
            assert by_labels(samples, name, "queue", "name") == counts, name
        raise
    latency = by_labels(samples, "djasync_job_pickup_latency_seconds_count", "queue")
    assert latency == {("default",): 7, ("mail",): 2}
    assert value(samples, "djasync_job_pickup_latency_seconds_bucket", queue="default",
                 le="+Inf") == 7
    pg_sleep_time = value(samples, "djasync_job_run_time_seconds_sum", queue="default",
                          name=PG_SLEEP)
    assert pg_sleep_time is not None and 0.2 <= pg_sleep_time < 5

    assert value(samples, "djasync_queue_pending_jobs", queue="default") == 1
    assert value(samples, "djasync_queue_due_jobs", queue="default") == 0
    assert value(samples, "djasync_queue_oldest_due_age_seconds", queue="default") == 0
    assert value(samples, "djasync_queue_pending_jobs", queue="elsewhere") == 1
    assert value(samples, "djasync_queue_due_jobs", queue="elsewhere") == 1
    age = value(samples, "djasync_queue_oldest_due_age_seconds", queue="elsewhere")
    assert age is not None and 60 <= age < 120
    assert value(samples, "djasync_database_up") == 1
    assert value(samples, "djasync_listen_up") == 1
    assert value(samples, "djasync_listen_reconnects_total") == 0
    # Two children crashed and one was killed; each was replaced.
    samples = wait_for(lambda: (s := scrape(port))[("djasync_children", ())] == 2 and s,
                       what="two children alive")
    assert value(samples, "djasync_children_busy") == 0


    assert stop(daemon) == 0, log.read_text()[-3000:]
    assert not directory.exists()  # the multiprocess files go with the daemon


@pytest.mark.daemon
@pytest.mark.django_db(transaction=True)
def test_a_task_job_is_counted_under_its_tasks_path_from_start_to_finish(metrics_daemon, log):
    from tests import tasks

    tasks.add.enqueue(1, 2)
    port, daemon = metrics_daemon("--concurrency", "1")
    wait_for(lambda: Job.objects.filter(status=Status.SUCCEEDED).exists(), timeout=30,
             what="the task to finish")

    def counted() -> Samples | None:
        samples = scrape(port)
        return samples if value(samples, "djasync_jobs_succeeded_total", queue="default",
                                name="tests.tasks.add") == 1 else None

    samples = wait_for(counted, timeout=10, what="the counters", interval=0.1)
    assert by_labels(samples, "djasync_jobs_started_total", "queue", "name") == {
        ("default", "tests.tasks.add"): 1}


@pytest.mark.django_db(transaction=True)
def test_the_queue_depth_query_gives_up_at_its_statement_timeout(other_connection, caplog):
    djasync.schedule(jobs.add, args=[1, 2])
    assert metrics.read_queue_depth() == [("default", 1, 1, pytest.approx(0, abs=5))]
    # A lock on the job table makes the query wait, until its statement timeout.
    with other_connection.transaction():
        other_connection.execute("LOCK TABLE djasync_job IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        assert metrics.read_queue_depth(timeout=0.3) is None
        elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 3
    assert "cannot read the queue depth" in caplog.text
    assert "statement timeout" in caplog.text
    assert metrics.read_queue_depth() is not None  # on a fresh connection


@pytest.mark.daemon
@pytest.mark.django_db(transaction=True)
def test_a_scrape_still_answers_while_the_database_is_down_and_listen_reconnects_after(
        metrics_daemon, log):
    with TcpProxy(conninfo()["host"], int(conninfo()["port"])) as proxy:
        env = worker_env(DATABASE_URL=database_url(host="127.0.0.1", port=str(proxy.port)))
        port, daemon = metrics_daemon("--concurrency", "1", env=env)
        samples = wait_for(lambda: (s := scrape(port)).get(("djasync_listen_up", ())) == 1 and s,
                           what="LISTEN up")
        assert value(samples, "djasync_database_up") == 1
        proxy.cut()  # every connection dropped, new ones refused
        samples = wait_for(lambda: (s := scrape(port))[("djasync_listen_up", ())] == 0 and s,
                           what="LISTEN down")
        assert value(samples, "djasync_database_up") == 0
        assert not by_labels(samples, "djasync_queue_pending_jobs", "queue")
        assert value(samples, "djasync_children") == 1  # the rest of the scrape is there
        proxy.restore()
        samples = wait_for(lambda: (s := scrape(port))[("djasync_listen_up", ())] == 1 and s,
                           timeout=30, what="LISTEN up again")
        assert value(samples, "djasync_listen_reconnects_total") == 1
        assert value(samples, "djasync_database_up") == 1
        # Jobs run again: scheduled through the proxy's other side, found by NOTIFY or poll.
        job = djasync.schedule(jobs.add, args=[1, 2])
        wait_for(lambda: Job.objects.get(pk=job.pk).status == Status.SUCCEEDED, timeout=20,
                 what="a job after the outage")
        assert stop(daemon) == 0, log.read_text()[-3000:]


@pytest.mark.daemon
@pytest.mark.django_db(transaction=True)
def test_without_metrics_port_no_process_of_the_daemon_imports_the_client_library():
    job = djasync.schedule(jobs.modules_imported, args=["prometheus_client", "djasync.models"])
    completed = run_worker("--burst", "--concurrency", "1")
    assert completed.returncode == 0, completed.stderr
    assert Job.objects.get(pk=job.pk).result == ["djasync.models"]


# -- options ------------------------------------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(worker_cli.cli, list(args), env=env, prog_name="djasync-worker")


@pytest.mark.parametrize("port, fragment", [
    ("0", "0 is not in the range 1<=x<=65535"),
    ("65536", "65536 is not in the range 1<=x<=65535"),
    ("http", "'http' is not a valid integer"),
])
def test_a_bad_metrics_port_is_refused_naming_the_option(options_only, port, fragment):
    for result in (invoke("--metrics-port", port),
                   invoke(env={"DJASYNC_WORKER_METRICS_PORT": port})):
        assert result.exit_code == 2, result.output
        assert "'--metrics-port'" in result.stderr and fragment in result.stderr
        assert "Traceback" not in result.output


def test_metrics_are_off_unless_a_port_is_given(options_only, monkeypatch):
    assert worker_cli.cli.make_context("djasync-worker", [])\
        .params["metrics_port"] is None
    monkeypatch.setenv("DJASYNC_WORKER_METRICS_PORT", "9808")
    monkeypatch.setenv("DJASYNC_WORKER_METRICS_HOST", "0.0.0.0")
    params = worker_cli.cli.make_context("djasync-worker", []).params
    assert (params["metrics_port"], params["metrics_host"]) == (9808, "0.0.0.0")


def test_without_the_client_library_the_message_says_what_to_install(options_only, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    result = invoke("--metrics-port", str(free_port()))
    assert result.exit_code == 1, result.output
    assert "pip install 'djasync[metrics]'" in result.stderr
    assert "Traceback" not in result.output
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


@pytest.mark.daemon
def test_a_metrics_port_in_use_is_refused_at_once_without_a_traceback():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = run_worker("--metrics-port", str(port), timeout=30)
    assert completed.returncode == 1, completed
    assert f"cannot serve metrics on 127.0.0.1:{port}" in completed.stderr
    assert "--metrics-port" in completed.stderr and "in use" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.daemon
def test_an_unknown_metrics_host_is_refused_naming_the_option():
    completed = run_worker("--metrics-port", str(free_port()),
                           "--metrics-host", "no-such-host.invalid", timeout=30)
    assert completed.returncode == 1, completed
    assert "cannot serve metrics on no-such-host.invalid" in completed.stderr
    assert "--metrics-host" in completed.stderr and "Traceback" not in completed.stderr
