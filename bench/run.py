#!/usr/bin/env python
"""djasync's benchmark suite: the PostgreSQL floor (pgbench), W1-W6, a profile, optional peers.

    make bench                                  # full suite, median of 3 runs -> bench/REPORT.md
    make bench BENCH_ARGS='--quick'             # small N, 1 run -> bench/work/quick/REPORT.md
    .venv/bin/python bench/run.py --only floor,w1 --runs 5

By default it starts its own throwaway PostgreSQL 18 (tools/pg.py's EmbeddedPostgres, with
pg_stat_statements preloaded) even under ``make bench``, whose own server it then leaves idle:
the floor and every workload then run on one server whose settings the report states.
``--use-env-db`` uses ``DATABASE_URL`` instead (its tables are truncated!).

Every workload resets the queue tables, VACUUMs and CHECKPOINTs before each measured run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT / "tools"))

import procstat  # noqa: E402
import psycopg  # noqa: E402

WORKLOADS = ["floor", "w1", "flow", "w2", "w3", "w6", "w4", "w5", "profile", "peers", "w7"]
#: Run once per round, so the floor and djasync alternate and share the machine's mood; the
#: report takes the median over rounds. The others run once, after the rounds.
ROUNDS = ["floor", "w1", "flow", "w6", "w3", "w2", "peers"]
#: W7 (the soak) takes 20 minutes, so it runs only when asked for (``--only w7``).
DEFAULT_WORKLOADS = [w for w in WORKLOADS if w not in ("peers", "w7")]
QUEUE_TABLES = ["djasync_attempt", "djasync_job", "djasync_group", "djasync_worker",
                "benchapp_ledger", "benchapp_mark"]
SERVER_SETTINGS = {
    # Counting round trips per job (the profile) needs it loaded at start; it stays off
    # (track = none) except during the profile runs.
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "none",
    "pg_stat_statements.track_utility": "on",
    "pg_stat_statements.max": "5000",
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- configuration --------------------------------------------------------------------------


class Config:
    def __init__(self, args: argparse.Namespace) -> None:
        quick = args.quick
        self.quick = quick
        self.runs = args.runs if args.runs is not None else (1 if quick else 3)
        self.n = args.n or (1000 if quick else 10_000)
        self.floor_clients = 4
        self.w2_jobs = 50 if quick else 200
        self.w2_gap = 0.020
        self.w2_concurrency = args.w2_concurrency
        self.w3_single = 300 if quick else 2000
        self.w3_bulk = self.n
        self.w4_rows = args.w4_rows or (50_000 if quick else 1_000_000)
        self.w5_jobs = args.w5_jobs or (10_000 if quick else 100_000)
        self.w5_mark = self.w5_jobs // 10
        self.w7_minutes = args.w7_minutes or (3.0 if quick else 20.0)
        self.w7_rate = args.w7_rate
        self.w7_load = 0.8
        self.log_level = args.worker_log_level
        self.batch = args.batch_size
        self.out = Path(args.out) if args.out else (BENCH / "work" / "quick" if quick else BENCH)
        self.work = BENCH / "work"


# -- database helpers -----------------------------------------------------------------------


class Bench:
    def __init__(self, cfg: Config, url: str, server: Any | None, pgbench: Path,
                 code_dir: Path | None) -> None:
        self.cfg = cfg
        self.code_dir = code_dir
        self.commit = code_dir.name.removeprefix("code-") if code_dir else None
        self.url = url
        self.server = server
        self.pgbench = pgbench
        self.admin = psycopg.connect(url, autocommit=True)
        self.commands: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self.notes: list[str] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="run-", dir=cfg.work))

    # plain SQL, autocommit
    def q(self, query: str, params: Any = None) -> list[tuple]:
        cur = self.admin.execute(query, params)
        return cur.fetchall() if cur.description else []

    def one(self, query: str, params: Any = None) -> Any:
        return self.q(query, params)[0][0]

    def settle(self, tables: list[str]) -> None:
        for table in tables:
            self.q(f"VACUUM ANALYZE {table}")
        self.q("CHECKPOINT")

    def reset_queue(self) -> None:
        self.q(f"TRUNCATE {', '.join(QUEUE_TABLES)} RESTART IDENTITY CASCADE")
        self.settle(["djasync_job", "djasync_attempt"])

    def server_cpu(self) -> float | None:
        pid = self.server.pid if self.server is not None else None
        return procstat.tree_cpu(pid) if pid else None

    def fill_jobs(self, table: str, count: int, *, status: str = "pending",
                  run_after: str = "now() - interval '1 second'", name: str = "benchapp.jobs.noop",
                  finished: bool = False) -> None:
        """Insert ``count`` job rows with one INSERT ... SELECT generate_series (no Python)."""
        done = "now() - interval '1 day'" if finished else "NULL"
        self.q(f"""
            INSERT INTO {table} (name, args, kwargs, meta, queue, priority, run_after, status,
                                 attempts, identity, created_at, started_at, finished_at, worker)
            SELECT %s, '[]', '{{}}', '{{}}', 'default', 0, {run_after}, %s,
                   {1 if finished else 0}, md5(g::text), now(), {done}, {done}, ''
              FROM generate_series(1, %s) g""", (name, status, count))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the floor: pgbench ---------------------------------------------------------------------

FLOOR_CLAIM = ("SELECT id FROM floor_job WHERE status = 'pending' AND run_after <= now() "
               "ORDER BY priority DESC, run_after, id LIMIT {k} FOR NO KEY UPDATE SKIP LOCKED")
FLOOR_WORK = ("INSERT INTO floor_ledger (key, created_at) VALUES (:{v}, now());\n"
              "UPDATE floor_job SET status = 'succeeded', attempts = 1, started_at = now(), "
              "finished_at = clock_timestamp() WHERE id = :{v};\n")


def floor_script(k: int) -> str:
    """A pgbench script: claim k jobs in one statement, run each (ledger row + mark done), commit.

    With k > 1 each job sits in its own savepoint, as djasync's batches do (DESIGN §3).
    """
    lines = ["-- written by bench/run.py: the raw-SQL floor, "
             f"{k} job(s) per transaction", "BEGIN;"]
    if k == 1:
        lines.append(FLOOR_CLAIM.format(k=1) + " \\gset job_")
        lines.append(FLOOR_WORK.format(v="job_id").rstrip())
    else:
        cols = ", ".join(f"ids[{i}] AS id{i}" for i in range(1, k + 1))
        lines.append(f"SELECT {cols} FROM (SELECT array_agg(id) AS ids FROM "
                     f"({FLOOR_CLAIM.format(k=k)}) c) a \\gset")
        for i in range(1, k + 1):
            lines.append("SAVEPOINT job;")
            lines.append(FLOOR_WORK.format(v=f"id{i}").rstrip())
            lines.append("RELEASE SAVEPOINT job;")
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def floor(b: Bench, rep: int) -> None:
    cfg = b.cfg
    if rep == 0:
        b.q("DROP TABLE IF EXISTS floor_job, floor_ledger")
        # Same columns, constraints and indexes (the partial claim index) as the real tables.
        b.q("CREATE TABLE floor_job (LIKE djasync_job INCLUDING ALL)")
        b.q("CREATE TABLE floor_ledger (LIKE benchapp_ledger INCLUDING ALL)")
    clients = cfg.floor_clients
    variants = [
        ("one job/txn, prepared", 1, "prepared", cfg.n),
        ("one job/txn, simple protocol", 1, "simple", cfg.n),
        (f"{cfg.batch} jobs/txn + savepoints, prepared", cfg.batch, "prepared", 2 * cfg.n),
    ]
    out: dict[str, list[dict]] = b.results.setdefault("floor", {})
    for run in [rep]:
        for label, k, mode, n in variants:
            per_client = max(1, n // (clients * k))
            total = per_client * clients * k
            script = BENCH / "floor" / f"jobs{k}.sql"
            script.parent.mkdir(exist_ok=True)
            script.write_text(floor_script(k))
            b.q("TRUNCATE floor_job, floor_ledger RESTART IDENTITY")
            b.fill_jobs("floor_job", total)
            b.settle(["floor_job", "floor_ledger"])
            cmd = [str(b.pgbench), "-n", "-c", str(clients), "-j", "2", "-t", str(per_client),
                   "-M", mode, "-f", str(script.relative_to(ROOT)), b.url]
            shown_cmd = shlex.join(["pgbench", *cmd[1:-1]])
            b.commands[f"floor: {label}"] = f'{shown_cmd} "$DATABASE_URL"'
            cpu0 = b.server_cpu()
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - start
            cpu1 = b.server_cpu()
            if proc.returncode != 0:
                raise RuntimeError(f"pgbench failed:\n{proc.stdout}\n{proc.stderr}")
            tps = float(re.search(r"tps = ([\d.]+) \(without initial", proc.stdout).group(1))
            latency = re.search(r"latency average = ([\d.]+) ms", proc.stdout)
            done = b.one("SELECT count(*) FROM floor_job WHERE status = 'succeeded'")
            ledger = b.one("SELECT count(*) FROM floor_ledger")
            if done != total or ledger != total:
                raise RuntimeError(f"floor {label}: {done} done, {ledger} ledger rows of {total}")
            rec = {"jobs": total, "tps": tps, "jobs_per_s": tps * k, "wall_s": wall,
                   "txn_latency_ms": float(latency.group(1)) if latency else None,
                   "server_cpu_s": None if cpu0 is None else cpu1 - cpu0}
            out.setdefault(label, []).append(rec)
            log(f"floor run {run + 1} {label}: {rec['jobs_per_s']:.0f} jobs/s")


# -- running the worker ---------------------------------------------------------------------


def worker_cmd(cfg: Config, concurrency: int, batch: int, burst: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "djasync_worker", "--settings", "benchproject.settings",
           "--pythonpath", str(BENCH), "--concurrency", str(concurrency),
           "--batch-size", str(batch), "--log-level", cfg.log_level]
    return cmd + (["--burst"] if burst else [])


def worker_env(b: Bench) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJASYNC_WORKER_")}
    env["BENCH_DATABASE_URL"] = b.url
    env.pop("DJANGO_SETTINGS_MODULE", None)
    # This sandbox sets PYTHONDONTWRITEBYTECODE and its venv has no .pyc files, so every worker
    # would compile Django from source at start-up (~2.5 s here); real installs have bytecode.
    # Keep a bytecode cache, outside the source tree and the venv.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(BENCH / "work" / "pycache")
    if b.code_dir is not None:  # the snapshot of djasync under test comes first
        env["PYTHONPATH"] = os.pathsep.join(
            [str(b.code_dir), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def worker_cwd(b: Bench) -> Path:
    """``python -m`` puts the current directory first on sys.path: never the work tree."""
    return b.code_dir or ROOT


def shown(cmd: list[str]) -> str:
    text = shlex.join(["djasync-worker", *cmd[3:]])
    return text.replace(str(BENCH), "bench")


def launch(b: Bench, cmd: list[str], logname: str,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """Start a worker (``cmd``), its output appended to ``<logname>.log`` in the run's log
    folder; return it and that file. ``env``: variables added to :func:`worker_env`'s."""
    logfile = b.logdir / f"{re.sub(r'[^a-z0-9]+', '-', logname.lower())}.log"
    with open(logfile, "ab") as out:  # the worker keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env={**worker_env(b), **(env or {})}, stdout=out,
                                stderr=out, cwd=worker_cwd(b))
    return proc, logfile


