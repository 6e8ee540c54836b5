"""Prometheus metrics of the daemon (``--metrics-port``), with the official client library.

Children run the jobs, so they count them: started, succeeded, failed, retried, timed out,
and the run-time and pickup-latency histograms. They are forked processes, so the counts go
through prometheus_client's multiprocess mode: each process writes its values to memory-mapped
files in a directory private to this daemon, which the supervisor creates before it forks
and removes when it stops; a scrape adds up every file, those of dead children included.
The supervisor counts what only it sees (crashes, jobs killed past their timeout) and, at scrape
time, reads its own state (children, the LISTEN connection) and the queue depth (one bounded
query, run by its database agent: see ``Supervisor.queue_depth``).

The supervisor answers scrapes itself, in its event loop: no thread. A thread alive while the
supervisor forks would be a hazard (a child could inherit a lock it held, or a database session
it opened); here one scrape is a short pause of the loop (at most half a second spent waiting
for the queue depth).

Nothing here is imported, and nothing is done per job, unless ``--metrics-port`` is given.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import importlib.util
import logging
import os
import shutil
import socket
import socketserver
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from djasync.attempts import Finished
    from djasync.executor import ClaimedJob
    from djasync.models import Outcome
    from djasync_worker.supervisor import Supervisor

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'djasync[metrics]'"
#: The label a job name gets when the allow-list refused it: a row written by hand may name
#: anything, and each distinct label value is a new time series.
REFUSED_NAME = "<refused>"
#: Bound of the queue-depth query run at each scrape; past it the scrape answers without it.
QUEUE_QUERY_TIMEOUT_SECONDS = 2.0
#: How long a scrape's client may take to send its request and read the answer: the supervisor
#: waits for it, so a stuck client must not hold the loop for long.
REQUEST_TIMEOUT_SECONDS = 2.0
#: Job run times go from milliseconds to the default 300 s timeout and beyond.
RUN_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Pickup latency is milliseconds when workers keep up and grows with the backlog when not.
PICKUP_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                          5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

#: Pending jobs per queue, for the depth gauges: all of them, those due, and the age of the
#: oldest due one. Due jobs include those running right now (a running job is a pending row
#: locked by its worker). It reads every pending row, so it grows with the backlog (not with
#: finished jobs); ``statement_timeout`` bounds it.
QUEUE_DEPTH = """
SELECT queue,
       count(*) AS pending,
       count(*) FILTER (WHERE run_after <= now()) AS due,
       coalesce(extract(epoch FROM now() - min(run_after) FILTER (WHERE run_after <= now())),
                0)::float8 AS oldest_due_age
  FROM djasync_job
 WHERE status = 'pending'
 GROUP BY queue
"""


class MetricsError(Exception):
    """Metrics cannot be served as asked (the message says why)."""


def start(host: str, port: int) -> Exporter:
    """Check the client library, bind the port and set up the multiprocess directory.

    Call before Django is set up: the client library picks its multiprocess mode from
    ``PROMETHEUS_MULTIPROC_DIR`` when it is first imported, perhaps by the project's settings.
    """
    if importlib.util.find_spec("prometheus_client") is None:
        raise MetricsError(
            f"--metrics-port needs the prometheus-client package: {INSTALL_HINT}"
        )
    server = _bind(host, port)
    directory = tempfile.mkdtemp(prefix="djasync-metrics-")
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        return Exporter(server, directory, previous)
    except BaseException:
        server.server_close()
        shutil.rmtree(directory, ignore_errors=True)
        _restore_environ(previous)
        raise


def _bind(host: str, port: int) -> _Server:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        return _Server(family, (str(address[0]), int(address[1])))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = (" (another process listens there: choose another port)"
                if exc.errno == errno.EADDRINUSE else "")
        raise MetricsError(
            f"cannot serve metrics on {host}:{port} (--metrics-host/--metrics-port): "
            f"{reason}{hint}"
        ) from None


class _Server(http.server.HTTPServer):
    """The /metrics endpoint, driven by the supervisor's loop one request at a time."""

    #: ``handle_request()`` takes what is waiting and never waits for more.
    timeout = 0

    def __init__(self, family: int, address: tuple[str, int]) -> None:
        self.address_family = family
        super().__init__(address, http.server.BaseHTTPRequestHandler, bind_and_activate=True)
        # Readable, then the client gave up: accept() must not block the supervisor.
        self.socket.setblocking(False)

    def server_bind(self) -> None:
        # HTTPServer would look up the host's full name in DNS here; nothing needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.warning("metrics request failed client=%s", client_address, exc_info=True)


