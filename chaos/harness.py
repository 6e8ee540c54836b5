"""The chaos run: its own PostgreSQL, three worker daemons, a producer, seeded faults, checks.

Phases (each printed with the seconds since the start):

1. Start a throwaway PostgreSQL (tools/pg.py: random port, fsync on, short keepalives),
   migrate, pre-queue the jobs (ledger jobs, a negative control, poison jobs spread mid-queue).
2. Start 3 × ``python -m djasync_worker --concurrency 4`` (2 in ``--short``; the third with
   ``--batch-size 5``; restarted whenever one exits; each on a host of its own, a network
   namespace, unless ``--local`` or no root: chaos/network.py), a producer thread that
   schedules batches in ``transaction.atomic()``, rolling back every tenth, the mixed producer
   (long jobs, groups with final jobs, cancels and deschedules, a job cancelling its
   batch-mate, unique keys) and the housekeeper (``prune`` every 2 s, a sample of unique keys
   in between); periodic jobs come from the daemons. Measure throughput for a few seconds
   without faults.
3. Chaos: one fault every 0.2-0.8 s, chosen by the seeded RNG (kill -9 of a child, kill -9 of
   a supervisor, pg_terminate_backend, pg_cancel_backend, SIGSTOP of a child for longer than
   the idle-in-transaction timeout; cuts of a host's network, chaos/network.py); at set
   times a ``fast`` restart of PostgreSQL, an ``immediate`` one, and an ``immediate`` one
   under ``synchronous_commit = off``.
4. Stop the faults, the producers and the pruning; the queue must drain within 30 s; no
   session may sit idle in a transaction.
5. SIGTERM every daemon while slow jobs run: each exits 0 within its grace period and the slow
   jobs finish. Then a double SIGTERM: exit 0 at once, the job rolls back and later runs once.
6. Check the invariants with SQL (chaos/checker.py) and write the report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netns
import psycopg
from psycopg.conninfo import conninfo_to_dict

import pg
from chaos import checker, network

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = "chaos.settings"
#: The chaos daemons serve this queue; the double-SIGTERM test's daemon serves its own.
CHAOS_QUEUE = "default"
#: The flow workload's queue (paused and resumed during the chaos); the chaos daemons serve both.
FLOW_QUEUE = checker.FLOW_QUEUE
CHAOS_QUEUES = f"{CHAOS_QUEUE},{FLOW_QUEUE}"
SIGTERM_TEST_QUEUE = "sigterm-test"
WORKER_APP_NAME = "chaos-worker"
#: The double-SIGTERM test's daemon: its long job sits in its transaction on purpose.
SIGTERM_TEST_APP_NAME = "chaos-sigterm-test"
LISTENER_APP_NAME = "djasync-worker listener"
DRAIN_LIMIT_SECONDS = 30.0
#: djasync's extra idle-in-transaction time beyond a job's timeout (executor.IDLE_MARGIN_SECONDS).
IDLE_MARGIN_SECONDS = 10

FAULT_WEIGHTS = {
    "kill_child": 55,
    "pg_terminate_backend": 15,
    "pg_cancel_backend": 12,
    "kill_supervisor": 4,
    "sigstop_child": 8,
}
READY_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[\d+\] LOG:  "
    r"database system is ready to accept connections", re.M)
#: A session ending because the chaos ended it (pg_terminate_backend: "administrator
#: command"; a restart: also "immediate shutdown command"): when, and its pid.
SESSION_ENDED_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[(\d+)\] \S* ?FATAL:  "
    r"terminating connection due to ", re.M)


@dataclass
class Config:
    seed: int
    jobs: int
    duration: float
    short: bool
    report: Path | None
    keep: bool
    workers: int = 3
    #: Children per daemon: 4 in the full run (issue 16's "3 daemons x --concurrency 4"), 2 in
    #: --short (the test suite's run, on a machine the suite shares).
    concurrency: int = 4
    poison_each: int = 5
    control_share: float = 0.05
    #: Negative controls among the producer's jobs, which run during the faults: with the flow
    #: work ahead of the backlog, few pre-queued controls run then (seed 843: none duplicated).
    producer_control_share: float = 0.25
    warmup: float = 3.0
    batch_size: int = 10
    batch_interval: float = 0.5
    slow_seconds: float = 3.0
    shutdown_timeout: float = 20.0
    #: Keep faulting after ``duration`` until the backlog is this small (or 2 × duration).
    backlog_target: int = 1000
    #: The last chaos daemon claims batches of this many jobs (``--batch-size``).
    batch_daemon_size: int = 5
    #: The mixed producer's pause between actions (long jobs, groups, cancels, unique keys).
    mixed_interval: float = 0.25
    #: Seconds a long job works (uniform), against DJASYNC["LEASE_SECONDS"] = 2.
    long_seconds: tuple[float, float] = (0.3, 2.5)
    #: Unique keys the mixed producer uses (few, and jobs due 0.2-2 s later: many schedules
    #: find a pending job with their key).
    unique_keys: int = 2
    #: prune_jobs every ``prune_interval`` s, deleting what finished ``prune_retention`` s ago.
    prune_interval: float = 2.0
    prune_retention: float = 3.0
    #: Each chaos daemon on a host of its own (a network namespace) with cuts among the
    #: faults (chaos/network.py); False, or no root/ip/nft: every daemon on this machine.
    network: bool = True
    #: How long a cut lasts (uniform), and the pause before the next one (a host at a time,
    #: never all of them).
    cut_seconds: tuple[float, float] = (5.0, 30.0)
    network_unavailable: str | None = None
    #: Run the daemon of ``pooled_slot`` through a PgBouncer in transaction mode on the
    #: database's host (PgBouncer's client TCP recipe; its LISTEN straight to PostgreSQL):
    #: "auto" when the hosts run and a PgBouncer is installed or built, "off", or "on"
    #: (fail if it cannot). The built 1.24 (prepared statements through the pooler) is
    #: preferred to Debian's 1.18.
    pgbouncer: str = "auto"
    pooled_slot: int = 1
    #: PgBouncer's pool for the daemon: concurrency + this many server connections, fewer
    #: than its clients (children, agent, supervisor, long jobs' lease renewals, the negative
    #: controls' second connections), so that they share them. Every child in an atomic job
    #: holds one, and a negative control opens a second one through the pool inside its job:
    #: with a pool of concurrency (seed 882) such jobs waited on each other until their
    #: timeout (docs/howto/pgbouncer.md); a job whose lease renewal waits in PgBouncer's
    #: queue past its 2 s lease loses it. The spare covers a child's second connection each.
    pool_spare: int = 4
    #: Flow control (issue 16): jobs pre-queued over ``flow_tenants`` keys ``tenant:<n>``
    #: (concurrency 2), a share of them also holding ``api`` (10/s), a share long; half in
    #: queue ``flow``, which is paused at ``pause_at`` × duration for ``pause_seconds``.
    flow_jobs: int = 2000
    flow_tenants: int = 6
    #: The pre-queued flow jobs fall due in bursts of this many, spread over ``duration``
    #: from ``flow_start`` s after they are queued: every key sees contention all along the
    #: chaos, not only at its start.
    flow_burst: int = 16
    flow_start: float = 5.0
    flow_rated_share: float = 0.25
    flow_long_share: float = 0.1
    flow_seconds: tuple[float, float] = (0.01, 0.06)
    pause_at: float = 0.4
    pause_seconds: float = 6.0
    #: Run the workers with this concurrency for ``tenant:*`` instead of 2 (the checker still
    #: checks 2): a run that must fail F1, to show the check bites.
    flow_enforced_concurrency: int | None = None


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start


def say(clock: Clock, message: str) -> None:
    print(f"[{clock():7.2f}] {message}", flush=True)


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (a daemon's supervisor: its job children)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    alive = []
    for child in map(int, text.split()):
        with contextlib.suppress(OSError, IndexError):
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("Z", "X"):
                alive.append(child)
    return alive


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the segfaulting jobs leave no core files


# -- worker daemons ------------------------------------------------------------------------------


@dataclass
class Daemon:
    slot: int
    process: subprocess.Popen
    log: Path
    started: float
    #: Where this process's output starts in the slot's log (shared by its predecessors).
    log_offset: int = 0
    killed_by_chaos: bool = False
    #: Replaced when it exits (the chaos daemons); the SIGTERM test daemon is not.
    respawn: bool = True
    #: Stopped by the harness with SIGTERM (to be replaced by a plain daemon): exit 0 expected.
    retiring: bool = False


@dataclass
class Daemons:
    clock: Clock
    run_dir: Path
    env: dict[str, str]
    count: int
    concurrency: int
    shutdown_timeout: float
    slots: dict[int, Daemon] = field(default_factory=dict)
    exits: list[dict[str, Any]] = field(default_factory=list)
    restart_after: dict[int, float] = field(default_factory=dict)
    respawning: bool = True
    #: Extra options of a chaos slot's daemon (``--batch-size`` for one of them).
    extra_args: dict[int, tuple[str, ...]] = field(default_factory=dict)
    #: The command prefix that puts a slot's daemon on its host (``ip netns exec …``) and
    #: the server's URL from there.
    prefixes: dict[int, list[str]] = field(default_factory=dict)
    urls: dict[int, str] = field(default_factory=dict)
    #: More environment for a slot's daemon (the pooled one's direct LISTEN_URL).
    slot_env: dict[int, dict[str, str]] = field(default_factory=dict)

    def start_all(self) -> None:
        for slot in range(self.count):
            self.start(slot)

    def start(self, slot: int, *extra: str, level: str = "warning", concurrency: int = 0,
              queue: str = CHAOS_QUEUES, respawn: bool = True, app_name: str = "") -> Daemon:
        log = self.run_dir / f"worker-{slot}.log"
        extra = extra or self.extra_args.get(slot, ())
        command = [sys.executable, "-m", "djasync_worker", "--settings", SETTINGS,
                   "--concurrency", str(concurrency or self.concurrency),
                   "--queue", queue, "--shutdown-timeout", str(self.shutdown_timeout),
                   "--poll-interval", "1", "--log-level", level, *extra]
        env = {**self.env, "PGAPPNAME": app_name} if app_name else dict(self.env)
        if slot in self.urls:
            env["DATABASE_URL"] = self.urls[slot]
        env.update(self.slot_env.get(slot, {}))
        command = [*self.prefixes.get(slot, []), *command]
        offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            # cwd: ``python -m`` puts it first on sys.path, before PYTHONPATH's code copy.
            process = subprocess.Popen(command, cwd=self.run_dir / "src", env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=_no_core_dumps)
        daemon = Daemon(slot, process, log, time.monotonic(), offset, respawn=respawn)
        self.slots[slot] = daemon
        return daemon

    def poll(self) -> None:
        """Reap daemons that exited and start their replacements."""
        now = time.monotonic()
        for slot, daemon in list(self.slots.items()):
            code = daemon.process.poll()
            if code is None:
                continue
            del self.slots[slot]
            expected = (daemon.killed_by_chaos and code == -signal.SIGKILL
                        or daemon.retiring and code == 0)
            output = "" if expected else _tail(daemon.log, 10**7, daemon.log_offset)
            tail = output[-1500:]
            # A daemon started while PostgreSQL restarts cannot connect and exits 1 (with a
            # message, or with a traceback if the server went away just after the check):
            # expected; systemd (Restart=) or this harness starts it again.
            refused = code == 1 and ("cannot connect to PostgreSQL" in tail
                                     or "lost the database while starting" in tail or (
                "OperationalError" in tail and "worker starting" not in output))
            self.exits.append({"slot": slot, "pid": daemon.process.pid, "code": code,
                               "at": round(self.clock(), 2),
                               "expected": expected or refused,
                               "refused_at_start": refused,
                               "log_tail": "" if expected or refused else tail})
            if not (expected or refused):
                say(self.clock, f"daemon {slot} pid={daemon.process.pid} exited {code} "
                    f"unexpectedly:\n{tail}")
            if self.respawning and daemon.respawn:
                self.restart_after[slot] = now + (0.5 if refused else 0.0)
        for slot, when in list(self.restart_after.items()):
            if when <= now and self.respawning:
                del self.restart_after[slot]
                self.start(slot)

    def make_plain(self, slot: int) -> None:
        """Replace ``slot``'s daemon (stopped with SIGTERM: it finishes its batch) by one
        without extra options."""
        self.extra_args.pop(slot, None)
        daemon = self.slots.get(slot)
        if daemon is None or daemon.process.poll() is not None:
            return
        daemon.retiring = True
        daemon.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.process.wait(self.shutdown_timeout + 10)
        self.poll()

    def alive(self) -> list[Daemon]:
        """The chaos daemons that are running (not the SIGTERM test's)."""
        return [d for d in self.slots.values() if d.respawn and d.process.poll() is None]

    def all_up(self) -> bool:
        """Every chaos daemon runs, with all its children and its database agent (a child
        process too: djasync_worker/agent.py)."""
        alive = self.alive()
        return len(alive) == self.count and all(
            len(children_of(d.process.pid)) >= self.concurrency + 1 for d in alive)

    def all_children(self) -> list[int]:
        return [c for d in self.alive() for c in children_of(d.process.pid)]

    def kill_all(self) -> None:
        self.respawning = False
        for daemon in self.slots.values():
            with contextlib.suppress(ProcessLookupError):
                daemon.process.kill()
        for daemon in self.slots.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.process.wait(10)


def _tail(path: Path, chars: int, offset: int = 0) -> str:
    """The last ``chars`` characters of ``path`` written after byte ``offset``."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")[-chars:]
    except OSError:
        return ""


# -- the producer ---------------------------------------------------------------------------------


class HarnessThread(threading.Thread):
    """A thread of the harness's own (producers, housekeeping): seeded, stoppable, and an
    exception it dies of is kept for the harness to report."""

    #: Added to the seed, so that each kind of thread draws its own random sequence.
    SEED_SALT = 0

    def __init__(self, name: str, config: Config, expected: checker.Expectations,
                 clock: Clock) -> None:
        super().__init__(name=name, daemon=True)
        self.config = config
        self.expected = expected
        self.clock = clock
        self.rng = random.Random(config.seed * 7919 + self.SEED_SALT)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the harness
            self.error = exc
            raise

    def _run(self) -> None:
        raise NotImplementedError


class Producer(HarnessThread):
    """Schedule jobs in ``transaction.atomic()`` batches until stopped; roll back every 10th.

    Each batch commits with ``synchronous_commit = on`` (SET LOCAL), so a batch acknowledged
    as committed is durable even while the server runs with it off: only the workers' commits
    may vanish in the ``synchronous_commit = off`` crash.
    """

    SEED_SALT = 1

    def __init__(self, config: Config, expected: checker.Expectations, clock: Clock) -> None:
        super().__init__("producer", config, expected, clock)
        self.lock = threading.Lock()
        self.batches = Counter[str]()

    def _run(self) -> None:
        from django.db import connection, transaction

        import djasync

        class RollBack(Exception):
            pass

        number = 0
        while not self.stop_event.is_set():
            number += 1
            keys = [f"p{number:05d}-{i}" for i in range(self.config.batch_size)]
            functions = [checker.EXTERNAL
                         if self.rng.random() < self.config.producer_control_share
                         else checker.LEDGER for _ in keys]
            priority = self.rng.choice([0, 0, 1])
            roll_back = number % 10 == 0
            phase = "schedule"
            try:
                with transaction.atomic():
                    with connection.cursor() as cursor:
                        cursor.execute("SET LOCAL synchronous_commit = on")
                    for key, function in zip(keys, functions, strict=True):
                        # Controls ahead of the flow work (priority 3), so that some run
                        # while the faults go on (seeds 843, 853: none duplicated behind it).
                        djasync.schedule(function, args=[key], priority=(
                            4 if function == checker.EXTERNAL else priority))
                    if roll_back:
                        raise RollBack
                    phase = "commit"
            except RollBack:
                with self.lock:
                    self.expected.rolled_back.update(keys)
                    self.batches["rolled_back"] += 1
            except Exception:
                with self.lock:
                    if phase == "commit":  # the COMMIT itself failed: it may have happened
                        self.expected.uncertain.append(keys)
                        self.batches["uncertain"] += 1
                    else:
                        self.batches["failed"] += 1
                with contextlib.suppress(Exception):
                    connection.close()
                self.stop_event.wait(0.1)  # the server is restarting: try again shortly
            else:
                with self.lock:
                    self.expected.committed.update(zip(keys, functions, strict=True))
                    self.batches["committed"] += 1
            self.stop_event.wait(self.config.batch_interval)
        with contextlib.suppress(Exception):
            connection.close()


class MixedProducer(HarnessThread):
    """The mixed workload, one seeded action at a time until stopped: long jobs, groups with
    a final job (and a member added late), jobs cancelled or descheduled soon after they are
    scheduled, a job that cancels the job scheduled with it (its batch-mate on the batch
    daemon), unique keys. Every job has priority 5-6, ahead of the backlog (0-1), so that each
    action races the workers while the faults go on.

    Scheduling transactions are tracked as the producer's are (committed, or uncertain when
    the COMMIT itself failed); the harness's sessions commit durably (chaos/settings.py).
    """

    ACTIONS = {"long": 3, "group": 3, "cancel": 3, "mate": 2, "unique": 3, "flow": 3}

    SEED_SALT = 2

    def __init__(self, config: Config, expected: checker.Expectations, clock: Clock) -> None:
        super().__init__("mixed-producer", config, expected, clock)
        self.counts = Counter[str]()
        self.number = 0

    def _run(self) -> None:
        from django.db import connection

        actions, weights = zip(*self.ACTIONS.items(), strict=True)
        while not self.stop_event.is_set():
            self.number += 1
            action = self.rng.choices(actions, weights)[0]
            self.counts[action] += 1
            getattr(self, f"_{action}")()
            self.stop_event.wait(self.config.mixed_interval)
        with contextlib.suppress(Exception):
            connection.close()

    def _atomically(self, schedule: Callable[[list[tuple[str, str]]], Any]) -> Any:
        """Run ``schedule(added)`` in a transaction (it appends (key, function) of each job it
        adds to ``added``); return its result once committed, None if anything failed."""
        from django.db import connection, transaction

        from djasync.exceptions import GroupClosed

        added: list[tuple[str, str]] = []
        phase = "schedule"
        try:
            with transaction.atomic():
                result = schedule(added)
                phase = "commit"
        except GroupClosed:
            self.counts["late_member_refused_group_running"] += 1
            return None
        except Exception:
            if phase == "commit" and added:  # the COMMIT itself failed: it may have happened
                self.expected.uncertain.append([k for k, _ in added])
                self.counts["uncertain"] += 1
            else:
                self.counts["failed"] += 1
            with contextlib.suppress(Exception):
                connection.close()
            self.stop_event.wait(0.1)  # the server is restarting: go on shortly
            return None
        self.expected.committed.update(added)
        return result

    def _long(self) -> None:
        """1-3 long jobs at once: on the batch daemon they share a batch (and wait their turn)."""
        import djasync

        specs = [(f"l{self.number:05d}-{i}", round(self.rng.uniform(*self.config.long_seconds), 3))
                 for i in range(self.rng.randint(1, 3))]

        def schedule(added: list[tuple[str, str]]) -> None:
            djasync.schedule_many([djasync.JobSpec(checker.LONG, [key, seconds],
                                                   meta={"atomic": False}, priority=5)
                                   for key, seconds in specs])
            added.extend((key, checker.LONG) for key, _ in specs)

        self._atomically(schedule)

    def _group(self) -> None:
        """A group of 1-3 members (running 20-300 ms each) and a final job; then, 0-300 ms
        later, one more member for the same reference (while the others may be running)."""
        import djasync

        reference = f"g{self.number:05d}"
        members = self.rng.randint(1, 3)
        seconds = [round(self.rng.uniform(0.02, 0.3), 3) for _ in range(members + 1)]

        def schedule(added: list[tuple[str, str]]) -> bool:
            for i in range(members):
                key = f"{reference}-m{i}"
                job = djasync.schedule(checker.LEDGER, [key, seconds[i]], group=reference,
                                       priority=5)
                added.append((key, checker.LEDGER))
            final_key = f"{reference}-final"
            final = djasync.schedule(checker.FINAL, [final_key], group=job.group, priority=5)
            job.group.on_completion(final)
            added.append((final_key, checker.FINAL))
            return True

        if not self._atomically(schedule):
            return
        self.stop_event.wait(self.rng.uniform(0, 0.3))
        late = f"{reference}-late"

        def add_late(added: list[tuple[str, str]]) -> bool:
            djasync.schedule(checker.LEDGER, [late, seconds[-1]], group=reference, priority=5)
            added.append((late, checker.LEDGER))
            return True

        if self._atomically(add_late):
            self.counts["late_member_added"] += 1

    def _cancel(self) -> None:
        """1-3 jobs (ledger or long) due within 0.6 s, each cancelled (by id) or descheduled
        (by function and arguments) 0-0.5 s later; which calls returned success is kept."""
        import djasync
        from djasync.scheduling import cancel, deschedule

        specs = []
        for i in range(self.rng.randint(1, 3)):
            key = f"c{self.number:05d}-{i}"
            if self.rng.random() < 0.4:
                specs.append((key, checker.LONG, [key, round(self.rng.uniform(0.3, 1.5), 3)],
                              {"atomic": False}))
            else:
                specs.append((key, checker.LEDGER, [key], None))
        delays = [datetime.timedelta(seconds=self.rng.uniform(0, 0.6)) for _ in specs]
        how = [self.rng.choice(["cancel", "deschedule"]) for _ in specs]

        def schedule(added: list[tuple[str, str]]) -> list[int]:
            jobs = djasync.schedule_many([
                djasync.JobSpec(function, args, run_after=delay, meta=meta, priority=5)
                for (_, function, args, meta), delay in zip(specs, delays, strict=True)])
            added.extend((key, function) for key, function, _, _ in specs)
            return [job.pk for job in jobs]

        ids = self._atomically(schedule)
        if ids is None:
            return
        self.stop_event.wait(self.rng.uniform(0, 0.5))
        from django.db import connection

        for (key, function, args, _), job_id, way in zip(specs, ids, how, strict=True):
            try:
                done = cancel([job_id]) if way == "cancel" else deschedule(function, args)
            except Exception:
                self.expected.cancel_unknown.add(key)
                with contextlib.suppress(Exception):
                    connection.close()
                continue
            if done == 1:
                self.expected.cancel_ok[key] = way
            else:
                self.expected.cancel_refused.add(key)

    def _mate(self) -> None:
        """A ledger job B and a job A (claimed just before B) that cancels B as it runs."""
        import djasync

        a_key, b_key = f"x{self.number:05d}-a", f"x{self.number:05d}-b"
        self.expected.mate_keys.add(b_key)

        def schedule(added: list[tuple[str, str]]) -> None:
            b = djasync.schedule(checker.LEDGER, [b_key], priority=5)
            djasync.schedule(checker.CANCEL_MATE, [a_key, b.pk, b_key], priority=6)
            added.extend([(b_key, checker.LEDGER), (a_key, checker.CANCEL_MATE)])

        self._atomically(schedule)

    def _flow(self) -> None:
        """1-4 flow jobs (tenant keys, some rated, some long, in the flow queue or not) in one
        transaction, ahead of the pre-queued ones."""
        import djasync

        specs = [flow_spec(self.config, self.rng, f"fm{self.number:05d}-{i}", priority=5)
                 for i in range(self.rng.randint(1, 4))]

        def schedule(added: list[tuple[str, str]]) -> None:
            djasync.schedule_many([spec for _, _, spec in specs])
            added.extend((key, function) for key, function, _ in specs)

        self._atomically(schedule)

    def _unique(self) -> None:
        """A job with one of a few unique keys, due 0.2-2 s later: a new generation of the key,
        or merged into the one pending."""
        import djasync

        key = f"u{self.number:05d}"
        unique = f"unique-{self.rng.randrange(self.config.unique_keys)}"
        delay = datetime.timedelta(seconds=self.rng.uniform(0.2, 2.0))

        def schedule(added: list[tuple[str, str]]) -> bool:
            job = djasync.schedule(checker.LEDGER, [key], run_after=delay, unique=unique,
                                   priority=5)
            if job.args[0] != key:
                return False
            added.append((key, checker.LEDGER))
            return True

        if self._atomically(schedule) is False:
            self.expected.unique_merged += 1


def flow_spec(config: Config, rng: random.Random, key: str, priority: int,
              due_in: float = 0.0) -> tuple[str, str, Any]:
    """A flow job: one ``tenant:<n>`` key, ``api`` too for a share, long for a share (those in
    queue default: a batch's long jobs start after its atomic ones commit, which would blur
    the pause's 1 s), the others in the default or the flow queue."""
    import djasync

    tenant = f"tenant:{rng.randrange(config.flow_tenants)}"
    rated = rng.random() < config.flow_rated_share
    long = rng.random() < config.flow_long_share
    queue = CHAOS_QUEUE if long or rng.random() < 0.5 else FLOW_QUEUE
    if long:
        function, seconds, meta = checker.LONG, rng.uniform(*config.long_seconds) / 2, {
            "atomic": False}
    else:
        function, seconds, meta = checker.LEDGER, rng.uniform(*config.flow_seconds), None
    spec = djasync.JobSpec(function, [key, round(seconds, 3), [tenant, rated, queue]],
                           limits=[tenant, "api"] if rated else [tenant], queue=queue,
                           priority=priority, meta=meta,
                           run_after=datetime.timedelta(seconds=due_in) if due_in else None)
    return key, function, spec


class Housekeeper(HarnessThread):
    """``prune_jobs`` every few seconds with a short retention, and in between a look for two
    pending jobs holding one unique key."""

    UNIQUE_TWICE = """
    SELECT unique_key, count(*) FROM djasync_job WHERE status = 'pending'
       AND unique_key IS NOT NULL GROUP BY 1 HAVING count(*) > 1
    """

    SEED_SALT = 3

    def __init__(self, config: Config, expected: checker.Expectations, clock: Clock) -> None:
        super().__init__("housekeeper", config, expected, clock)
        self.prunes = 0
        self.pruned = 0
        self.samples = 0
        self.errors = 0
        self.last_error = ""

    def _run(self) -> None:
        from django.db import connection

        from djasync.pruning import prune

        next_prune = self.clock() + self.config.prune_interval
        retention = datetime.timedelta(seconds=self.config.prune_retention)
        while not self.stop_event.wait(0.3):
            try:
                with connection.cursor() as cursor:
                    cursor.execute(self.UNIQUE_TWICE)
                    twice = cursor.fetchall()
                self.samples += 1
                if twice:
                    self.expected.unique_overlaps.append([round(self.clock(), 2), twice])
                if self.clock() >= next_prune:
                    self.pruned += prune(retention)
                    self.prunes += 1
                    next_prune = self.clock() + self.config.prune_interval
            except Exception as exc:
                self.errors += 1  # the server is restarting, or a fault cut this session
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                with contextlib.suppress(Exception):
                    connection.close()
        with contextlib.suppress(Exception):
            connection.close()


# -- the run --------------------------------------------------------------------------------------


class ChaosRun:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.clock = Clock()
        self.expected = checker.Expectations()
        self.report: dict[str, Any] = {"seed": config.seed, "short": config.short,
                                       "jobs_requested": config.jobs}
        self.faults: Counter[str] = Counter()
        self.fault_log: list[list[Any]] = []
        self.restarts: list[dict[str, Any]] = []
        self.stopped: dict[int, float] = {}  # pid -> when to SIGCONT
        self.sigstop_outcomes: Counter[str] = Counter()
        self.last_fault = 0.0
        self.violations: list[str] = []
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"djasync-chaos-{config.seed}-"))
        (self.run_dir / "started").mkdir()
        self.server: pg.EmbeddedPostgres | None = None
        self.daemons: Daemons | None = None
        self.producer: Producer | None = None
        self.mixed: MixedProducer | None = None
        self.housekeeper: Housekeeper | None = None
        self.network: network.HostNetwork | None = None
        self.bouncer: Any = None  # tests.pgbouncer.PgBouncer of the pooled host, if any

    # -- helpers ------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        say(self.clock, message)

    def connect(self) -> psycopg.Connection:
        assert self.server is not None
        return psycopg.connect(self.server.url, autocommit=True, connect_timeout=5,
                               application_name="chaos-harness")

    def query(self, sql: str, params: Any = None, retry_for: float = 60.0) -> list[tuple]:
        """Run one statement on a fresh connection, retrying while the server is away."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                with self.connect() as conn:
                    cursor = conn.execute(sql, params)
                    return cursor.fetchall() if cursor.description is not None else []
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # the server is restarting

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str,
                 interval: float = 0.05) -> tuple[Any, float]:
        """Return (first truthy value of condition(), seconds waited), keeping daemons alive."""
        started = time.monotonic()
        while True:
            if self.daemons is not None:
                self.daemons.poll()
            value = condition()
            waited = time.monotonic() - started
            if value:
                return value, waited
            if waited > timeout:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(interval)

    def pending(self, queues: list[str] | None = None, due: bool = False) -> int:
        """Jobs not finished yet (in ``queues``, or in all queues; only those due now)."""
        return int(self.query(
            "SELECT count(*) FROM djasync_job WHERE status = 'pending' "
            "AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s)) "
            "AND (NOT %(due)s OR run_after <= now())",
            {"queues": queues, "due": due})[0][0])

    def fault(self, kind: str, detail: str) -> None:
        self.faults[kind] += 1
        self.expected.fault_times.append((utcnow(), kind))
        self.last_fault = self.clock()
        self.fault_log.append([round(self.last_fault, 2), kind, detail])
        self.say(f"fault {sum(self.faults.values())}: {kind} {detail}")

    # -- phases -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            self.setup()
            self.start_pgbouncer()
            self.start_workers()  # their start-up (Django, on a busy machine) overlaps ...
            self.prequeue()  # ... the pre-queueing
            self.warm_up()
            self.chaos()
            self.drain()
            self.sigterm_with_slow_jobs()
            self.double_sigterm()
            self.final_drain()
            self.pooled_transactions()
            self.check()
        except Exception as exc:
            import traceback

            self.violations.append(f"harness error: {type(exc).__name__}: {exc}")
            self.report["harness_traceback"] = traceback.format_exc()
            self.say(f"HARNESS ERROR {type(exc).__name__}: {exc}")
        finally:
            self.teardown()
        self.report["wall_seconds"] = round(time.monotonic() - started, 1)
        self.report["violations"] = self.violations
        self.report["ok"] = not self.violations
        return self.report

    def snapshot_code(self) -> None:
        """Copy djasync and djasync_worker into the work directory and run them from there.

        Every process of the run (this one, and daemons started minutes later) then runs the
        same code, even while the working tree is being edited.
        """
        self.src = self.run_dir / "src"
        ignore = shutil.ignore_patterns("__pycache__")
        for package in ("djasync", "djasync_worker"):
            shutil.copytree(ROOT / package, self.src / package, ignore=ignore)
        sys.path.insert(0, str(self.src))
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                   capture_output=True, text=True)
        self.report["code"] = described.stdout.strip() or "unknown"

    def setup(self) -> None:
        self.say(f"seed {self.config.seed}; work directory {self.run_dir}")
        self.snapshot_code()
        settings = {"log_timezone": "UTC", "timezone": "UTC"}
        if self.config.network:
            # Its own RNG, so that the other faults keep their seeded sequence.
            self.network = network.HostNetwork(
                self.config.workers, random.Random(self.config.seed * 7919 + 4), self.say,
                self.config.cut_seconds)
            self.network.enter()  # before any thread: the server listens on the bridge
            settings.update(self.network.server_settings())
            self.say(f"hosts {self.network.net.hosts} on a bridge to {self.network.net.db_ns} "
                     f"({self.network.net.db_address}); server recipe {network.SERVER_RECIPE}")
        self.report["network"] = ({"unavailable": self.config.network_unavailable}
                                  if self.config.network_unavailable else {})
        self.server = pg.EmbeddedPostgres(settings=settings)
        self.server.start()
        if self.network is not None:
            self.network.allow_hosts(self.server.datadir, self.server.url)
        self.say(f"PostgreSQL at {self.server.url} (data {self.server.datadir})")
        os.environ["DATABASE_URL"] = self.server.url
        os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
        os.environ["CHAOS_HARNESS"] = "1"  # this process's sessions commit durably
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        from django.conf import settings

        self.expected.lease_seconds = settings.LEASE_SECONDS
        self.expected.timeout_seconds = settings.CHAOS_TIMEOUT
        network.JOB_SECONDS = settings.CHAOS_TIMEOUT + 1
        network.TRANSACTION_BOUND_SECONDS = (network.JOB_SECONDS
                                             + network.LOCK_BOUND_SECONDS)

    def prequeue(self) -> None:
        from django.conf import settings
        from django.db import connection, transaction

        import djasync

        config = self.config
        specs: list[tuple[str, str, dict | None]] = []
        for n in range(config.jobs):
            function = checker.EXTERNAL if self.rng.random() < config.control_share \
                else checker.LEDGER
            specs.append((f"q{n:05d}", function, None))
        # Poison jobs mid-queue (between 10 % and 90 % of it), with small max_attempts.
        for function in checker.POISON:
            short_name = function.rsplit(".", 1)[1]
            for n in range(config.poison_each):
                position = self.rng.randint(len(specs) // 10, len(specs) * 9 // 10)
                specs.insert(position, (f"poison-{short_name}-{n}", function,
                                        {"max_attempts": 3}))
        chunk = 2000
        for start in range(0, len(specs), chunk):
            part = specs[start:start + chunk]
            with transaction.atomic():
                djasync.schedule_many([djasync.JobSpec(f, [k], meta=m) for k, f, m in part])
            self.expected.committed.update((k, f) for k, f, _ in part)
        bursts = max(1, config.flow_jobs // config.flow_burst)
        flow = [flow_spec(config, self.rng, f"f{n:05d}", priority=3,
                          due_in=config.flow_start + (n // config.flow_burst) % bursts
                          * config.duration / bursts)
                for n in range(config.flow_jobs)]
        for start in range(0, len(flow), chunk):
            part = flow[start:start + chunk]
            with transaction.atomic():
                djasync.schedule_many([spec for _, _, spec in part])
            self.expected.committed.update((k, f) for k, f, _ in part)
        connection.close()
        self.report["settings"] = {"DJASYNC": dict(settings.DJASYNC),
                                   "idle_in_transaction_timeout_s":
                                       settings.CHAOS_TIMEOUT + IDLE_MARGIN_SECONDS}
        self.say(f"pre-queued {len(specs)} jobs "
                 f"({sum(f == checker.EXTERNAL for _, f, _ in specs)} negative controls, "
                 f"{len(checker.POISON) * config.poison_each} poison), and {len(flow)} flow "
                 f"jobs over {config.flow_tenants} tenant keys")

    def start_workers(self) -> None:
        env = dict(os.environ)
        env.update({"PGAPPNAME": WORKER_APP_NAME, "CHAOS_RUN_DIR": str(self.run_dir),
                    "PYTHONPATH": f"{self.src}{os.pathsep}{ROOT}",
                    "DATABASE_URL": self.server.url})
        env.pop("NOTIFY_SOCKET", None)
        env.pop("CHAOS_HARNESS", None)
        if self.config.flow_enforced_concurrency is not None:
            env["CHAOS_FLOW_CONCURRENCY"] = str(self.config.flow_enforced_concurrency)
        self.daemons = Daemons(self.clock, self.run_dir, env, self.config.workers,
                               self.config.concurrency, self.config.shutdown_timeout)
        self.daemons.extra_args[self.config.workers - 1] = (
            "--batch-size", str(self.config.batch_daemon_size))
        if self.network is not None:
            for slot in range(self.config.workers):
                self.daemons.prefixes[slot] = self.network.exec_argv(slot)
                self.daemons.urls[slot] = self.network.remote_url(self.server.port)
            if self.bouncer is not None:
                slot = self.config.pooled_slot
                self.daemons.urls[slot] = self.bouncer.remote_url()
                direct = self.network.remote_url(self.server.port)
                self.daemons.slot_env[slot] = {"CHAOS_LISTEN_URL": direct,
                                               "CHAOS_RECORD_URL": direct}
        self.daemons.start_all()

    def pooled_transactions(self) -> None:
        """How many transactions the pooled host ran through PgBouncer (SHOW STATS): the
        report's evidence that one daemon's work went through the pooler."""
        if self.bouncer is not None:
            stats = self.bouncer.admin_dicts("SHOW STATS")
            self.report["pgbouncer"]["transactions"] = sum(
                int(row["total_xact_count"]) for row in stats if row["database"] != "pgbouncer")

    def pool_size(self) -> int:
        return self.config.concurrency + self.config.pool_spare

    def start_pgbouncer(self) -> None:
        """The pooled host's PgBouncer (``Config.pgbouncer``), on the database's host."""
        self.report["pgbouncer"] = {"mode": self.config.pgbouncer}
        if self.config.pgbouncer == "off" or self.network is None:
            return
        from tests import pgbouncer

        program = pgbouncer.built_executable() or pgbouncer.executable()
        if program is None:
            reason = ("no PgBouncer (apt-get install pgbouncer, or "
                      "python3 tools/pgbouncer_build.py)")
            if self.config.pgbouncer == "on":
                raise RuntimeError(f"--pgbouncer on: {reason}")
            self.report["pgbouncer"]["unavailable"] = reason
            self.say(f"no daemon through PgBouncer: {reason}")
            return
        version = pgbouncer.version(program)
        assert version is not None, program
        prepared = 100 if version >= pgbouncer.TRACKS_PREPARED else None
        target = {key: str(value) for key, value in conninfo_to_dict(self.server.url).items()}
        self.bouncer = pgbouncer.start(
            self.run_dir / "pgbouncer", target, pool_size=self.pool_size(),
            program=program, max_prepared_statements=prepared,
            listen_addr=self.network.net.db_address, namespace=self.network.net.db_ns,
            settings=pgbouncer.RECIPE)
        self.report["pgbouncer"].update({
            "version": pgbouncer.dotted(version), "slot": self.config.pooled_slot,
            "host": self.network.host_of(self.config.pooled_slot),
            "pool_size": self.pool_size(), "max_prepared_statements": prepared})
        self.say(f"daemon {self.config.pooled_slot} "
                 f"({self.network.host_of(self.config.pooled_slot)}) through PgBouncer "
                 f"{pgbouncer.dotted(version)} at {self.bouncer.listen_addr}:"
                 f"{self.bouncer.port}, transaction mode, pool {self.pool_size()}, "
                 "LISTEN direct")

    def warm_up(self) -> None:
        self.producer = Producer(self.config, self.expected, self.clock)
        self.producer.start()
        self.mixed = MixedProducer(self.config, self.expected, self.clock)
        self.mixed.start()
        self.housekeeper = Housekeeper(self.config, self.expected, self.clock)
        self.housekeeper.start()
        daemons = self.daemons
        self.wait_for(lambda: daemons.all_up()
                      and self.query("SELECT EXISTS (SELECT 1 FROM djasync_job "
                                     "WHERE status = 'succeeded')")[0][0],
                      timeout=120, what="every child up and a first job done", interval=0.05)
        self.say(f"{len(daemons.alive())} daemons running; {self.config.warmup:.0f} s without "
                 "faults")
        if self.network is not None:
            self.network.start_sampling(self.server.url, self.bouncer)
        began = utcnow()
        deadline = time.monotonic() + self.config.warmup
        self.wait_for(lambda: time.monotonic() >= deadline, self.config.warmup + 5, "warm-up")
        self.chaos_started_at = utcnow()
        baseline = self.query(
            f"SELECT count(*) FROM {checker.ALL_JOBS} j WHERE status = 'succeeded' AND "
            "finished_at BETWEEN %s AND %s", [began, self.chaos_started_at])[0][0]
        seconds = (self.chaos_started_at - began).total_seconds()
        self.report["throughput"] = {"no_chaos_jobs_per_s": round(baseline / seconds, 1)}

    def chaos(self) -> None:
        config = self.config
        from django.conf import settings

        self.stop_seconds = settings.CHAOS_TIMEOUT + IDLE_MARGIN_SECONDS + 1
        start = self.clock()
        plan = [(start + config.duration * f, mode)
                for f, mode in ((0.25, "fast"), (0.5, "immediate"), (0.75, "immediate-async"))]
        self.say(f"chaos for {config.duration:.0f} s (longer while more than "
                 f"{config.backlog_target} jobs wait); restarts at "
                 + ", ".join(f"{t:.1f} s ({m})" for t, m in plan))
        next_fault = self.clock() + self.rng.uniform(0.2, 0.8)
        if self.network is not None:
            self.network.next_cut = self.clock() + self.network.rng.uniform(1.0, 3.0)
        next_backlog_check = 0.0
        backlog = None
        cap = start + 2 * config.duration
        pause_at = start + config.duration * config.pause_at
        self.paused_since: datetime.datetime | None = None
        while True:
            now = self.clock()
            self.daemons.poll()
            self._resume_stopped(now)
            if pause_at is not None and now >= pause_at:
                if self.paused_since is None:
                    self.pause_flow_queue()
                    pause_at = self.clock() + config.pause_seconds
                else:
                    self.resume_flow_queue()
                    pause_at = None
            if plan and now >= plan[0][0]:
                _, mode = plan.pop(0)
                self.restart_postgres(mode)
                next_fault = self.clock() + self.rng.uniform(0.2, 0.8)
                continue
            if now >= next_fault:
                self.random_fault()
                next_fault = self.clock() + self.rng.uniform(0.2, 0.8)
            if self.network is not None:
                self.network_step(now)
            if now >= next_backlog_check:
                backlog = self.pending()
                next_backlog_check = now + 1.0
            if not plan and now >= start + config.duration and (
                    backlog is not None and backlog <= config.backlog_target or now >= cap):
                break
            time.sleep(max(0.0, min(next_fault - self.clock(), 0.05)))
        self._resume_stopped(float("inf"))
        if self.paused_since is not None:
            self.resume_flow_queue()
        if self.network is not None:
            self.heal_all_and_wait()
        chaos_seconds = self.last_fault - start
        self.chaos_ended_at = utcnow()
        self.say(f"chaos over after {chaos_seconds:.1f} s; {backlog} jobs waiting")
        self.stop_producers()
        done = self.query(
            f"SELECT count(*) FROM {checker.ALL_JOBS} j WHERE status = 'succeeded' AND "
            "finished_at BETWEEN %s AND %s", [self.chaos_started_at, self.chaos_ended_at])[0][0]
        self.report["throughput"].update({
            "chaos_seconds": round(chaos_seconds, 1),
            "chaos_jobs_per_s": round(done / max(chaos_seconds, 0.001), 1),
            "backlog_at_last_fault": backlog,
        })

    @staticmethod
    def _until_done(call: Callable[[], Any]) -> datetime.datetime:
        """Call ``call()`` until it returns (the server may be restarting); return the time
        taken just before the call that did."""
        from django.db import connection

        while True:
            began = utcnow()
            try:
                call()
                return began
            except Exception:
                with contextlib.suppress(Exception):
                    connection.close()
                time.sleep(0.1)

    def pause_flow_queue(self) -> None:
        """Pause the flow queue; the pause's time is taken just before the call that
        succeeded, so it is no later than the pause took effect."""
        import djasync

        self.paused_since = self._until_done(lambda: djasync.pause_queue(FLOW_QUEUE))
        pending = self.pending([FLOW_QUEUE])
        self.pause_record = {"pending_at_pause": pending,
                             "due_at_pause": self.pending([FLOW_QUEUE], due=True)}
        self.say(f"paused queue {FLOW_QUEUE!r} ({pending} jobs of it pending)")

    def resume_flow_queue(self) -> None:
        import djasync

        pending = self.pending([FLOW_QUEUE])
        due = self.pending([FLOW_QUEUE], due=True)
        self._until_done(lambda: djasync.resume_queue(FLOW_QUEUE))
        resumed = utcnow()  # after the call: no earlier than the resume took effect
        assert self.paused_since is not None
        self.expected.pauses.append((self.paused_since, resumed))
        self.pause_record.update(pending_at_resume=pending, due_at_resume=due)
        self.report.setdefault("pauses", []).append(self.pause_record)
        self.paused_since = None
        self.say(f"resumed queue {FLOW_QUEUE!r} ({due} jobs of it due and waiting, "
                 f"{pending} pending)")

    # -- faults -------------------------------------------------------------------------------

    def random_fault(self) -> None:
        # Each kind once first (in a seeded order), so that even a short run has them all;
        # then by weight.
        missing = [k for k in FAULT_WEIGHTS if not self.faults[k]]
        kinds, weights = zip(*FAULT_WEIGHTS.items(), strict=True)
        kind = self.rng.choice(missing) if missing else self.rng.choices(kinds, weights)[0]
        if kind == "sigstop_child" and self.stopped:
            kind = "kill_child"  # one stopped child at a time
        getattr(self, f"fault_{kind}")()

    def _children(self, daemon: Daemon) -> list[int]:
        """The daemon's children, except a stopped one (it is left to its supervisor)."""
        return [c for c in children_of(daemon.process.pid) if c not in self.stopped]

    def fault_kill_child(self) -> None:
        daemons = [d for d in self.daemons.alive() if self._children(d)]
        if self.network is not None:
            # A host cut off has no children for a while: aiming at the others only would
            # put all the kills on one host (each child killed every second or so).
            daemons = self.daemons.alive()
        if not daemons:
            return
        daemon = self.rng.choice(daemons)
        children = self._children(daemon)
        if not children:
            return
        pid = self.rng.choice(children)
        self.expected.killed_children.add(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.fault("kill_child", f"pid={pid} of daemon {daemon.slot}")

    def fault_kill_supervisor(self) -> None:
        # Only while every daemon is up (has its children), so at most one is restarting at a
        # time: on a busy machine a daemon needs seconds to start.
        daemons = [d for d in self.daemons.alive() if children_of(d.process.pid)]
        if len(daemons) < self.daemons.count:
            self.fault_kill_child()
            return
        daemon = self.rng.choice(daemons)
        daemon.killed_by_chaos = True
        children = children_of(daemon.process.pid)
        self.expected.orphaned_children.update(children)
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.process.pid, signal.SIGKILL)
        self.fault("kill_supervisor", f"pid={daemon.process.pid} (daemon {daemon.slot}; "
                   f"children {children} die with it)")

    def _worker_backends(self) -> list[tuple[int, str, str]]:
        return [tuple(r) for r in self.query(
            "SELECT pid, coalesce(state, ''), application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = ANY(%s) "
            "ORDER BY pid", [[WORKER_APP_NAME, LISTENER_APP_NAME]], retry_for=5)]

    def fault_pg_terminate_backend(self) -> None:
        backends = self._worker_backends()
        busy = [b for b in backends if b[1] in ("active", "idle in transaction")]
        pool = busy if busy and self.rng.random() < 0.7 else backends
        if not pool:
            return
        pid, state, app = self.rng.choice(pool)
        began = utcnow()
        self.query("SELECT pg_terminate_backend(%s)", [pid], retry_for=5)
        self.expected.sessions_ended.append((began, utcnow()))
        self.fault("pg_terminate_backend", f"backend {pid} ({app}, {state})")

    def fault_pg_cancel_backend(self) -> None:
        backends = self._worker_backends()
        active = [b for b in backends if b[1] == "active"]
        pool = active or [b for b in backends if b[2] == WORKER_APP_NAME]
        if not pool:
            return
        pid, state, app = self.rng.choice(pool)
        self.query("SELECT pg_cancel_backend(%s)", [pid], retry_for=5)
        self.fault("pg_cancel_backend", f"backend {pid} ({app}, {state})")

    def fault_sigstop_child(self) -> None:
        children = self.daemons.all_children()
        if not children:
            return
        pid = self.rng.choice(children)
        self.expected.stopped_children.add(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        self.stopped[pid] = self.clock() + self.stop_seconds
        self.fault("sigstop_child", f"pid={pid} for {self.stop_seconds} s")

    def _resume_stopped(self, now: float) -> None:
        for pid, when in list(self.stopped.items()):
            if now >= when:
                del self.stopped[pid]
                try:
                    os.kill(pid, signal.SIGCONT)
                    outcome = "resumed"
                except ProcessLookupError:
                    outcome = "already gone (killed by its supervisor or by the chaos)"
                self.sigstop_outcomes[outcome.split(" (")[0]] += 1
                self.last_fault = self.clock()
                self.say(f"SIGCONT pid={pid}: {outcome}")

    def network_step(self, now: float) -> None:
        """Heal the cuts that are over; start a new one when it is time."""
        net = self.network
        assert net is not None
        before = len(net.active)
        net.note_cut_pids(self.daemons, self.expected, children_of)
        net.heal_due(now, self.expected)
        if len(net.active) < before:
            self.last_fault = self.clock()
        if net.due(now):
            net.random_cut(now, self.daemons, self.server.url, self.fault, self.expected,
                           children_of)

    def heal_all_and_wait(self) -> None:
        """Heal every cut, then wait (the producers still scheduling) until every host is
        back (N2, checked later), or the bound."""
        net = self.network
        assert net is not None
        if net.active:
            net.heal_all(self.expected)
            self.last_fault = self.clock()
        with contextlib.suppress(TimeoutError):
            _, waited = self.wait_for(net.all_back, network.RECONNECT_BOUND_SECONDS + 5,
                                      "every host back after the heals", interval=0.25)
            self.say(f"every host back {waited:.1f} s after the last heal")

    def restart_postgres(self, mode: str) -> None:
        asynchronous = mode == "immediate-async"
        pg_mode = "immediate" if asynchronous else mode
        record: dict[str, Any] = {"mode": pg_mode, "synchronous_commit_off": asynchronous}
        count_succeeded = f"SELECT count(*) FROM {checker.ALL_JOBS} j WHERE status = 'succeeded'"
        if asynchronous:
            self.query("ALTER SYSTEM SET synchronous_commit = off")
            self.query("SELECT pg_reload_conf()")
            # Let the workers commit a while under the new setting before the crash.
            base = self.query(count_succeeded)[0][0]
            with contextlib.suppress(TimeoutError):
                self.wait_for(lambda: self.query(count_succeeded)[0][0] >= base + 100, 5,
                              "commits with synchronous_commit off")
            record["succeeded_before_crash"] = self.query(count_succeeded)[0][0]
        log_offset = self.server.logfile.stat().st_size
        began = time.monotonic()
        began_at = utcnow()
        self.server.restart(mode=pg_mode)
        self.expected.sessions_ended.append((began_at, utcnow()))
        record["restart_seconds"] = round(time.monotonic() - began, 2)
        if asynchronous:
            after = self.query(count_succeeded)[0][0]
            record["succeeded_after_recovery"] = after
            record["vanished_commits_lower_bound"] = max(0, record["succeeded_before_crash"]
                                                         - after)
            self.query("ALTER SYSTEM RESET synchronous_commit")
            self.query("SELECT pg_reload_conf()")
        with self.server.logfile.open("rb") as log:
            log.seek(log_offset)
            matches = READY_LINE.findall(log.read().decode(errors="replace"))
        accepting = (datetime.datetime.fromisoformat(matches[-1]).replace(tzinfo=datetime.UTC)
                     if matches else utcnow())
        self.fault("pg_restart", f"{mode} in {record['restart_seconds']} s")
        try:
            first, _ = self.wait_for(lambda: self.query(
                f"SELECT min(finished_at) FROM {checker.ALL_JOBS} j WHERE status = 'succeeded' "
                "AND finished_at >= %s", [accepting])[0][0], timeout=60,
                what=f"a commit after the {mode} restart", interval=0.02)
            record["accept_to_first_commit_seconds"] = round(
                (first - accepting).total_seconds(), 3)
        except TimeoutError:
            record["accept_to_first_commit_seconds"] = None
            self.violations.append(f"I5: no job committed within 60 s of the {mode} restart")
        record["at"] = round(self.clock(), 1)
        self.restarts.append(record)
        self.say(f"first commit {record['accept_to_first_commit_seconds']} s after PostgreSQL "
                 f"accepted connections ({record})")

    # -- the end ------------------------------------------------------------------------------

    def drain(self) -> None:
        # The double-SIGTERM test's daemon starts now, on its own queue, so that its start-up
        # overlaps the drain; its job runs (for minutes) until the test stops it.
        self._schedule_now("double-sigterm", checker.SLOW, ["double-sigterm", 600],
                           queue=SIGTERM_TEST_QUEUE)
        self.double_daemon = self.daemons.start(99, level="info", concurrency=1,
                                                queue=SIGTERM_TEST_QUEUE, respawn=False,
                                                app_name=SIGTERM_TEST_APP_NAME)
        # 30 s, plus the time the backlog left at the last fault needs at half the fault-free
        # throughput (on a busy machine the faults may end before the backlog does).
        backlog = self.report["throughput"]["backlog_at_last_fault"] or 0
        rate = max(self.report["throughput"]["no_chaos_jobs_per_s"], 1.0)
        limit = DRAIN_LIMIT_SECONDS + backlog / (rate / 2)
        with contextlib.suppress(TimeoutError):  # reported below; the rest still runs
            self.wait_for(lambda: self.pending([CHAOS_QUEUE, FLOW_QUEUE]) == 0,
                          timeout=limit + 60,
                          what="the queue to drain", interval=0.1)
        since_fault = self.clock() - self.last_fault
        self.report["drain_seconds_after_last_fault"] = round(since_fault, 1)
        self.report["drain_limit_seconds"] = round(limit, 1)
        self.say(f"queue drained {since_fault:.1f} s after the last fault (limit {limit:.0f} s)")
        if since_fault > limit:
            self.violations.append(f"I5: the queue drained {since_fault:.1f} s after the last "
                                   f"fault (limit {limit:.0f} s for a backlog of {backlog})")
        with self.connect() as conn:
            idle = checker.idle_in_transaction(conn, exclude=(SIGTERM_TEST_APP_NAME,))
        self.report["idle_in_transaction_after_drain"] = idle
        if idle:
            self.violations.append(f"I5: sessions idle in transaction after the drain: {idle}")

    def _schedule_now(self, key: str, function: str, args: list, priority: int = 100,
                      queue: str = CHAOS_QUEUE) -> None:
        self._schedule_many([(key, function, args)], priority, queue)

    def _schedule_many(self, jobs: list[tuple[str, str, list]], priority: int,
                       queue: str = CHAOS_QUEUE) -> None:
        from django.db import connection

        import djasync

        connection.close()  # the server restarted since this thread last used it
        djasync.schedule_many([djasync.JobSpec(function, args, priority=priority, queue=queue,
                                               meta={"timeout": 900})
                               for _, function, args in jobs])
        self.expected.committed.update((key, function) for key, function, _ in jobs)
        connection.close()

    def _started(self, key: str) -> int:
        return sum(1 for p in (self.run_dir / "started").iterdir() if p.name.startswith(key + "."))

    def sigterm_with_slow_jobs(self) -> None:
        """SIGTERM every daemon while each child runs a slow job and more jobs wait: each must
        finish its slow job, claim nothing more, and exit 0 within its grace period."""
        daemons = self.daemons
        # The batch daemon would take several slow jobs in one batch (and the waiting jobs
        # with them): this test wants one slow job per child.
        daemons.make_plain(self.config.workers - 1)
        self.wait_for(daemons.all_up, 60, "every daemon and child to be up")
        slots = daemons.count * daemons.concurrency
        keys = [f"slow-{i}" for i in range(slots)]
        self._schedule_many([(k, checker.SLOW, [k, self.config.slow_seconds]) for k in keys], 100)
        waiting = [f"after-sigterm-{i}" for i in range(200)]
        self._schedule_many([(k, checker.LEDGER, [k]) for k in waiting], -100)
        with contextlib.suppress(TimeoutError):  # then report how many did
            self.wait_for(lambda: all(self._started(k) for k in keys), 30,
                          "the slow jobs to start")
        running = sum(bool(self._started(k)) for k in keys)
        daemons.respawning = False
        alive = daemons.alive()
        self.say(f"{running} slow jobs running, {len(waiting)} jobs waiting: SIGTERM to "
                 f"{len(alive)} daemons")
        sigterm_at = utcnow()
        began = time.monotonic()
        for daemon in alive:
            daemon.process.send_signal(signal.SIGTERM)
        result: dict[str, Any] = {"slow_jobs_running": running, "jobs_waiting": len(waiting),
                                  "daemons": []}
        for daemon in alive:
            try:
                code = daemon.process.wait(self.config.shutdown_timeout + 10)
            except subprocess.TimeoutExpired:
                code = None
            seconds = round(time.monotonic() - began, 2)
            result["daemons"].append({"pid": daemon.process.pid, "exit_code": code,
                                      "seconds": seconds})
            if code != 0 or seconds > self.config.shutdown_timeout:
                self.violations.append(
                    f"I5: daemon {daemon.process.pid} exited {code} {seconds} s after SIGTERM "
                    f"with slow jobs running (grace {self.config.shutdown_timeout} s):\n"
                    + _tail(daemon.log, 1500))
            del daemons.slots[daemon.slot]
        result["drain_seconds"] = max((d["seconds"] for d in result["daemons"]), default=None)
        states = dict(self.query(
            "SELECT args->>0, status FROM djasync_job WHERE args->>0 = ANY(%s)", [keys]))
        result["slow_jobs_succeeded"] = sum(states.get(k) == "succeeded" for k in keys)
        unfinished = [k for k in keys if self._started(k) and states.get(k) != "succeeded"]
        if unfinished:
            self.violations.append(f"I5: slow jobs running at SIGTERM did not finish: "
                                   f"{unfinished}")
        # A stopping daemon lets running jobs finish but claims nothing new.
        claimed = self.query(
            "SELECT count(*) FROM djasync_job WHERE args->>0 = ANY(%s) AND started_at > %s",
            [waiting, sigterm_at])[0][0]
        result["jobs_claimed_after_sigterm"] = claimed
        if claimed:
            self.violations.append(
                f"SIGTERM: the stopping daemons claimed and ran {claimed} new jobs after the "
                f"signal (and took {result['drain_seconds']} s to exit); a stopping worker "
                "must only finish the jobs it is running")
        self.report["sigterm"] = result
        self.say(f"SIGTERM drain {result['drain_seconds']} s, exit codes "
                 f"{[d['exit_code'] for d in result['daemons']]}, "
                 f"{claimed} jobs claimed after SIGTERM")

    def double_sigterm(self) -> None:
        """SIGTERM twice the daemon running a long job: exit 0 at once, the job rolls back."""
        key = "double-sigterm"
        daemon = self.double_daemon
        result: dict[str, Any] = {}
        try:
            self.wait_for(lambda: self._started(key), 60, "the long job to start")
            daemon.process.send_signal(signal.SIGTERM)
            self.wait_for(lambda: "stopping after the running jobs" in _tail(daemon.log, 20000),
                          20, "the first SIGTERM to be handled")
            began = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            code = daemon.process.wait(20)
            result = {"exit_code": code, "seconds": round(time.monotonic() - began, 2)}
        finally:
            with contextlib.suppress(ProcessLookupError):
                daemon.process.kill()
            daemon.process.wait(10)
            self.daemons.slots.pop(daemon.slot, None)
        status, attempts = self.query(
            "SELECT status, (SELECT count(*) FROM djasync_attempt a WHERE a.job_id = j.id) "
            "FROM djasync_job j WHERE args->>0 = %s", [key])[0]
        rows = self.query("SELECT count(*) FROM chaos_ledgerentry WHERE key = %s", [key])[0][0]
        result.update({"job_status_after": status, "attempts_after": attempts,
                       "ledger_rows_after": rows})
        if result.get("exit_code") != 0 or result["seconds"] > 5 or status != "pending" or rows:
            self.violations.append(f"I5: double SIGTERM: {result}")
        self.report["double_sigterm"] = result
        self.say(f"double SIGTERM: {result}")

    def final_drain(self) -> None:
        """Run what is left (the job cut by the double SIGTERM, jobs left waiting at SIGTERM)
        here, through the executor, as ``flush_queue`` would."""
        from django.db import connection

        from djasync import executor

        (self.run_dir / "fast").touch()  # the cut slow job's re-run need not take minutes
        os.environ["CHAOS_RUN_DIR"] = str(self.run_dir)
        connection.close()
        done = executor.drain(worker="chaos-harness:final-drain")
        connection.close()
        self.report["final_drain_jobs"] = len(done)
        rows = self.query("SELECT count(*) FROM chaos_ledgerentry WHERE key = 'double-sigterm'")
        self.report["double_sigterm"]["ledger_rows_after_rerun"] = rows[0][0]
        if rows[0][0] != 1:
            self.violations.append(f"I5: the job cut by the double SIGTERM left {rows[0][0]} "
                                   "ledger rows after its re-run (expected 1)")

    def _record_session_ends(self, conn: psycopg.Connection) -> None:
        """Fill ``chaos_sessionend`` from the server log: each session the chaos ended
        (pg_terminate_backend, a restart), with the moment it logged so (see
        ``checker.FLOW_RUN_END``)."""
        text = self.server.logfile.read_bytes().decode(errors="replace")
        ends = [(int(pid), datetime.datetime.fromisoformat(at).replace(tzinfo=datetime.UTC)
                 + datetime.timedelta(milliseconds=1))
                for at, pid in SESSION_ENDED_LINE.findall(text)]
        conn.execute("TRUNCATE chaos_sessionend")
        with conn.cursor() as cursor:
            cursor.executemany("INSERT INTO chaos_sessionend (backend, at) VALUES (%s, %s)",
                               ends)
        self.report["sessions_ended_in_log"] = len(ends)

    def check(self) -> None:
        if self.network is not None:
            self.network.stop_sampling()
            found_network, violations = self.network.check()
            self.report["network"] = found_network
            self.violations.extend(violations)
            self.network.dump(self.run_dir / "activity.csv")
        with self.connect() as conn:
            self._record_session_ends(conn)
            found = checker.check(conn, self.expected)
            idle = checker.idle_in_transaction(conn, older_than=0)
        self.violations.extend(found.pop("violations"))
        if idle:
            self.violations.append(f"I5: sessions idle in transaction at the end: {idle}")
        committed = len(self.expected.committed)
        producer = self.producer.batches if self.producer else Counter()
        self.report["jobs"] = {
            "scheduled": committed + len(self.expected.rolled_back)
            + sum(len(b) for b in self.expected.uncertain),
            "committed": committed + found["uncertain_batches_committed"]
            * self.config.batch_size,
            "rolled_back": len(self.expected.rolled_back),
            "producer_batches": dict(producer),
            "by_function": dict(Counter(f.rsplit(".", 1)[1]
                                        for f in self.expected.committed.values())),
        }
        self.report["faults"] = dict(self.faults)
        self.report["mixed"] = {
            "actions": dict(self.mixed.counts) if self.mixed else {},
            "prune_runs": self.housekeeper.prunes if self.housekeeper else 0,
            "jobs_pruned": self.housekeeper.pruned if self.housekeeper else 0,
            "unique_samples": self.housekeeper.samples if self.housekeeper else 0,
            "housekeeper_errors": self.housekeeper.errors if self.housekeeper else 0,
            "housekeeper_last_error": self.housekeeper.last_error if self.housekeeper else "",
        }
        self.report["sigstop_outcomes"] = dict(self.sigstop_outcomes)
        self.report["restarts"] = self.restarts
        self.report["checks"] = found
        if found["control_duplicates"] == 0:
            self.violations.append("I6: the negative control shows no duplicates: the chaos "
                                   "is not biting")
        exits = self.daemons.exits if self.daemons else []
        unexpected = [e for e in exits if not e["expected"]]
        self.report["daemon_exits"] = {"total": len(exits), "unexpected": unexpected}
        if unexpected:
            self.violations.append(f"{len(unexpected)} daemons exited unexpectedly: "
                                   f"{[(e['pid'], e['code']) for e in unexpected]}")
        self.report["fault_log"] = self.fault_log

    def stop_producers(self) -> None:
        """Stop the producer, the mixed producer and the pruning (each finishes its step)."""
        for thread in (self.producer, self.mixed, self.housekeeper):
            if thread is not None:
                thread.stop_event.set()
        for thread in (self.producer, self.mixed, self.housekeeper):
            if thread is not None:
                thread.join(30)
                if thread.error is not None:
                    self.violations.append(f"harness error in {thread.name}: "
                                           f"{type(thread.error).__name__}: {thread.error}")
                    thread.error = None

    def teardown(self) -> None:
        self.stop_producers()
        for pid in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.daemons is not None:
            self.daemons.kill_all()
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        if self.bouncer is not None:
            with contextlib.suppress(Exception):
                self.bouncer.stop()
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
            if self.violations:  # the server's log goes with the workers' logs
                with contextlib.suppress(OSError):
                    shutil.copy(self.server.logfile, self.run_dir / "postgres.log")
            if self.config.keep:
                # Keep the data directory to look at: close() would delete it.
                self.server._temp_dirs = [d for d in self.server._temp_dirs
                                          if d != self.server.datadir]
                self.report["kept_datadir"] = str(self.server.datadir)
            self.server.close()
        if self.network is not None:
            with contextlib.suppress(Exception):
                self.network.close()
        if self.violations or self.config.keep:
            self.report["kept_run_dir"] = str(self.run_dir)
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)