def run_burst(b: Bench, label: str, concurrency: int, batch: int, *, keep_rss: bool = False,
              on_start: Any = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``djasync-worker --burst`` to completion; return wall time and CPU figures."""
    cmd = worker_cmd(b.cfg, concurrency, batch)
    b.commands[label] = shown(cmd)
    cpu0 = b.server_cpu()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc, logfile = launch(b, cmd, label, env)
    sampler = procstat.Sampler(proc.pid, keep_rss=keep_rss).start()
    extra = on_start(proc) if on_start else None
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop()
    cpu1 = b.server_cpu()
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: worker exited {proc.returncode}; see {logfile}")
    total_cpu = usage.ru_utime + usage.ru_stime
    return {
        "wall_s": wall, "worker_cpu_s": total_cpu, "supervisor_cpu_s": sampler.root_cpu,
        "children_cpu_s": total_cpu - sampler.root_cpu,
        "server_cpu_s": None if cpu0 is None else cpu1 - cpu0, "loadavg_1m_before": load,
        "sampler": sampler, "extra": extra,
    }


def drain_figures(b: Bench, n: int, since_id: int = 0) -> dict[str, Any]:
    row = b.q("""
        SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*),
               extract(epoch FROM min(started_at)), extract(epoch FROM max(finished_at)),
               (SELECT count(*) FROM djasync_attempt a WHERE a.job_id > %s)
          FROM djasync_job WHERE id > %s""", (since_id, since_id))[0]
    succeeded, total, first, last, attempts = row
    if succeeded != n or total != n or attempts != n:
        raise RuntimeError(f"expected {n} jobs succeeded once: {succeeded} succeeded of {total}, "
                           f"{attempts} attempts")
    return {"jobs": n, "first_start": float(first), "last_finish": float(last),
            "span_s": float(last) - float(first)}


def enqueue(n: int, function: str = "benchapp.jobs.noop", keyed: bool = False) -> float:
    """Queue ``n`` jobs with schedule_many, 10,000 per call; return the seconds it took."""
    from djasync import JobSpec, schedule_many

    start = time.perf_counter()
    for base in range(0, n, 10_000):
        specs = [JobSpec(function, [i] if keyed else None)
                 for i in range(base, min(n, base + 10_000))]
        schedule_many(specs)
    return time.perf_counter() - start


def drain_variant(b: Bench, workload: str, label: str, concurrency: int, batch: int,
                  function: str, keyed: bool, n: int, *, reset: bool = True,
                  since_id: int = 0, daemon: bool = False, limits: str | None = None,
                  env: dict[str, str] | None = None) -> dict[str, Any]:
    """Queue n jobs, drain them with a worker, check each ran once; retry a run that a stray
    signal cut short (the machine is shared; other sessions stop their own workers).

    ``limits``: the jobs' flow-control keys (a JSON array, written into their rows; the
    worker's ``LIMITS`` come with ``env``, see ``benchproject.settings``)."""
    for attempt in range(3):
        if reset:
            b.reset_queue()
        else:
            b.q("DELETE FROM djasync_attempt WHERE job_id > %s", (since_id,))
            b.q("DELETE FROM djasync_job WHERE id > %s", (since_id,))
        if keyed:
            b.q("TRUNCATE benchapp_ledger")
        enqueue(n, function, keyed)
        if limits is not None:
            b.q("UPDATE djasync_job SET limits = %s::jsonb WHERE id > %s", (limits, since_id))
        b.settle(["djasync_job"])
        try:
            if daemon:
                res = run_daemon_drain(b, f"{workload}: {label}", concurrency, batch, n, since_id)
            else:
                res = run_burst(b, f"{workload}: {label}", concurrency, batch, env=env)
            figures = drain_figures(b, n, since_id)
            break
        except RuntimeError as exc:
            if attempt == 2:
                raise
            b.notes.append(f"{workload} {label}: run repeated after: {exc}")
            log(f"{workload} {label}: {exc}; repeating the run")
    res.pop("sampler")
    res.pop("extra")
    figures.update(res)
    figures["jobs_per_s"] = n / figures["wall_s"]
    figures["jobs_per_s_after_first"] = n / figures["span_s"]
    if keyed:
        rows, keys = b.q("SELECT count(*), count(DISTINCT key) FROM benchapp_ledger")[0]
        if rows != n or keys != n:
            raise RuntimeError(f"{label}: ledger has {rows} rows, {keys} keys, for {n} jobs")
        figures["ledger_rows"] = rows
    log(f"{workload} {label}: {figures['jobs_per_s']:.0f} jobs/s with start-up, "
        f"{figures['jobs_per_s_after_first']:.0f} after the first job")
    return figures