class Exporter:
    """The daemon's metrics: what children record, and the endpoint the supervisor serves."""

    def __init__(self, server: _Server, directory: str, previous_environ: str | None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, values
        from prometheus_client.exposition import MetricsHandler
        from prometheus_client.multiprocess import MultiProcessCollector

        if not getattr(values.ValueClass, "_multiprocess", False):
            # Imported before PROMETHEUS_MULTIPROC_DIR was set (by a sitecustomize, say):
            # choose the multiprocess values now, before any metric of ours exists.
            values.ValueClass = values.MultiProcessValue()
        self.server = server
        self.directory = directory
        self._previous_environ = previous_environ
        self._supervisor: Supervisor | None = None
        #: Ids of the jobs this child started in its current batch.
        self._started: set[int] = set()
        self._queues_seen: set[str] = set()

        def counter(name: str, documentation: str) -> Any:
            # registry=None: the supervisor's registry reads them from the files, for every
            # process at once (the multiprocess collector).
            return Counter(f"djasync_jobs_{name}", documentation, ["queue", "name"],
                           registry=None)

        self.started = counter("started", "Job attempts started.")
        self.succeeded = counter("succeeded", "Job attempts that succeeded.")
        self.failed = counter("failed", "Jobs marked failed (attempts used up, or a job that "
                                        "can never run).")
        self.retried = counter("retried", "Attempts that raised (or hit the statement timeout) "
                                          "and were rescheduled.")
        self.crashed = counter("crashed", "Attempts whose worker process died.")
        self.timed_out = counter("timed_out", "Attempts that ran past their timeout (statement "
                                              "timeout, or killed by the supervisor).")
        self.run_time = Histogram("djasync_job_run_time_seconds",
                                  "Run time of the attempts that finished (succeeded or raised).",
                                  ["queue", "name"], buckets=RUN_TIME_BUCKETS, registry=None)
        self.pickup_latency = Histogram(
            "djasync_job_pickup_latency_seconds",
            "From when a job became due (its run_after) to when its attempt started.",
            ["queue"], buckets=PICKUP_LATENCY_BUCKETS, registry=None)

        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=directory)
        self.registry.register(_DaemonCollector(self))
        server.RequestHandlerClass = type("_MetricsHandler", (MetricsHandler,), {
            "registry": self.registry, "timeout": REQUEST_TIMEOUT_SECONDS,
        })

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    # -- in the children ----------------------------------------------------------------------

    def job_started(self, job: ClaimedJob) -> None:
        """Count an attempt that starts now, and how long its job waited since it was due."""
        from djasync.registry import display_name

        self._started.add(job.id)
        # A Task job by its Task's path, as the finished counters (Finished.name) name it.
        self.started.labels(job.queue, display_name(job.name, job.args)).inc()
        if job.due_at is not None:
            # Clocks of the database and this host may differ slightly: never below zero.
            latency = max(0.0, time.time() - job.due_at.timestamp())
            self.pickup_latency.labels(job.queue).observe(latency)

    def jobs_finished(self, batch: list[Finished]) -> None:
        """Count how the attempts of a committed batch ended."""
        from djasync.models import Outcome, Status

        for finished in batch:
            started = finished.job_id in self._started
            labels = (finished.queue, finished.name if started else _name_label(finished.name))
            if finished.outcome == Outcome.SUCCEEDED:
                self.succeeded.labels(*labels).inc()
            elif finished.status == Status.FAILED:
                self.failed.labels(*labels).inc()
            else:
                self.retried.labels(*labels).inc()
            if finished.outcome == Outcome.TIMED_OUT:
                self.timed_out.labels(*labels).inc()
            if started:  # a job refused before it ran has no run time
                self.run_time.labels(*labels).observe(finished.duration)
        self._started.clear()

    # -- in the supervisor --------------------------------------------------------------------

    def watch(self, supervisor: Supervisor) -> None:
        """Read this supervisor's children and LISTEN connection at each scrape."""
        self._supervisor = supervisor
        host, port = self.address
        logger.info("serving metrics url=http://%s:%s/metrics directory=%s", host, port,
                    self.directory)

    def job_lost(self, outcome: Outcome, labels: tuple[str, str] | None) -> None:
        """Count an attempt whose process died (crashed) or was killed past its timeout;
        ``labels`` is the job's (queue, name), as the database agent read them."""
        from djasync.models import Outcome

        queue, name = labels if labels is not None else ("<unknown>", "<unknown>")
        counter = self.timed_out if outcome == Outcome.TIMED_OUT else self.crashed
        counter.labels(queue, name).inc()

    def child_exited(self, pid: int | None) -> None:
        """Forget a dead child's live gauges (its counters and histograms still count)."""
        from prometheus_client import multiprocess

        if pid is not None:
            multiprocess.mark_process_dead(pid, self.directory)

    def fileno(self) -> int:
        return self.server.fileno()

    def serve(self) -> None:
        """Answer the scrape waiting on the socket, if any (the supervisor's loop calls this)."""
        self.server.handle_request()

    def close(self) -> None:
        """Stop serving and remove the multiprocess directory."""
        self.server.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)
        _restore_environ(self._previous_environ)

    # -- at scrape time -----------------------------------------------------------------------

    def queue_depth(self) -> list[tuple[str, int, int, float]] | None:
        """Read (queue, pending, due, oldest due age) per queue; None if the database fails."""
        # In the daemon, the supervisor's database agent reads it (the loop never waits).
        supervisor = self._supervisor
        rows = read_queue_depth() if supervisor is None else supervisor.queue_depth()
        if rows is None:
            return None
        # A queue that emptied reads 0, rather than vanishing from the scrape.
        self._queues_seen.update(row[0] for row in rows)
        present = {row[0] for row in rows}
        rows.extend((queue, 0, 0, 0.0) for queue in sorted(self._queues_seen - present))
        return rows


