#!/usr/bin/env python
"""A/B: W1 (no-op jobs, ``djasync-worker --burst``) of two commits, alternated in pairs.

    .venv/bin/python bench/ab.py                          # 46c7ad8 (before flow control) vs HEAD
    .venv/bin/python bench/ab.py --base 46c7ad8 --head HEAD --pairs 8 --n 10000

Answers "is HEAD within X % of BASE" on a shared, noisy machine. Each side runs as committed
(``git archive`` of djasync/ and djasync_worker/, as run.py's snapshots) against its own
database on one throwaway PostgreSQL 18 (autovacuum off: each drain VACUUMs and CHECKPOINTs
first). Each pair drains the same queue (the same rows, copied from a template that the side's
own ``schedule_many`` made) once per side; the order flips every pair (AB, BA, AB, ...).

Besides jobs/s, which moves with the machine's load, each drain records costs per job that
load moves less: the worker's CPU (supervisor + children, from wait4), the server's CPU (the
postmaster's process tree, /proc) and execution time (pg_stat_statements), each also without
the share of start-up and stop (a burst worker's run on an empty queue, just before). One more
drain per side with ``log_statement = all`` counts the statements per job. The report gives,
per variant and figure, the median of the per-pair ratios head/base with their quartiles and
range. JSON lines on stdout, then a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT / "tools"))

import psycopg  # noqa: E402
import run  # noqa: E402

TABLES = ", ".join(run.QUEUE_TABLES)
SETTINGS = {**run.SERVER_SETTINGS, "pg_stat_statements.track": "top", "autovacuum": "off"}
#: (figure, per-job formula from a drain's record, True if higher is better)
FIGURES = [
    ("jobs/s", lambda r: r["jobs"] / r["wall_s"], True),
    ("jobs/s after first", lambda r: r["jobs"] / r["span_s"], True),
    ("worker CPU ms/job", lambda r: 1000 * r["worker_cpu_s"] / r["jobs"], False),
    ("worker CPU ms/job, start-up excluded",
     lambda r: 1000 * (r["worker_cpu_s"] - r["empty"]["worker_cpu_s"]) / r["jobs"], False),
    ("  of which supervisor, ms/job", lambda r: 1000 * r["supervisor_cpu_s"] / r["jobs"], False),
    ("worker CPU s, start-up and stop", lambda r: r["empty"]["worker_cpu_s"], False),
    ("server CPU ms/job", lambda r: 1000 * r["server_cpu_s"] / r["jobs"], False),
    ("server CPU ms/job, start-up excluded",
     lambda r: 1000 * (r["server_cpu_s"] - r["empty"]["server_cpu_s"]) / r["jobs"], False),
    ("server exec ms/job (pg_stat_statements)", lambda r: r["exec_ms"] / r["jobs"], False),
]
#: A statement the server ran, as ``log_statement = all`` logs it (prefix ``%u@%d``).
LOGGED = r"@{db} LOG:  (?:statement|execute [^:]*):"


def log(message: str) -> None:
    print(f"[ab {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def snapshot(commit: str, work: Path) -> tuple[Path, str]:
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], cwd=ROOT,
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"ab.py: {commit!r} is not a commit: {sha.stderr.strip()}")
    full = sha.stdout.strip()
    dest = work / f"code-{full[:12]}"
    if not dest.exists():
        archive = subprocess.run(["git", "archive", full, "djasync", "djasync_worker"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        tmp = Path(tempfile.mkdtemp(dir=work))
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(dest)
    return dest, full


class Side:
    """One commit: its code snapshot, its database, a Bench of run.py to drive its worker."""

    def __init__(self, name: str, commit: str, server: Any, cfg: run.Config) -> None:
        self.name = name
        code, self.commit = snapshot(commit, cfg.work)
        with psycopg.connect(server.url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS ab_{name}")
            admin.execute(f"CREATE DATABASE ab_{name}")
        url = server.url.rsplit("/", 1)[0] + f"/ab_{name}"
        self.b = run.Bench(cfg, url, server, server.pgbench, code)
        self.b.q("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.dbid = self.b.one("SELECT oid FROM pg_database WHERE datname = current_database()")
        # Migrate and queue the jobs with the side's own code, once; each drain copies them.
        script = ("import django, sys; django.setup(); from django.core.management import "
                  "call_command; call_command('migrate', verbosity=0); "
                  "from djasync import JobSpec, schedule_many; n = int(sys.argv[1]); "
                  "import json, os; keys = json.loads(os.environ.get('AB_KEYS') or 'null'); "
                  "extra = {'limits': keys} if keys else {}; "  # (no such field before 0010)
                  "[schedule_many([JobSpec('benchapp.jobs.noop', **extra) for _ in "
                  "range(min(10000, n - i))]) for i in range(0, n, 10000)]")
        env = {**run.worker_env(self.b), "DJANGO_SETTINGS_MODULE": "benchproject.settings",
               "PYTHONPATH": os.pathsep.join([str(code), str(BENCH)])}
        subprocess.run([sys.executable, "-c", script, str(cfg.n)], env=env, cwd=code,
                       check=True)
        self.b.q("DROP TABLE IF EXISTS ab_template")
        self.b.q("CREATE TABLE ab_template AS SELECT * FROM djasync_job")

    def drain(self, concurrency: int, empty: bool = False) -> dict[str, Any]:
        """Drain the template's jobs (``empty``: none, for the worker's start-up and stop)."""
        b, n = self.b, 0 if empty else self.b.cfg.n
        b.q(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
        if not empty:
            b.q("INSERT INTO djasync_job SELECT * FROM ab_template")
        b.settle(["djasync_job", "djasync_attempt"])
        b.q("SELECT pg_stat_statements_reset()")
        cpu0 = b.server_cpu()
        res = run.run_burst(b, f"{self.name} c{concurrency}", concurrency, 1)
        # The worker has exited; its server sessions end a moment later: wait for them so
        # that their CPU is counted (the postmaster's reaped children, or still alive).
        deadline = time.monotonic() + 10
        while b.one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()") and time.monotonic() < deadline:
            time.sleep(0.01)
        server_cpu = b.server_cpu() - cpu0
        calls, exec_ms = b.q("""
            SELECT coalesce(sum(calls), 0), coalesce(sum(total_exec_time), 0)
              FROM pg_stat_statements
             WHERE dbid = %s AND query NOT ILIKE '%%pg_stat%%'""", (self.dbid,))[0]
        rec = {} if empty else run.drain_figures(b, n)  # every job succeeded once
        rec.update(side=self.name, commit=self.commit[:12], concurrency=concurrency,
                   wall_s=res["wall_s"], worker_cpu_s=res["worker_cpu_s"],
                   supervisor_cpu_s=res["supervisor_cpu_s"],
                   server_cpu_s=server_cpu, calls=int(calls), exec_ms=float(exec_ms),
                   loadavg=res["loadavg_1m_before"])
        return rec

    def count_statements(self, concurrency: int) -> float:
        """Statements per job, from the server log of one more drain with ``log_statement =
        all`` (exact; pg_stat_statements counts a utility statement sent prepared only once)."""
        log_file, db = self.b.server.logfile, f"ab_{self.name}"
        self.b.q(f"ALTER DATABASE {db} SET log_statement = 'all'")
        try:
            start = log_file.stat().st_size
            self.drain(concurrency)
        finally:
            self.b.q(f"ALTER DATABASE {db} RESET log_statement")
        with open(log_file, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        return len(re.findall(LOGGED.format(db=db), text)) / self.b.cfg.n


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize(records: list[dict], tolerance: float) -> tuple[list[dict], str]:
    rows = []
    lines = ["| variant | figure | base (median) | head (median) | head/base: median | IQR | "
             "min-max | within ±%g %% |" % (100 * tolerance), "|---|---|---|---|---|---|---|---|"]
    for c in sorted({r["concurrency"] for r in records}):
        pairs: dict[int, dict[str, dict]] = {}
        for r in records:
            if r["concurrency"] == c:
                pairs.setdefault(r["pair"], {})[r["side"]] = r
        complete = [p for p in pairs.values() if len(p) == 2]
        for name, per_job, higher_better in FIGURES:
            base = [per_job(p["base"]) for p in complete]
            head = [per_job(p["head"]) for p in complete]
            ratios = [h / b for h, b in zip(head, base, strict=True) if b]
            q1, med, q3 = quartiles(ratios)
            ok = med >= 1 - tolerance if higher_better else med <= 1 + tolerance
            row = {"variant": f"c{c}", "figure": name, "pairs": len(ratios),
                   "base": statistics.median(base), "head": statistics.median(head),
                   "ratio_median": med, "ratio_q1": q1, "ratio_q3": q3,
                   "ratio_min": min(ratios), "ratio_max": max(ratios), "within": ok}
            rows.append(row)
            lines.append(f"| c{c} | {name} | {row['base']:.4g} | {row['head']:.4g} | "
                         f"{med:.3f} | {q1:.3f}-{q3:.3f} | {min(ratios):.3f}-{max(ratios):.3f} "
                         f"| {'yes' if ok else 'NO'} |")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="46c7ad8", help="commit A (default 46c7ad8, the last "
                   "commit before flow control, issue 16)")
    p.add_argument("--head", default="HEAD", help="commit B (default HEAD)")
    p.add_argument("--pairs", type=int, default=8, help="A/B pairs per variant (default 8)")
    p.add_argument("--n", type=int, default=10_000, help="jobs per drain (default 10000)")
    p.add_argument("--concurrency", default="1,4", help="worker --concurrency values (1,4)")
    p.add_argument("--worker-log-level", default="info", help="djasync-worker --log-level "
                   "(info: the default, which logs a line per job since 0f07e2a)")
    p.add_argument("--limits", help="a JSON object: both sides' DJASYNC['LIMITS'] (the "
                   "benchproject reads BENCH_LIMITS), e.g. '{\"eight\": {\"concurrency\": 8}}'")
    p.add_argument("--keys", help="a JSON array: every job's flow-control keys, e.g. "
                   "'[\"eight\"]' (with --limits)")
    p.add_argument("--tolerance", type=float, default=0.03, help="the verdict's bound (0.03)")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.n < 1:
        raise SystemExit("ab.py: --pairs and --n must be at least 1")
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise SystemExit(f"ab.py: --concurrency {args.concurrency!r}: integers, "
                         "comma-separated") from None
    if bool(args.limits) != bool(args.keys):
        raise SystemExit("ab.py: --limits and --keys go together")
    if args.limits:
        try:
            limits, keys = json.loads(args.limits), json.loads(args.keys)
        except ValueError as exc:
            raise SystemExit(f"ab.py: --limits / --keys: not JSON ({exc})") from None
        if not isinstance(limits, dict) or not (
                isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)):
            raise SystemExit("ab.py: --limits must be a JSON object and --keys a JSON array "
                             "of key strings")
        # Read by the benchproject's settings (workers, and the sides' schedule_many).
        os.environ.update(BENCH_LIMITS=args.limits, AB_KEYS=args.keys)
    cfg = run.Config(run.parse(["--n", str(args.n), "--worker-log-level",
                                args.worker_log_level]))
    cfg.work.mkdir(exist_ok=True)

    from pg import EmbeddedPostgres

    with EmbeddedPostgres(settings=SETTINGS) as server:
        sides = {name: Side(name, commit, server, cfg)
                 for name, commit in (("base", args.base), ("head", args.head))}
        log(f"base {sides['base'].commit[:12]}, head {sides['head'].commit[:12]}, "
            f"{args.n} jobs per drain, {args.pairs} pairs, c{concurrencies}")
        records = []
        for pair in range(args.pairs):
            order = ["base", "head"] if pair % 2 == 0 else ["head", "base"]
            for c in concurrencies:
                for name in order:
                    empty = sides[name].drain(c, empty=True)
                    rec = sides[name].drain(c)
                    rec.update(pair=pair, empty=empty)
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
                    log(f"pair {pair + 1} c{c} {name}: {rec['jobs'] / rec['wall_s']:.0f} jobs/s, "
                        f"worker CPU {1000 * rec['worker_cpu_s'] / rec['jobs']:.3f} ms/job, "
                        f"server CPU {1000 * rec['server_cpu_s'] / rec['jobs']:.3f} ms/job")
        counted = {c: {name: side.count_statements(c) for name, side in sides.items()}
                   for c in concurrencies}
    rows, table = summarize(records, args.tolerance)
    for c, by_side in counted.items():
        print(json.dumps({"statements_per_job": by_side, "concurrency": c}))
        table += (f"\n| c{c} | statements/job (server log, one drain) | {by_side['base']:.3f} | "
                  f"{by_side['head']:.3f} | {by_side['head'] / by_side['base']:.3f} | | | |")
    for row in rows:
        print(json.dumps({"summary": row}))
    print(f"\nbase {args.base} = {sides['base'].commit[:12]}, head {args.head} = "
          f"{sides['head'].commit[:12]}; {args.n} no-op jobs per drain, {args.pairs} pairs, "
          f"--log-level {args.worker_log_level}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
