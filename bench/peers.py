"""Peers on W1 (drain N pre-queued no-op jobs): procrastinate, django-tasks-db, PgQueuer.

They run from ``bench/.peers-venv`` (made here from PyPI if missing), each in its own database
on the benchmark's server, with its own natural concurrency knob. Drain progress is polled from
each peer's job table every 50 ms: "after first job" runs from the first poll that sees fewer
than N jobs waiting to the first poll that sees none (so ±50 ms, unlike djasync's figure, which
comes from its rows' timestamps). A peer that cannot be installed or run is reported as such.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".peers-venv"
APPS = BENCH / "peers_apps"
PACKAGES = ["procrastinate", "django-tasks-db", "pgqueuer", "asyncpg", "psycopg[binary]"]
POLL_SECONDS = 0.05

PEERS: dict[str, dict[str, Any]] = {
    "procrastinate": {
        "package": "procrastinate",
        "knob": "worker --concurrency 4",
        "setup": [["-m", "procrastinate", "--app=proc_app.app", "schema", "--apply"]],
        "workers": [["-m", "procrastinate", "--app=proc_app.app", "worker", "--concurrency",
                     "4", "--one-shot"]],
        "reset": "TRUNCATE procrastinate_events, procrastinate_jobs RESTART IDENTITY CASCADE",
        "waiting": "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')",
        "done": "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'",
    },
    "django-tasks-db": {
        "package": "django-tasks-db",
        "knob": "4 × db_worker processes (1 task per process)",
        "setup": [["-m", "django", "migrate", "--settings", "djt_settings", "-v", "0"]],
        "workers": [["-m", "django", "db_worker", "--settings", "djt_settings", "--batch",
                     "--no-startup-delay", "--worker-id", f"bench-{i}"] for i in range(4)],
        "reset": "TRUNCATE django_tasks_database_dbtaskresult",
        "waiting": ("SELECT count(*) FROM django_tasks_database_dbtaskresult "
                    "WHERE status IN ('READY', 'RUNNING')"),
        "done": ("SELECT count(*) FROM django_tasks_database_dbtaskresult "
                 "WHERE status = 'SUCCESSFUL'"),
    },
    "pgqueuer": {
        "package": "pgqueuer",
        "knob": "defaults: --batch-size 10, no concurrency limit (asyncio), asyncpg",
        "setup": [["-m", "pgqueuer", "install"]],
        # `pgq run pgq_app:main --mode drain` fails in 1.6.0 (see peers_apps/pgq_drain.py),
        # which calls the same pgqueuer.run() the CLI calls.
        "workers": [["pgq_drain.py"]],
        "reset": "TRUNCATE pgqueuer, pgqueuer_log RESTART IDENTITY",
        "waiting": "SELECT count(*) FROM pgqueuer",
        # Finished jobs are deleted; the log table holds their 'successful' rows.
        "done": "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'",
    },
}


def python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(b: Any) -> dict[str, str]:
    """Create the peers' venv if missing; return the installed versions."""
    if not python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python()), "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
    listing = subprocess.run([str(python()), "-m", "pip", "list", "--format", "json"],
                             capture_output=True, text=True, check=True).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(listing)}


def env_for(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV")}
    env.update(PEER_DSN=dsn, PGDSN=dsn, PYTHONPATH=str(APPS),
               PYTHONPYCACHEPREFIX=str(BENCH / "work" / "pycache-peers"))
    return env


def run(b: Any, rep: int) -> None:
    results: dict[str, Any] = b.results.setdefault("peers", {})
    if rep == 0:
        try:
            versions = ensure_venv(b)
        except (OSError, subprocess.CalledProcessError) as exc:
            for name in PEERS:
                results[name] = {"status": f"could not install: {exc}"}
            return
    else:
        versions = {}
    for name, peer in PEERS.items():
        rec = results.setdefault(name, {"runs": [], "knob": peer["knob"]})
        if rep == 0:
            rec["version"] = versions.get(peer["package"], "?")
            rec["command"] = " & ".join(
                " ".join(["python", *w]) for w in peer["workers"]).replace(str(BENCH), "bench")
        if rec.get("status", "ok") != "ok":
            continue
        try:
            figures = one_run(b, name, peer, setup=rep == 0)
        except Exception as exc:
            rec["status"] = f"could not run: {type(exc).__name__}: {str(exc)[-500:]}"
            b.notes.append(f"peer {name}: {rec['status']}")
            continue
        rec["runs"].append(figures)
        runs = rec["runs"]
        rec["jobs_per_s"] = _median([r["jobs_per_s"] for r in runs])
        rec["jobs_per_s_after_first"] = _median([r["jobs_per_s_after_first"] for r in runs])
        rec["raw"] = " / ".join(f"{r['jobs_per_s_after_first']:,.0f}" for r in runs)
        rec["status"] = "ok"
        print(f"[bench] peer {name}: {figures['jobs_per_s']:.0f} jobs/s incl. start-up, "
              f"{figures['jobs_per_s_after_first']:.0f} after first", file=sys.stderr, flush=True)


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def one_run(b: Any, name: str, peer: dict[str, Any], setup: bool) -> dict[str, Any]:
    n = b.cfg.n
    dbname = "peer_" + name.replace("-", "_")
    dsn = b.url.rsplit("/", 1)[0] + "/" + dbname  # a URL: PgQueuer accepts no other form
    env = env_for(dsn)
    logfile = b.logdir / f"peer-{name}.log"
    if setup:
        b.q(f'DROP DATABASE IF EXISTS "{dbname}"')
        b.q(f'CREATE DATABASE "{dbname}"')
        for cmd in peer["setup"]:
            _check([str(python()), *cmd], env, logfile)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(peer["reset"])
        _check([str(python()), str(APPS / "enqueue.py"), name, str(n)], env, logfile)
        waiting = conn.execute(peer["waiting"]).fetchone()[0]
        if waiting != n:
            raise RuntimeError(f"{waiting} jobs queued instead of {n}")
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
        with open(logfile, "ab") as log:
            start = time.perf_counter()
            procs = [subprocess.Popen([str(python()), *cmd], env=env, stdout=log, stderr=log,
                                      cwd=APPS) for cmd in peer["workers"]]
            first = last = None
            deadline = start + max(600, n / 5)
            try:
                while True:
                    left = conn.execute(peer["waiting"]).fetchone()[0]
                    now = time.perf_counter()
                    if first is None and left < n:
                        first = now
                    if left == 0:
                        last = now
                        break
                    if all(p.poll() is not None for p in procs):
                        raise RuntimeError(f"workers exited with {left} jobs left "
                                           f"(codes {[p.returncode for p in procs]}); see "
                                           f"{logfile}")
                    if now > deadline:
                        raise RuntimeError(f"{left} jobs left after {now - start:.0f} s")
                    time.sleep(POLL_SECONDS)
                for p in procs:
                    p.wait(timeout=120)
                wall = time.perf_counter() - start
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
        done = conn.execute(peer["done"]).fetchone()[0]
        if done != n:
            raise RuntimeError(f"{done} jobs recorded as successful of {n}")
    span = max(last - first, POLL_SECONDS)
    return {"jobs": n, "wall_s": wall, "span_s": span, "jobs_per_s": n / wall,
            "jobs_per_s_after_first": n / span,
            "exit_codes": [p.returncode for p in procs]}


def _check(cmd: list[str], env: dict[str, str], logfile: Path) -> None:
    with open(logfile, "ab") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=log, cwd=APPS, timeout=900)
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace")[-800:]
        raise RuntimeError(f"{' '.join(cmd[1:])} exited {proc.returncode}: {tail}")