def read_queue_depth(timeout: float = QUEUE_QUERY_TIMEOUT_SECONDS,
                     ) -> list[tuple[str, int, int, float]] | None:
    """Run :data:`QUEUE_DEPTH` within ``timeout`` seconds; None if it fails (logged)."""
    from django.db import connection, transaction

    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT set_config('statement_timeout', %s, true)",
                           [str(max(1, int(timeout * 1000)))])
            cursor.execute(QUEUE_DEPTH)
            return [(str(q), int(p), int(d), float(a)) for q, p, d, a in cursor.fetchall()]
    except Exception as exc:
        logger.warning("metrics: cannot read the queue depth error=%s", exc)
        with contextlib.suppress(Exception):
            connection.close()
        return None


class _DaemonCollector:
    """Gauges read at scrape time: the supervisor's state and the queue depth."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def describe(self) -> list[Any]:
        return []  # nothing to check at registration: collect() queries the database

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from djasync_worker.child import JOB_ID

        supervisor = self.exporter._supervisor
        if supervisor is not None:
            children = list(supervisor.children.values())
            yield GaugeMetricFamily("djasync_children", "Child processes alive.",
                                    value=len(children))
            yield GaugeMetricFamily("djasync_children_busy", "Child processes running a job.",
                                    value=sum(1 for c in children if int(c.shared[JOB_ID])))
            listener = supervisor.listener
            yield GaugeMetricFamily("djasync_listen_up",
                                    "1 while the LISTEN connection is up and answers its "
                                    "probes, else 0 (the worker then finds jobs by polling).",
                                    value=int(listener.up))
            yield CounterMetricFamily("djasync_listen_reconnects",
                                      "Times the LISTEN connection was made again after the "
                                      "first.", value=max(0, listener.connects - 1))
        rows = self.exporter.queue_depth()
        yield GaugeMetricFamily("djasync_database_up",
                                "1 if this scrape could read the queue depth, else 0.",
                                value=int(rows is not None))
        if rows is None:
            return  # no figures rather than stale ones
        pending = GaugeMetricFamily("djasync_queue_pending_jobs",
                                    "Pending jobs, due or scheduled for later.", labels=["queue"])
        due = GaugeMetricFamily("djasync_queue_due_jobs",
                                "Pending jobs whose run_after has passed (running ones included).",
                                labels=["queue"])
        oldest = GaugeMetricFamily("djasync_queue_oldest_due_age_seconds",
                                   "How long the oldest due job has been due (0: none).",
                                   labels=["queue"])
        for queue, pending_count, due_count, age in rows:
            pending.add_metric([queue], pending_count)
            due.add_metric([queue], due_count)
            oldest.add_metric([queue], age)
        yield from (pending, due, oldest)
        yield from _flow_control()


def _flow_control() -> Iterator[Any]:
    """Paused queues and each limit's use (djasync.limits), read at scrape time."""
    from django.db import connection
    from prometheus_client.core import GaugeMetricFamily

    from djasync import limits

    try:
        paused_queues = limits.paused_queues()
        usage = limits.usage()
    except Exception as exc:
        logger.warning("metrics: cannot read flow control error=%s", exc)
        with contextlib.suppress(Exception):
            connection.close()
        return
    paused = GaugeMetricFamily("djasync_queue_paused", "1 for a paused queue.",
                               labels=["queue"])
    for queue in paused_queues:
        paused.add_metric([queue], 1)
    yield paused
    running = GaugeMetricFamily("djasync_limit_running_jobs",
                                "Jobs holding a slot of the limit now (a pattern: all its keys).",
                                labels=["limit"])
    waiting = GaugeMetricFamily("djasync_limit_waiting_jobs",
                                "Due pending jobs that hold the limit's key (running included).",
                                labels=["limit"])
    rate_used = GaugeMetricFamily("djasync_limit_rate_used",
                                  "Starts in the rate's current window.", labels=["limit"])
    for row in usage:
        running.add_metric([row["key"]], row["running"])
        waiting.add_metric([row["key"]], row["waiting"])
        if row["rate_used"] is not None:
            rate_used.add_metric([row["key"]], row["rate_used"])
    yield from (running, waiting, rate_used)


def _name_label(name: str) -> str:
    """The label of a job that never started: its name only if the allow-list accepts it."""
    from djasync import registry
    from djasync.exceptions import ForbiddenFunction

    try:
        registry.check_name(name)
    except ForbiddenFunction:
        return REFUSED_NAME
    return name


def _restore_environ(previous: str | None) -> None:
    if previous is None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