def run_daemon_drain(b: Bench, label: str, concurrency: int, batch: int, n: int,
                     since_id: int, keep_rss: bool = False,
                     on_start: Any = None) -> dict[str, Any]:
    """Like run_burst, but without --burst: a daemon drains the queue and is stopped (SIGTERM)
    once every job finished. Wall time ends when the poll (every 100 ms) sees no pending job."""
    cmd = worker_cmd(b.cfg, concurrency, batch, burst=False)
    b.commands[label] = shown(cmd) + "   # stopped with SIGTERM once all jobs finished"
    cpu0 = b.server_cpu()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc, _ = launch(b, cmd, label)
    sampler = procstat.Sampler(proc.pid, keep_rss=keep_rss).start()
    if on_start:
        on_start(proc)
    try:
        # Cheap (the partial index over pending rows; ~0.1 ms): a job being run is still
        # pending (locked) until its transaction commits.
        while b.one("SELECT EXISTS (SELECT 1 FROM djasync_job WHERE status = 'pending' "
                    "AND id > %s)", (since_id,)):
            if proc.poll() is not None:
                raise RuntimeError(f"{label}: the daemon exited {proc.returncode}")
            # Not faster: with the dead index entries a drain leaves behind, this poll costs
            # ~1.4 ms of server time (pg_stat_statements); 10/s is < 2% of one CPU.
            time.sleep(0.1)
        wall = time.perf_counter() - start
        cpu1 = b.server_cpu()
        sup_cpu = sampler.root_cpu
        total_cpu = procstat.tree_cpu(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        sampler.stop()
    return {
        "wall_s": wall, "worker_cpu_s": total_cpu, "supervisor_cpu_s": sup_cpu,
        "children_cpu_s": total_cpu - sup_cpu,
        "server_cpu_s": None if cpu0 is None else cpu1 - cpu0, "loadavg_1m_before": load,
        "sampler": sampler, "extra": None,
    }


def drain_variants(cfg: Config) -> list[tuple[str, int, int]]:
    k = cfg.batch
    return [("c1", 1, 1), ("c4", 4, 1), (f"c1 batch {k}", 1, k), (f"c4 batch {k}", 4, k)]


#: W1 also drains with a daemon (no --burst), the mode production runs in.
DAEMON_VARIANTS = [("c1 daemon", 1, 1), ("c4 daemon", 4, 1)]


def w1(b: Bench, rep: int) -> None:
    out: dict[str, list] = b.results.setdefault("w1", {})
    for run in [rep]:
        for label, c, k in drain_variants(b.cfg) + DAEMON_VARIANTS:
            rec = drain_variant(b, "W1", label, c, k, "benchapp.jobs.noop", False, b.cfg.n,
                                daemon="daemon" in label)
            out.setdefault(label, []).append(rec)
        log(f"W1 run {run + 1} done")


# -- flow control (issue 16) ----------------------------------------------------------------

FLOW_LIMITS = {"eight": {"concurrency": 8}, "full": {"concurrency": 1},
               "other": {"concurrency": 1}}
#: (label, worker's LIMITS or None, the jobs' keys): W1 c4 three ways, one after the other.
FLOW_VARIANTS = [
    ("c4, no LIMITS", None, None),
    ("c4, LIMITS set, jobs without keys", FLOW_LIMITS, None),
    ("c4, one key with concurrency 8", FLOW_LIMITS, '["eight"]'),
]
FLOW_WAITING = 100_000
FLOW_CLAIMS = 500


def flow(b: Bench, rep: int) -> None:
    """What flow control costs: W1 c4 without LIMITS, with LIMITS and jobs without keys, and
    with every job holding one key of concurrency 8; in the last round, the server time of a
    claim of other work behind FLOW_WAITING jobs waiting on a full key."""
    out: dict[str, list] = b.results.setdefault("flow", {})
    for label, limits, keys in FLOW_VARIANTS:
        env = {"BENCH_LIMITS": json.dumps(limits)} if limits else None
        rec = drain_variant(b, "flow", label, 4, 1, "benchapp.jobs.noop", False, b.cfg.n,
                            limits=keys, env=env)
        out.setdefault(label, []).append(rec)
    if rep == b.cfg.runs - 1:
        b.results["flow_claim"] = flow_claim_times(b)


def flow_claim_times(b: Bench) -> dict[str, Any]:
    """Server time (EXPLAIN ANALYZE's execution time) of the worker's claim, FLOW_CLAIMS
    times, with FLOW_WAITING due jobs ranked first that hold the key "full", whose one slot
    another session holds: a claim of one job (the job without keys) and of two (and a job
    of the key "other"). Each claim commits, as a worker's does (the jobs stay pending)."""
    from djasync import sql

    b.reset_queue()
    b.fill_jobs("djasync_job", FLOW_WAITING)
    b.q("UPDATE djasync_job SET priority = 1, limits = '[\"full\"]'")
    b.fill_jobs("djasync_job", 1)
    b.fill_jobs("djasync_job", 1)
    b.q("UPDATE djasync_job SET limits = '[\"other\"]' WHERE id = %s", (FLOW_WAITING + 2,))
    b.settle(["djasync_job"])
    params = {"queues": None, "now": None, "name_prefix": None, "job_id": None,
              "cfg_keys": list(FLOW_LIMITS),
              "cfg_concurrency": [v["concurrency"] for v in FLOW_LIMITS.values()],
              "cfg_rate": [0] * len(FLOW_LIMITS), "cfg_per": [0.0] * len(FLOW_LIMITS),
              "channel": None}
    holder = psycopg.connect(b.url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(hashtext('djasync.limit:full'), 0)")
    results: dict[str, Any] = {"waiting": FLOW_WAITING, "claims": FLOW_CLAIMS}
    try:
        with psycopg.connect(b.url) as db:
            for limit in (1, 2):
                times = []
                statement = "EXPLAIN (ANALYZE, TIMING OFF, SUMMARY ON) " + sql.claim_limited(limit)
                for i in range(FLOW_CLAIMS + 20):
                    db.execute(sql.CLAIM_SETTINGS, {"statement": "0", "idle": "0"})
                    plan = db.execute(statement, params).fetchall()
                    db.commit()
                    if i >= 20:  # the first ones plan the function's statements
                        times.append(float(re.search(r"Execution Time: ([\d.]+)",
                                                     plan[-1][0]).group(1)))
                times.sort()
                results[f"claim {limit}"] = {
                    "median_ms": statistics.median(times), "p95_ms": pct(times, 95),
                    "p99_ms": pct(times, 99), "max_ms": times[-1]}
                log(f"flow: claim of {limit} behind {FLOW_WAITING} waiting jobs: "
                    f"median {statistics.median(times):.3f} ms, p95 {pct(times, 95):.3f} ms")
    finally:
        holder.close()
    b.commands["flow: claim behind a full key"] = (
        f"EXPLAIN (ANALYZE, TIMING OFF) {sql.claim_limited(1).strip()}   # x{FLOW_CLAIMS}")
    return results


def w6(b: Bench, rep: int) -> None:
    out: dict[str, list] = b.results.setdefault("w6", {})
    for _run in [rep]:
        for label, c, k in drain_variants(b.cfg):
            rec = drain_variant(b, "W6", label, c, k, "benchapp.jobs.ledger", True, b.cfg.n)
            out.setdefault(label, []).append(rec)


# -- W2: pickup latency ---------------------------------------------------------------------


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def w2(b: Bench, rep: int) -> None:
    from django.db import transaction

    from djasync import schedule

    cfg = b.cfg
    out: list[dict] = b.results.setdefault("w2", [])
    for run in [rep]:
        b.reset_queue()
        cmd = worker_cmd(cfg, cfg.w2_concurrency, 1, burst=False)
        b.commands["W2: daemon"] = shown(cmd)
        proc, _ = launch(b, cmd, "w2")
        try:
            wait_for(lambda: b.one("SELECT count(*) FROM djasync_worker") > 0, 30,
                     "the daemon to register")
            # Warm up: one job through every child's first claim, then let it go idle.
            for key in range(-cfg.w2_concurrency, 0):
                schedule("benchapp.jobs.mark", [key])
            wait_for(lambda: b.one("SELECT count(*) FROM djasync_job WHERE status = "
                                   "'succeeded'") == cfg.w2_concurrency, 30, "warm-up jobs")
            time.sleep(1.0)
            committed: dict[int, float] = {}
            t0 = time.perf_counter()
            for i in range(cfg.w2_jobs):
                delay = t0 + i * cfg.w2_gap - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                with transaction.atomic():
                    job = schedule("benchapp.jobs.mark", [i])
                committed[job.pk] = time.time()  # right after COMMIT returned
            wait_for(lambda: b.one("SELECT count(*) FROM benchapp_mark WHERE key >= 0")
                     == cfg.w2_jobs, 60, "W2 jobs")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        rows = b.q("""SELECT j.id, extract(epoch FROM j.started_at), m.ran_at
                        FROM djasync_job j JOIN benchapp_mark m ON m.key = (j.args->>0)::int
                       WHERE m.key >= 0""")
        to_start = sorted((float(s) - committed[i]) * 1000 for i, s, _ in rows)
        to_body = sorted((r - committed[i]) * 1000 for i, _, r in rows)
        rec = {"jobs": len(rows), "start_ms": to_start, "body_ms": to_body,
               **{f"start_p{p}": pct(to_start, p) for p in (50, 95, 99)},
               **{f"body_p{p}": pct(to_body, p) for p in (50, 95, 99)},
               "start_max": to_start[-1]}
        out.append(rec)
        log(f"W2 run {run + 1}: commit->started_at p50 {rec['start_p50']:.1f} ms, "
            f"p95 {rec['start_p95']:.1f}, p99 {rec['start_p99']:.1f}")


def pct(sorted_values: list[float], p: float) -> float:
    """Percentile with linear interpolation between closest ranks."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * p / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# -- W3: enqueue ----------------------------------------------------------------------------

RAW_INSERT = """
INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, status, attempts,
                         identity, created_at, worker)
VALUES (%s, '[]', '{}', '{}', 'default', 0, now(), 'pending', 0, %s, now(), '')
RETURNING id"""


def w3(b: Bench, rep: int) -> None:
    from djasync import JobSpec, schedule, schedule_many

    cfg = b.cfg
    out: dict[str, list] = b.results.setdefault("w3", {})
    m = cfg.w3_single
    for _run in [rep]:
        b.reset_queue()
        start = time.perf_counter()
        for _ in range(m):
            schedule("benchapp.jobs.noop")  # its own transaction (autocommit outside atomic)
        out.setdefault("schedule(), one per transaction", []).append(
            {"jobs": m, "wall_s": time.perf_counter() - start})

        b.reset_queue()
        with psycopg.connect(b.url) as conn:
            start = time.perf_counter()
            for i in range(m):
                conn.execute(RAW_INSERT, ("benchapp.jobs.noop", f"{i:040d}")).fetchone()
                conn.execute("SELECT pg_notify('djasync', 'default')")
                conn.commit()
            wall = time.perf_counter() - start
        out.setdefault("raw psycopg INSERT+NOTIFY+COMMIT", []).append({"jobs": m, "wall_s": wall})

        b.reset_queue()
        specs = [JobSpec("benchapp.jobs.noop") for _ in range(cfg.w3_bulk)]
        start = time.perf_counter()
        schedule_many(specs)
        out.setdefault(f"schedule_many({cfg.w3_bulk} jobs)", []).append(
            {"jobs": cfg.w3_bulk, "wall_s": time.perf_counter() - start})

        b.reset_queue()
        with psycopg.connect(b.url) as conn, conn.cursor() as cur:
            start = time.perf_counter()
            with cur.copy("COPY djasync_job (name, args, kwargs, meta, queue, priority, "
                          "run_after, status, attempts, identity, created_at, worker) "
                          "FROM STDIN") as copy:
                now = datetime.datetime.now(datetime.UTC)
                for i in range(cfg.w3_bulk):
                    copy.write_row(("benchapp.jobs.noop", "[]", "{}", "{}", "default", 0, now,
                                    "pending", 0, f"{i:040d}", now, ""))
            cur.execute("SELECT pg_notify('djasync', 'default')")
            conn.commit()
            wall = time.perf_counter() - start
        out.setdefault(f"raw psycopg COPY ({cfg.w3_bulk} rows)", []).append(
            {"jobs": cfg.w3_bulk, "wall_s": wall})
    for label, recs in out.items():
        rec = recs[-1]
        rec["jobs_per_s"] = rec["jobs"] / rec["wall_s"]
        log(f"W3 {label}: {rec['jobs_per_s']:.0f} jobs/s")


# -- W4: big tables -------------------------------------------------------------------------


def w4(b: Bench) -> None:
    cfg = b.cfg
    rows = cfg.w4_rows
    b.reset_queue()
    start = time.perf_counter()
    b.fill_jobs("djasync_job", rows, status="succeeded", finished=True,
                run_after="now() - interval '1 day'")
    b.fill_jobs("djasync_job", rows, run_after="now() + interval '30 days'")
    fill = time.perf_counter() - start
    b.settle(["djasync_job"])
    log(f"W4: {rows} finished + {rows} future pending rows in {fill:.1f} s")
    size = b.one("SELECT pg_size_pretty(pg_total_relation_size('djasync_job'))")
    out: dict[str, Any] = {"rows_finished": rows, "rows_future": rows, "fill_s": fill,
                           "table_size": size, "runs": {}}
    k = cfg.batch
    for _run in range(cfg.runs):
        for label, c, batch in [("c4", 4, 1), (f"c4 batch {k}", 4, k)]:
            watermark = b.one("SELECT coalesce(max(id), 0) FROM djasync_job")
            rec = drain_variant(b, "W4", label, c, batch, "benchapp.jobs.noop", False, cfg.n,
                                reset=False, since_id=watermark)
            rec["cleanup_at_id"] = watermark
            out["runs"].setdefault(label, []).append(rec)
            b.q("DELETE FROM djasync_attempt WHERE job_id > %s", (watermark,))
            b.q("DELETE FROM djasync_job WHERE id > %s", (watermark,))
            b.settle(["djasync_job", "djasync_attempt"])
    b.results["w4"] = out


# -- W5: memory -----------------------------------------------------------------------------


def w5(b: Bench) -> None:
    cfg = b.cfg
    n = cfg.w5_jobs
    for attempt in range(3):
        b.reset_queue()
        enqueue(n)
        b.settle(["djasync_job"])
        try:
            # A daemon, not --burst: the figure is about the child, and in this version a
            # --burst supervisor spins (see the profile), which would only make W5 slower.
            res = run_daemon_drain(b, "W5: c1 daemon", 1, 1, n, 0, keep_rss=True)
            figures = drain_figures(b, n)
            break
        except RuntimeError as exc:
            if attempt == 2:
                raise
            b.notes.append(f"W5: run repeated after: {exc}")
    finishes = [float(r[0]) for r in b.q(
        "SELECT extract(epoch FROM finished_at) FROM djasync_job ORDER BY finished_at")]
    sampler = res["sampler"]
    child = sampler.child_pids[0] if sampler.child_pids else None
    import bisect

    timeline = [(bisect.bisect_right(finishes, t), rss) for t, pid, rss in sampler.rss
                if pid == child]
    def rss_at(jobs: int) -> int | None:
        later = [rss for done, rss in timeline if done >= jobs]
        return later[0] if later else None
    at_mark, at_end = rss_at(cfg.w5_mark), rss_at(int(n * 0.99))
    last = timeline[-1][1] if timeline else None
    b.results["w5"] = {
        "jobs": n, "mark": cfg.w5_mark, "rss_at_mark": at_mark, "rss_at_99pct": at_end,
        "rss_last": last, "rss_first": timeline[0][1] if timeline else None,
        "growth_pct": (100 * (at_end - at_mark) / at_mark) if at_mark and at_end else None,
        "timeline": timeline[:: max(1, len(timeline) // 400)],
        "jobs_per_s": n / res["wall_s"], "span_s": figures["span_s"],
    }
    log(f"W5: RSS {at_mark} B at job {cfg.w5_mark}, {at_end} B at 99% of {n}")


# -- W7: soak ------------------------------------------------------------------------------

W7_CONCURRENCY = 4
W7_SAMPLE_S = 10.0
W7_PRUNE_S = 60.0
W7_SIZES = """
SELECT pg_relation_size('djasync_job'), pg_indexes_size('djasync_job'),
       pg_relation_size('djasync_attempt'), pg_indexes_size('djasync_attempt'),
       (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'djasync_job'),
       (SELECT autovacuum_count FROM pg_stat_user_tables WHERE relname = 'djasync_job'),
       pg_current_wal_lsn() - '0/0'::pg_lsn"""


def w7(b: Bench) -> None:
    """A daemon under a steady 80% of its measured drain rate for w7_minutes, with
    ``prune_jobs`` every minute: does the drain rate hold, do the tables stop growing?"""
    import io

    from django.core.management import call_command

    cfg = b.cfg
    rate = cfg.w7_rate
    if rate is None:
        cal = drain_variant(b, "W7", "calibration c4 daemon", W7_CONCURRENCY, 1,
                            "benchapp.jobs.noop", False, cfg.n, daemon=True)
        rate = cal["jobs_per_s_after_first"]
    target = cfg.w7_load * rate
    duration = cfg.w7_minutes * 60
    log(f"W7: drain rate {rate:.0f} jobs/s; soak at {target:.0f} jobs/s for {duration:.0f} s")
    b.reset_queue()
    cmd = worker_cmd(cfg, W7_CONCURRENCY, 1, burst=False)
    b.commands["W7: daemon"] = shown(cmd)
    b.commands["W7: prune every minute"] = "django-admin prune_jobs --older-than 0.000694"
    samples: list[dict[str, Any]] = []
    prunes: list[dict[str, Any]] = []
    enqueued = 0
    proc, logfile = launch(b, cmd, "w7")
    try:
        wait_for(lambda: b.one("SELECT count(*) FROM djasync_worker") > 0, 60,
                 "the daemon to register")
        t0 = time.perf_counter()
        next_sample, next_prune = 0.0, W7_PRUNE_S
        while (now := time.perf_counter() - t0) < duration:
            if proc.poll() is not None:
                raise RuntimeError(f"W7: the daemon exited {proc.returncode}; see {logfile}")
            due = int(target * now) - enqueued
            if due > 0:
                enqueued += due
                enqueue(due)
            if now >= next_sample:
                pending = b.one("SELECT count(*) FROM djasync_job WHERE status = 'pending'")
                job, job_idx, att, att_idx, dead, autovacuums, wal = b.q(W7_SIZES)[0]
                samples.append({"t": now, "enqueued": enqueued, "pending": pending,
                                 "done": enqueued - pending, "job_bytes": job,
                                 "job_index_bytes": job_idx, "attempt_bytes": att,
                                 "attempt_index_bytes": att_idx, "job_dead_tuples": dead,
                                 "job_autovacuums": autovacuums, "wal_bytes": int(wal)})
                next_sample += W7_SAMPLE_S
            if now >= next_prune:
                out = io.StringIO()
                begin = time.perf_counter()
                call_command("prune_jobs", older_than=1 / 1440, stdout=out)
                deleted = re.search(r"deleted (\d+)", out.getvalue())
                prunes.append({"t": now, "s": time.perf_counter() - begin,
                               "deleted": int(deleted.group(1)) if deleted else None})
                next_prune += W7_PRUNE_S
            time.sleep(0.05)
        wait_for(lambda: b.one("SELECT count(*) FROM djasync_job WHERE status = 'pending'")
                 == 0, 300, "W7's backlog to drain")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    bad = b.one("SELECT count(*) FROM djasync_job WHERE status <> 'succeeded'")
    if bad:
        raise RuntimeError(f"W7: {bad} jobs did not succeed")
    window = min(300.0, duration / 4)

    def rate_between(start: float, end: float) -> float:
        inside = [s for s in samples if start <= s["t"] <= end]
        if len(inside) < 2:
            return math.nan
        return (inside[-1]["done"] - inside[0]["done"]) / (inside[-1]["t"] - inside[0]["t"])

    last_t = samples[-1]["t"]
    first, last = rate_between(0, window), rate_between(last_t - window, last_t)

    def total(s: dict) -> int:
        return s["job_bytes"] + s["job_index_bytes"] + s["attempt_bytes"] + s["attempt_index_bytes"]

    half = [s for s in samples if s["t"] >= last_t / 2]
    b.results["w7"] = {
        "minutes": cfg.w7_minutes, "drain_rate": rate, "rate_measured": cfg.w7_rate is None,
        "target_rate": target, "window_s": window, "enqueued": enqueued,
        "first_window_rate": first, "last_window_rate": last, "ratio": last / first,
        "size_mid": total(half[0]), "size_end": total(samples[-1]),
        "size_max_second_half": max(total(s) for s in half),
        "size_max_first_half": max(total(s) for s in samples if s["t"] < last_t / 2),
        "samples": samples, "prunes": prunes, "concurrency": W7_CONCURRENCY,
    }
    log(f"W7: {first:.0f} jobs/s in the first {window:.0f} s, {last:.0f} in the last "
        f"({100 * last / first:.0f}%); tables+indexes {total(samples[-1]) / 2**20:.1f} MiB "
        f"at the end, {total(half[0]) / 2**20:.1f} MiB at half-time")


# -- the profile ----------------------------------------------------------------------------


def find_child(pid: int, timeout: float = 20.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = procstat.children(pid)
        if kids:
            return kids[0]
        time.sleep(0.01)
    return None


def profile(b: Bench) -> None:
    cfg = b.cfg
    out: dict[str, Any] = {}
    have_pss = b.server is not None
    if have_pss:
        b.q("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    k = cfg.batch
    for label, c, batch in [("c1", 1, 1), ("c1 daemon", 1, 1), (f"c4 batch {k}", 4, k)]:
        n = cfg.n
        b.reset_queue()
        enqueue(n)
        b.settle(["djasync_job"])
        if have_pss:
            b.q("ALTER SYSTEM SET pg_stat_statements.track = 'top'")
            b.q("SELECT pg_reload_conf()")
            time.sleep(0.2)
            b.q("SELECT pg_stat_statements_reset()")
        spy: dict[str, Any] = {}

        def attach(proc: subprocess.Popen, spy: dict = spy, label: str = label) -> None:
            if not label.startswith("c1"):
                return
            child = find_child(proc.pid)
            slug = label.replace(" ", "-")
            raw = b.logdir / f"pyspy-child-{slug}.txt"
            sup_raw = b.logdir / f"pyspy-supervisor-{slug}.txt"
            spy["child"] = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--idle", "--format",
                 "raw", "--rate", "250", "--nonblocking", "-o", str(raw), "-p", str(child)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            spy["supervisor"] = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--idle", "--format",
                 "raw", "--rate", "100", "--nonblocking", "-o", str(sup_raw), "-p",
                 str(proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            spy["raw"], spy["sup_raw"] = raw, sup_raw

        if "daemon" in label:
            res = run_daemon_drain(b, f"profile: {label}", c, batch, n, 0, on_start=attach)
        else:
            res = run_burst(b, f"profile: {label}", c, batch, on_start=attach)
        figures = drain_figures(b, n)
        rec: dict[str, Any] = {"jobs": n, "jobs_per_s": n / res["wall_s"],
                               "jobs_per_s_after_first": n / figures["span_s"],
                               "worker_cpu_s": res["worker_cpu_s"],
                               "supervisor_cpu_s": res["supervisor_cpu_s"],
                               "children_cpu_s": res["children_cpu_s"],
                               "server_cpu_s": res["server_cpu_s"], "wall_s": res["wall_s"]}
        if have_pss:
            b.q("ALTER SYSTEM SET pg_stat_statements.track = 'none'")
            b.q("SELECT pg_reload_conf()")
            stmts = b.q("""SELECT calls, total_exec_time, rows, query FROM pg_stat_statements
                            WHERE dbid = (SELECT oid FROM pg_database
                                           WHERE datname = current_database())
                            ORDER BY calls DESC, total_exec_time DESC""")
            rec["statements"] = [
                {"calls": c_, "exec_ms": float(t), "rows": r, "query": " ".join(q.split())[:300]}
                for c_, t, r, q in stmts if c_ >= n // 10]
            rec["statements_total_calls"] = sum(s[0] for s in stmts)
            rec["statements_total_exec_ms"] = sum(float(s[1]) for s in stmts)
        for name in ("child", "supervisor"):
            if name in spy:
                try:
                    spy[name].wait(timeout=30)
                except subprocess.TimeoutExpired:
                    spy[name].kill()
        if "raw" in spy:
            rec["pyspy_child"] = summarise_stacks(spy["raw"])
            rec["pyspy_supervisor"] = summarise_stacks(spy["sup_raw"])
        out[label] = rec
        log(f"profile {label}: {rec['jobs_per_s']:.0f} jobs/s")
    b.results["profile"] = out


def summarise_stacks(path: Path) -> dict[str, Any] | None:
    """Aggregate py-spy's raw (collapsed) stacks: inclusive share per frame, and leaves."""
    if not path.exists():
        return None
    inclusive: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if f]
        seen = set()
        for frame in frames:
            key = simplify(frame)
            if key not in seen:
                seen.add(key)
                inclusive[key] = inclusive.get(key, 0) + count
        leaf = simplify(frames[-1]) if frames else "?"
        leaves[leaf] = leaves.get(leaf, 0) + count
    top = sorted(inclusive.items(), key=lambda kv: -kv[1])[:60]
    top_leaves = sorted(leaves.items(), key=lambda kv: -kv[1])[:30]
    return {"samples": total,
            "inclusive": [(k, v, 100 * v / total) for k, v in top],
            "leaves": [(k, v, 100 * v / total) for k, v in top_leaves]}


