#!/usr/bin/env python
"""What a claim costs while N other workers hold claimed jobs locked (issue 14).

A running job is a ``pending`` row locked by its worker's open transaction, so it stays at the
head of the claim index (it was the best job when it was claimed), and every other claim walks
past it with ``SKIP LOCKED``. This script simulates N such workers: N connections each run the
real claim statement (``djasync.sql.claim``, with its plan settings) and keep their transaction
open, holding one job. Another connection then times the same claim: its server execution time
(``EXPLAIN (ANALYZE)``, median of ``--repeat``) and its wall time (the claim sent as the worker
sends it, then ROLLBACK, median of ``--repeat``).

    .venv/bin/python bench/claimers.py                    # own throwaway PostgreSQL 18
    .venv/bin/python bench/claimers.py --holders 0,50,100,200,400,800 --limit 1,10
    .venv/bin/python bench/claimers.py --queues 8     # claimers spread over 8 queues
    DATABASE_URL=postgresql://… .venv/bin/python bench/claimers.py --use-env-db

It needs ``max_connections`` above the largest N (its own server gets 1000); with
``--use-env-db`` it empties the djasync tables of that database. Prints one JSON line per
(N, limit) and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent), str(BENCH.parent / "tools")]

import psycopg  # noqa: E402


def claim_statements(limit: int, queues: int) -> tuple[list[str], str, list[str]]:
    """The worker's claim: of any queue, or (``queues`` > 1) of one queue (``--queue qN``)."""
    from djasync import sql

    query = sql.claim(by_queue=queues > 1, by_name_prefix=False, limit=limit,
                      one_queue=queues > 1)
    return list(sql.CLAIM_PLAN), query, list(sql.CLAIM_PLAN_DONE)


def params(queue: int) -> dict:
    return {"queues": [f"q{queue}"], "name_prefix": None, "now": None}


def fill(url: str, jobs: int, queues: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE djasync_attempt, djasync_job CASCADE")
        conn.execute("""
            INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, status,
                                     run_after, created_at, attempts, worker, identity)
            SELECT 'benchapp.jobs.noop', '[]', '{}', '{}', 'q' || g %% %s, 0, 'pending',
                   now() - interval '1 s' + g * interval '1 us', now(), 0, '', ''
              FROM generate_series(1, %s) g""", [queues, jobs])
        conn.execute("VACUUM ANALYZE djasync_job")
        conn.execute("VACUUM ANALYZE djasync_attempt")


def hold(url: str, count: int, holders: list[psycopg.Connection], queues: int) -> None:
    """Grow ``holders`` to ``count`` connections, each holding one claimed job locked (the
    i-th claims from queue ``q{i % queues}``)."""
    plan, query, done = claim_statements(1, queues)
    while len(holders) < count:
        conn = psycopg.connect(url)
        for statement in plan:
            conn.execute(statement)
        rows = conn.execute(query, params(len(holders) % queues)).fetchall()
        assert len(rows) == 1, "ran out of jobs to hold"
        for statement in done:
            conn.execute(statement)
        holders.append(conn)  # its transaction stays open: the job is "running"


def measure(conn: psycopg.Connection, limit: int, repeat: int, queues: int) -> dict:
    plan, query, done = claim_statements(limit, queues)
    PARAMS = params(0)
    server, wall, skipped = [], [], []
    for _ in range(repeat):
        for statement in plan:
            conn.execute(statement)
        (doc,), = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query, PARAMS).fetchall()
        conn.rollback()
        server.append(doc[0]["Execution Time"])
        skipped.append(_rows_below_lock(doc[0]["Plan"]) - limit)
    for _ in range(repeat):
        begin = time.perf_counter()
        for statement in plan:
            conn.execute(statement)
        conn.execute(query, PARAMS, prepare=True).fetchall()
        for statement in done:
            conn.execute(statement)
        wall.append((time.perf_counter() - begin) * 1000)
        conn.rollback()
    return {"server_ms": round(statistics.median(server), 3),
            "wall_ms": round(statistics.median(wall), 3),
            "rows_walked_past": statistics.median(skipped)}


def _rows_below_lock(plan: dict) -> int:
    """Rows the index scan under LockRows returned (those locked elsewhere included)."""
    if plan["Node Type"] == "LockRows":
        return int(plan["Plans"][0]["Actual Rows"])
    for child in plan.get("Plans", []):
        found = _rows_below_lock(child)
        if found >= 0:
            return found
    return -1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--holders", default="0,50,100,200,400,800",
                   help="numbers of claimers holding a job locked")
    p.add_argument("--limit", default="1,10", help="claim batch sizes to time")
    p.add_argument("--jobs", type=int, default=20_000, help="pending jobs in the table")
    p.add_argument("--queues", type=int, default=1,
                   help="spread jobs and claimers over this many queues, each claimer "
                        "claiming from its own one (--queue qN); the timed claim is q0's")
    p.add_argument("--repeat", type=int, default=200, help="claims timed per point")
    p.add_argument("--use-env-db", action="store_true", help="use DATABASE_URL (emptied!)")
    args = p.parse_args()
    counts = [int(n) for n in args.holders.split(",")]
    limits = [int(n) for n in args.limit.split(",")]
    server = None
    if args.use_env_db:
        url = os.environ["DATABASE_URL"]
    else:
        from pg import EmbeddedPostgres

        server = EmbeddedPostgres(settings={"max_connections": str(max(counts) + 50)})
        server.start()
        url = server.url
    os.environ["BENCH_DATABASE_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchproject.settings"
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    holders: list[psycopg.Connection] = []
    results = []
    try:
        fill(url, args.jobs, args.queues)
        with psycopg.connect(url) as timer:
            for count in sorted(counts):
                hold(url, count, holders, args.queues)
                for limit in limits:
                    row = {"holders": count, "queues": args.queues, "limit": limit,
                           **measure(timer, limit, args.repeat, args.queues)}
                    print(json.dumps(row), flush=True)
                    results.append(row)
    finally:
        for conn in holders:
            conn.close()
        if server:
            server.close()
    print("\n| claimers holding a job | limit | server ms (EXPLAIN ANALYZE) | wall ms |"
          " rows walked past |\n|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['holders']} | {r['limit']} | {r['server_ms']} | {r['wall_ms']} |"
              f" {r['rows_walked_past']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