# -- reporting ------------------------------------------------------------------------------------


def summary(report: dict[str, Any]) -> str:
    checks = report.get("checks", {})
    jobs = report.get("jobs", {})
    lines = [
        f"seed {report['seed']}: {'OK' if report['ok'] else 'VIOLATIONS'} "
        f"in {report.get('wall_seconds')} s (code {report.get('code')})",
        f"  jobs: scheduled {jobs.get('scheduled')}, committed {jobs.get('committed')}, "
        f"rolled back {jobs.get('rolled_back')}; by status {checks.get('jobs_by_status')}",
        f"  attempts: {checks.get('attempts')}",
        f"  faults: {report.get('faults')}",
        f"  duplicates {checks.get('duplicates')}, losses {checks.get('losses')}, "
        f"effect without completion {checks.get('effect_without_completion')}, "
        f"completion without effect {checks.get('completion_without_effect')}, "
        f"rolled back leaked {checks.get('rolled_back_leaked')}",
        f"  poison: {checks.get('poison')}",
        f"  false quarantines {checks.get('false_quarantines')}; chaos-charged attempts "
        f"{checks.get('chaos_charged')}",
        f"  negative control duplicates: {checks.get('control_duplicates')}",
        f"  mixed: {report.get('mixed')}",
        f"  long jobs {checks.get('long_jobs')}; cancels {checks.get('cancels')}",
        f"  groups {checks.get('groups')}; unique {checks.get('unique')}; "
        f"pruned {checks.get('pruned')}",
        f"  periodic {checks.get('periodic')}",
        "  flow: " + _flow_summary(checks.get("flow") or {}),
        "  restarts: " + "; ".join(
            f"{r['mode']}{' (sync off)' if r['synchronous_commit_off'] else ''}: "
            f"{r['accept_to_first_commit_seconds']} s to first commit"
            for r in report.get("restarts", [])),
        f"  drain after last fault {report.get('drain_seconds_after_last_fault')} s; "
        f"SIGTERM drain {report.get('sigterm', {}).get('drain_seconds')} s; "
        f"double SIGTERM {report.get('double_sigterm')}",
        f"  throughput: {report.get('throughput')}",
    ]
    net = report.get("network") or {}
    if "cuts" in net:
        lines.append(
            f"  network: cuts {net['cuts']} (commit cuts without a COMMIT seen "
            f"{net['commit_cuts_without_a_commit_seen']}); max locked after a cut "
            f"{net['max_locked_after_cut_s']} s, longest host transaction "
            f"{net['longest_host_transaction_s']} s, max back after a heal "
            f"{net['max_back_after_heal_s']} s, max new listener after a LISTEN cut "
            f"{net['max_new_listener_after_s']} s (bounds {net['bounds_s']})")
    elif net:
        lines.append(f"  network: none ({net.get('unavailable')})")
    for violation in report["violations"]:
        lines.append(f"  VIOLATION {violation}")
    return "\n".join(lines)