def simplify(frame: str) -> str:
    """'fn (path/to/site-packages/pkg/mod.py:12)' -> 'fn (pkg/mod.py)'."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    name, path = m.groups()
    path = re.sub(r".*/site-packages/", "", path)
    path = path.replace(str(ROOT) + "/", "")
    path = re.sub(r".*/lib/python3\.\d+/", "stdlib/", path)
    return f"{name} ({path})"


# -- main -----------------------------------------------------------------------------------


def machine_info(b: Bench) -> dict[str, Any]:
    import django

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = subprocess.run(["git", "log", "-1", "--format=%h %s", b.commit or "HEAD"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()[:120]
    dirty = "" if b.code_dir else subprocess.run(
        ["git", "status", "--porcelain", "djasync", "djasync_worker"], cwd=ROOT,
        capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "postgres": b.one("SHOW server_version"), "python": platform.python_version(),
        "django": django.get_version(), "psycopg": psycopg.__version__,
        "git": git + (" + uncommitted changes in djasync/ or djasync_worker/" if dirty else ""),
        "server": "own EmbeddedPostgres (tools/pg.py)" if b.server else "DATABASE_URL",
        "settings": {name: b.one(f"SHOW {name}") for name in (
            "shared_buffers", "synchronous_commit", "fsync", "max_wal_size", "wal_level",
            "shared_preload_libraries")},
        "loadavg_at_start": os.getloadavg(),
        "fsync": fsync_rate(b),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def fsync_rate(b: Bench) -> str:
    """One line of pg_test_fsync (the commit cost floor of a single client) in /tmp."""
    tool = b.pgbench.parent / "pg_test_fsync"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = subprocess.run([str(tool), "-s", "1", "-f", f"{tmp}/fsync.test"],
                                  capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    m = re.search(r"^\s+fdatasync\s+([\d.]+) ops/sec\s+(\d+) usecs/op", text, re.M)
    return f"fdatasync {m.group(1)} ops/s ({m.group(2)} µs/op)" if m else "?"


def snapshot_code(cfg: Config) -> tuple[Path, str]:
    """Extract djasync/ and djasync_worker/ as committed at HEAD into bench/work/code-<sha>.

    The work tree changes under a long run (the lead commits as they go, migrations
    included); every worker of one run must run the same code against the same schema.
    """
    import io
    import tarfile

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    dest = cfg.work / f"code-{commit[:12]}"
    if not dest.exists():
        archive = subprocess.run(["git", "archive", commit, "djasync", "djasync_worker"],
                                 cwd=ROOT, capture_output=True, check=True).stdout
        tmp = Path(tempfile.mkdtemp(dir=cfg.work))
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(dest)
    return dest, commit


def setup_django(url: str) -> None:
    os.environ["BENCH_DATABASE_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchproject.settings"
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N, 1 run: a smoke test")
    p.add_argument("--runs", type=int, help="runs per figure; the report gives the median "
                   "(default 3, --quick 1)")
    p.add_argument("--n", type=int, help="jobs per W1/W6/W4 drain (default 10000)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--skip", help="comma-separated workloads to leave out")
    p.add_argument("--peers", action="store_true", help="also run the peers (W1 only)")
    p.add_argument("--batch-size", type=int, default=20, help="K for the batched variants")
    p.add_argument("--w2-concurrency", type=int, default=4)
    p.add_argument("--w4-rows", type=int, help="finished rows and future rows (default 1M each)")
    p.add_argument("--w5-jobs", type=int, help="jobs one child runs in W5 (default 100000)")
    p.add_argument("--w7-minutes", type=float,
                   help="length of the W7 soak (default 20; --quick 3)")
    p.add_argument("--w7-rate", type=float, help="W7's measured drain rate, jobs/s (default: "
                   "measured first by a c4 daemon drain of --n jobs); the soak runs at 80%%")
    p.add_argument("--worker-log-level", default="info",
                   help="djasync-worker --log-level (default: info, the shipped default)")
    p.add_argument("--use-env-db", action="store_true",
                   help="use DATABASE_URL instead of starting a server (its tables are emptied)")
    p.add_argument("--code", choices=["head", "worktree"], default="head",
                   help="measure djasync as committed at HEAD when the run starts (a snapshot, "
                   "default), or the work tree as it is at each worker start")
    p.add_argument("--report-only", metavar="RESULTS_JSON",
                   help="only rewrite REPORT.md and the charts from a results.json")
    p.add_argument("--out", help="directory for REPORT.md, results.json and the charts "
                   "(default bench/, or bench/work/quick with --quick)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = Config(args)
    if args.report_only:
        import report

        path = Path(args.report_only)
        results = json.loads(path.read_text())
        out = Path(args.out) if args.out else path.parent
        report.write(results, out, Path(results.get("logdir", "?")))
        log(f"report: {out / 'REPORT.md'}")
        return 0
    selected = args.only.split(",") if args.only else list(DEFAULT_WORKLOADS)
    if args.peers and "peers" not in selected:
        selected.append("peers")
    if args.skip:
        selected = [w for w in selected if w not in args.skip.split(",")]
    unknown = set(selected) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workloads: {', '.join(sorted(unknown))}")
    cfg.work.mkdir(exist_ok=True)
    cfg.out.mkdir(parents=True, exist_ok=True)

    from pg import EmbeddedPostgres

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through tools.close(): the server stops

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)
    server = None
    if args.use_env_db:
        url = os.environ.get("DATABASE_URL")
        if not url:
            raise SystemExit("--use-env-db: DATABASE_URL is not set")
        tools = EmbeddedPostgres()  # only for its pgbench binary
        pgbench = tools.pgbench
    else:
        server = tools = EmbeddedPostgres(settings=SERVER_SETTINGS)
        server.start()
        url = server.url
        pgbench = server.pgbench
        log(f"started PostgreSQL at {url} (data in {server.datadir})")
    code_dir: Path | None = None
    try:
        if args.code == "head":
            code_dir, commit = snapshot_code(cfg)
            sys.path.insert(0, str(code_dir))
            log(f"measuring djasync as committed at {commit[:12]} (snapshot in {code_dir})")
        setup_django(url)
        import djasync

        log(f"djasync imported from {Path(djasync.__file__).parent}")
        b = Bench(cfg, url, server, pgbench, code_dir)
        b.results["machine"] = machine_info(b)
        b.results["config"] = {k: (str(v) if isinstance(v, Path) else v)
                               for k, v in vars(cfg).items()}
        b.results["workloads"] = selected
        b.results["argv"] = sys.argv[1:] if argv is None else argv
        b.results["logdir"] = str(b.logdir)
        started = time.perf_counter()
        failed: set[str] = set()

        def step(name: str, *args: Any) -> None:
            if name in failed:
                return
            log(f"--- {name} {'round ' + str(args[0] + 1) if args else ''}")
            begin = time.perf_counter()
            try:
                if name == "peers":
                    import peers

                    peers.run(b, *args)
                else:
                    globals()[name](b, *args)
            except Exception as exc:  # keep what the other workloads measured
                log(f"{name} FAILED: {type(exc).__name__}: {exc}")
                failed.add(name)
                b.results.setdefault("failures", {})[name] = f"{type(exc).__name__}: {exc}"
            durations = b.results.setdefault("durations_s", {})
            durations[name] = durations.get(name, 0) + time.perf_counter() - begin

        for rep in range(cfg.runs):
            for name in ROUNDS:
                if name in selected:
                    step(name, rep)
        for name in WORKLOADS:
            if name in selected and name not in ROUNDS:
                step(name)
        b.results["total_s"] = time.perf_counter() - started
        b.results["commands"] = b.commands
        b.results["notes"] = b.notes
        (cfg.out / "results.json").write_text(json.dumps(b.results, indent=1, default=str))
        import report

        report.write(b.results, cfg.out, b.logdir)
        log(f"report: {cfg.out / 'REPORT.md'}")
        return 1 if b.results.get("failures") else 0
    finally:
        tools.close()


if __name__ == "__main__":
    sys.exit(main())
