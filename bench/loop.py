"""Per-job CPU of the executor alone: one process draining the queue, no daemon.

Fills ``djasync_job`` with N no-op jobs (one INSERT … generate_series), drains them with
``executor.run_batches(K)`` as the worker does (``--unchained``: ``run_batch(K)`` in a loop,
as ``flush_queue`` does) and prints jobs/s, this process's CPU per job and the CPU per job of
its PostgreSQL backend (from /proc, so the server must run on this machine). This is how the
hot-path changes of issue 5 were measured one by one, between full ``make bench`` runs:

    DATABASE_URL=postgresql://… .venv/bin/python bench/loop.py --jobs 4000 --batch 1

It empties the djasync tables of that database (run ``migrate`` there first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]


def backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--unchained", action="store_true",
                        help="call run_batch per batch (flush_queue's way) instead of the "
                             "worker's run_batches, which claims each batch in the previous "
                             "one's finish message")
    parser.add_argument("--limits", default=None,
                        help="the jobs' flow-control keys, a JSON array (with BENCH_LIMITS "
                             "set in the environment: the worker's DJASYNC['LIMITS'])")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchproject.settings")
    import django

    django.setup()
    from django.db import connection

    from djasync import executor

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE djasync_attempt, djasync_job CASCADE")
        cursor.execute("""
            INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, status,
                                     run_after, created_at, attempts, worker, identity, limits)
            SELECT 'benchapp.jobs.noop', '[]', '{}', '{}', 'default', 0, 'pending',
                   now() - interval '1 s', now(), 0, '', '', %s::jsonb
              FROM generate_series(1, %s)""", [args.limits, args.jobs])
        cursor.execute("VACUUM ANALYZE djasync_job")
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    executor.set_session_timeouts_if_direct()
    server0, client0, wall0 = backend_cpu(pid), time.process_time(), time.perf_counter()
    done = 0
    if args.unchained:
        while batch := executor.run_batch(args.batch, worker="loop"):
            done += len(batch)
    else:
        def count(batch: list) -> bool:
            nonlocal done
            done += len(batch)
            return True

        executor.run_batches(args.batch, count, worker="loop")
    server1, client1, wall1 = backend_cpu(pid), time.process_time(), time.perf_counter()
    print(json.dumps({
        "jobs": done, "batch": args.batch, "chained": not args.unchained,
        "jobs_per_s": round(done / (wall1 - wall0)),
        "client_cpu_us_per_job": round((client1 - client0) / done * 1e6),
        "server_cpu_us_per_job": round((server1 - server0) / done * 1e6),
    }))


if __name__ == "__main__":
    main()