def _flow_summary(flow: dict[str, Any]) -> str:
    rate = flow.get("rate", {})
    pauses = [(p["seconds"], p["last_start_after_pause_s"], p["first_start_after_resume_s"])
              for p in flow.get("pauses", [])]
    return (f"runs {flow.get('runs')}; max overlap by key {flow.get('max_overlap_by_key')} "
            f"(if cut runs ran to their next mark: "
            f"{flow.get('max_overlap_if_cut_runs_ran_to_their_next_mark')}); pauses "
            f"{pauses}"
            f" (s paused, last start after the pause s, first start after the resume s); "
            f"rate {rate.get('max_in_a_window')} of {rate.get('rate')} in a window "
            f"({rate.get('stamps')} stamps)")


def parse(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     prog="chaos/run.py")
    parser.add_argument("--seed", type=int, default=None,
                        help="RNG seed (default: random, printed)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="ledger jobs to pre-queue (default 20000, --short 2000)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of faults at least (default 60, --short 25)")
    parser.add_argument("--short", action="store_true", help="the quick run for the test suite")
    parser.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory and data directory even on success")
    parser.add_argument("--flow-enforced-concurrency", type=int, default=None,
                        help="the workers enforce this concurrency for tenant:* instead of 2 "
                             "(the checker checks 2): the run must fail F1")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="children per daemon (default 4, --short 2)")
    parser.add_argument("--pgbouncer", choices=["auto", "on", "off"], default="auto",
                        help="run one daemon through PgBouncer (transaction mode) on the "
                             "database's host: auto (default: when there are hosts and a "
                             "PgBouncer), on (fail without one), off")
    parser.add_argument("--local", action="store_true",
                        help="every daemon on this machine's network: no hosts, no cuts "
                             "(the default needs root, ip and nft, and falls back to this)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    if args.short:
        # The worker drains 2,500 short jobs in a few seconds, after which faults mostly hit
        # idle children; a quarter of negative controls (30-80 ms each) keeps the children
        # busy, and the control's duplicates certain, for the first part of the faults.
        config = Config(seed, args.jobs or 2000, args.duration or 25.0, True, args.report,
                        args.keep, poison_each=2, control_share=0.25, warmup=2.0,
                        slow_seconds=2.0, batch_size=5, backlog_target=300,
                        mixed_interval=0.6, cut_seconds=(5.0, 12.0), flow_jobs=400,
                        pause_seconds=4.0, concurrency=2)
    else:
        config = Config(seed, args.jobs or 20000, args.duration or 60.0, False, args.report,
                        args.keep)
    config.flow_enforced_concurrency = args.flow_enforced_concurrency
    config.pgbouncer = args.pgbouncer
    if args.concurrency is not None:
        if args.concurrency < 1:
            parser.error("--concurrency must be at least 1")
        config.concurrency = args.concurrency
    if args.local:
        config.network = False
    elif reason := netns.unavailable():
        config.network, config.network_unavailable = False, reason
        print(f"no hosts and no network faults: {reason}", flush=True)
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
    report = ChaosRun(config).run()
    path = config.report or Path(tempfile.gettempdir()) / f"djasync-chaos-{config.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summary(report), flush=True)
    print(f"report: {path}", flush=True)
    return 0 if report["ok"] else 1
