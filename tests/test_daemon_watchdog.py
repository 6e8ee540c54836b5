"""Through the real daemon: the watchdog keeps time whatever the database does, and a job whose
database session is gone stops running.

Each job here is ``tests.jobs.tick``, which appends a line to a file every 0.05 s: the file
shows, from the local clock, when each run went on, so two runs of one job overlapping (or a
run outliving its timeout) is read there, not inferred from rows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg
import pytest

import djasync
from djasync.models import Attempt, Job, Outcome, Status, Worker
from tests import jobs
from tests.conftest import conninfo
from tests.daemon import start_worker, stop, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.daemon]


def runs(path: Path) -> dict[int, list[tuple[str, float]]]:
    """The runs ``tick`` logged in ``path``: process id -> [(event, epoch)], in order."""
    found: dict[int, list[tuple[str, float]]] = {}
    if not path.exists():
        return found
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            found.setdefault(int(parts[1]), []).append((parts[0], float(parts[3])))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_a_job_past_its_timeout_is_killed_on_time_while_the_workers_own_row_is_locked(
        tmp_path):
    """Another session holds the daemon's own ``djasync_worker`` row (a long report, a stuck
    migration): its heartbeat must wait, but not its watchdog."""
    ticks = tmp_path / "ticks"
    log = tmp_path / "worker.log"
    worker = start_worker("--concurrency", "1", "--poll-interval", "0.2",
                          "--shutdown-timeout", "1", log=log)
    holder = psycopg.connect(**conninfo())  # a transaction left open, as a person's psql
    try:
        wait_for(lambda: Worker.objects.filter(pid=worker.pid, stopped_at__isnull=True).exists(),
                 what="the worker's row")
        job = djasync.schedule(jobs.tick, args=[str(ticks), 60],
                               meta={"timeout": 5, "max_attempts": 1})
        (pid,) = wait_for(lambda: list(runs(ticks)), what="the job to start")
        # The next heartbeat (within 5 s, before the job's deadline) waits on this lock.
        holder.execute("SELECT * FROM djasync_worker WHERE pid = %s FOR UPDATE", [worker.pid])
        try:
            wait_for(lambda: not alive(pid), timeout=20, what="the job's process to be killed")
        except AssertionError:  # let the heartbeat through, to see how long the job ran
            holder.rollback()
            wait_for(lambda: not alive(pid), timeout=60, what="the job's process to end")
        events = runs(ticks)[pid]
        ran = events[-1][1] - events[0][1]
        print(f"the job ran {ran:.1f} s (timeout 5 s) with the worker's row locked")
        assert ran < 5 + 2.5, (ran, log.read_text()[-3000:])
        # Its timed-out attempt is written while the lock is still held (it needs no lock on
        # the worker's row), and once only.
        wait_for(lambda: Attempt.objects.filter(job=job).exists(), timeout=20,
                 what="the timed-out attempt")
        holder.rollback()
        time.sleep(workers_heartbeat_seconds() + 1)  # a heartbeat goes through
        job.refresh_from_db()
        assert job.status == Status.FAILED
        assert list(Attempt.objects.filter(job=job).values_list("outcome", flat=True)) == [
            Outcome.TIMED_OUT]
        assert Worker.objects.get(pid=worker.pid).running == []
        # Waiting on the agent, the supervisor's loop sleeps: it does not spin.
        assert cpu_seconds(worker.pid) < 3, cpu_seconds(worker.pid)
    finally:
        holder.close()
        code = stop(worker)
    assert code == 0, log.read_text()[-3000:]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


#: How long a run may go on after another worker started the job again: the window between the
#: server freeing the row and the supervisor seeing the session's end (seen: 7 ms under load).
FENCE_WINDOW_SECONDS = 0.1


def workers_heartbeat_seconds() -> float:
    from djasync import workers

    return workers.HEARTBEAT_SECONDS


@pytest.mark.parametrize("ending", ["pg_terminate_backend", "idle_in_transaction_timeout"])
def test_a_job_whose_session_was_ended_stops_before_another_worker_runs_it_again(
        tmp_path, other_connection, ending):
    """PostgreSQL ended the session of a running atomic job: its transaction is gone and its
    row free for another worker, so its code must not go on as if it still held the job."""
    ticks = tmp_path / "ticks"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    daemons = [start_worker("--concurrency", "1", "--poll-interval", "0.2",
                            "--shutdown-timeout", "1", log=log) for log in logs]
    try:
        wait_for(lambda: Worker.objects.filter(stopped_at__isnull=True).count() == 2,
                 what="both workers")
        idle = 1000 if ending == "idle_in_transaction_timeout" else None
        job = djasync.schedule(jobs.tick, args=[str(ticks), 20, idle],
                               meta={"timeout": 120, "max_attempts": 3})
        (first,) = wait_for(lambda: list(runs(ticks)), what="the job to start")
        if ending == "pg_terminate_backend":
            backend = int(ticks.read_text().split()[2])
            other_connection.execute("SELECT pg_terminate_backend(%s)", [backend])
        ended = time.time()
        wait_for(lambda: not alive(first), timeout=15, what="the first run to be stopped")
        first_run = runs(ticks)[first]
        stopped = first_run[-1][1]
        print(f"{ending}: the first run went on {stopped - ended:.2f} s after its session "
              f"was ended")
        assert stopped - ended < (1 if idle else 0) + 2.5, [log.read_text()[-2000:]
                                                            for log in logs]
        assert first_run[-1][0] != "end"
        # It runs again (in either daemon), never while the first run went on.
        second = wait_for(lambda: [p for p in runs(ticks) if p != first], timeout=30,
                          what="the job to run again")[0]
        # Never while the first run went on, but for the fence's window (the supervisor learns
        # of the session's end from the socket, a few ms after the server freed the row:
        # docs/explanation/reliability-watchdog.md); without the fence the overlap is seconds.
        assert runs(ticks)[second][0][1] > stopped - FENCE_WINDOW_SECONDS
        # The first run rolled back when its session ended, as any atomic job's does then,
        # and it is not charged: the end came from outside the job. The log says so.
        text = "".join(log.read_text() for log in logs)
        assert "job's database session ended while it ran, killing its child" in text
        assert f"job stopped: its database session had ended id={job.pk} " in text
        assert not Attempt.objects.filter(job=job).exists()
        assert Job.objects.get(pk=job.pk).status == Status.PENDING  # its second run goes on
    finally:
        codes = [stop(daemon, timeout=30) for daemon in daemons]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
    assert os.path.exists(ticks)


def test_a_killed_database_agent_is_replaced_and_the_worker_goes_on(tmp_path):
    """The agent does the supervisor's database work: kill -9 it, and crashes are still
    counted and heartbeats still written, by its successor."""
    import re
    import signal

    log = tmp_path / "worker.log"
    worker = start_worker("--concurrency", "1", "--poll-interval", "0.2", log=log)
    try:
        match = wait_for(lambda: re.search(r"database agent started pid=(\d+)", log.read_text()),
                         what="the agent")
        os.kill(int(match.group(1)), signal.SIGKILL)
        wait_for(lambda: len(re.findall(r"database agent started", log.read_text())) == 2,
                 what="another agent")
        crash = djasync.schedule(jobs.kill_self, meta={"max_attempts": 1})
        wait_for(lambda: Attempt.objects.filter(job=crash, outcome=Outcome.CRASHED).exists(),
                 what="the crash to be counted")
        seen = Worker.objects.get(pid=worker.pid).last_seen
        wait_for(lambda: Worker.objects.get(pid=worker.pid).last_seen > seen, timeout=15,
                 what="a heartbeat")
        assert "database agent died" in log.read_text()
    finally:
        code = stop(worker)
    assert code == 0, log.read_text()[-3000:]
    assert Worker.objects.get(pid=worker.pid).stopped_at is not None
