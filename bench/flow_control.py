#!/usr/bin/env python
"""Flow control side by side in one run: what limits cost, and what a full key costs others.

    DATABASE_URL=postgresql://…/scratch .venv/bin/python bench/flow_control.py [--n 10000]

The database named by DATABASE_URL must be migrated (``manage.py migrate`` with
tests.settings); its queue tables are TRUNCATEd. Rows:

1. no LIMITS setting, jobs without keys (the plain claim, unchanged);
2. LIMITS set, jobs without keys (the claim goes through ``djasync_claim_one``, migration 0020);
3. LIMITS set, every job holding one key with ``concurrency: 8``;
4. the time of one claim of a job without keys while 100,000 due jobs wait behind a full key
   (its one slot held by another session), and of a job of another key;
5. the same behind 100 and 1,000 full keys of a pattern, 10 due jobs each (the claim's walk
   of each key's first jobs costs one index descent per key).

Each drain is ``djasync-worker --burst --concurrency 4`` over ``--n`` no-op jobs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

LIMITS = {"eight": {"concurrency": 8}, "full": {"concurrency": 1},
          "other": {"concurrency": 1}}


def settings_dir(limits: bool) -> str:
    folder = tempfile.mkdtemp(prefix="flow-bench-")
    text = "from tests.settings import *  # noqa\n"
    if limits:
        text += f"DJASYNC = {{**DJASYNC, 'LIMITS': {LIMITS!r}}}\n"
    Path(folder, "bench_settings.py").write_text(text)
    return folder


def reset(db: psycopg.Connection) -> None:
    db.execute("TRUNCATE djasync_attempt, djasync_job, djasync_group, djasync_worker, "
               "djasync_ratetoken, djasync_pausedqueue RESTART IDENTITY CASCADE")


def fill(db: psycopg.Connection, n: int, limits: str | None) -> None:
    db.execute("""
        INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, status,
                                 attempts, identity, created_at, worker, lease_owner, limits)
        SELECT 'tests.jobs.add', '[1, 1]', '{}', '{}', 'default', 0,
               now() - interval '1 second', 'pending', 0, md5(g::text), now(), '', '',
               %s::jsonb
          FROM generate_series(1, %s) g""", [limits, n])
    db.execute("VACUUM ANALYZE djasync_job")


def drain(url: str, n: int, limits: bool, concurrency: int) -> float:
    folder = settings_dir(limits)
    env = {**os.environ, "DATABASE_URL": url,
           "PYTHONPATH": os.pathsep.join([folder, str(ROOT)])}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "djasync_worker", "--settings", "bench_settings",
                    "--concurrency", str(concurrency), "--burst", "--log-level", "warning"],
                   env=env, check=True, cwd=ROOT)
    return n / (time.perf_counter() - start)


def claim_ms(url: str, waiting: int, tries: int = 200) -> tuple[float, float]:
    """Median ms of one claim (in the worker's fast path) of other work, with ``waiting`` due
    jobs behind the full key ahead of it: a job without keys, and a job of another key."""
    import django

    os.environ["DATABASE_URL"] = url
    django.setup()
    from django.db import connection, transaction
    from django.test import override_settings

    from djasync import executor
    from tests.settings import DJASYNC

    with psycopg.connect(url, autocommit=True) as db:
        reset(db)
        fill(db, waiting, '["full"]')
        db.execute("UPDATE djasync_job SET priority = 1")  # all ahead of the other work
        fill(db, 1, None)
        fill(db, 1, '["other"]')
        db.execute("VACUUM ANALYZE djasync_job")
    holder = psycopg.connect(url)
    holder.execute("SELECT pg_advisory_lock(hashtext('djasync.limit:full'), 0)")
    results = []
    with override_settings(DJASYNC={**DJASYNC, "LIMITS": LIMITS}):
        for limit in (1, 2):
            times = []
            for _ in range(tries):
                start = time.perf_counter()
                with transaction.atomic():
                    claimed = executor.claim(limit)
                    transaction.set_rollback(True)
                times.append((time.perf_counter() - start) * 1000)
                assert len(claimed) == limit, claimed
            results.append(statistics.median(times))
    holder.close()
    connection.close()
    return results[0], results[1]


def many_keys_claim_ms(url: str, keys: int, per_key: int = 10, tries: int = 100) -> float:
    """Median ms of one claim of a job without keys when ``keys`` keys of a pattern, each
    full, have ``per_key`` due jobs waiting ranked first (the claim's per-key walk)."""
    from django.db import connection, transaction
    from django.test import override_settings

    from djasync import executor
    from tests.settings import DJASYNC

    with psycopg.connect(url, autocommit=True) as db:
        reset(db)
        db.execute("""
            INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after,
                                     status, attempts, identity, created_at, worker,
                                     lease_owner, limits)
            SELECT 'tests.jobs.add', '[1, 1]', '{}', '{}', 'default', 1,
                   now() - interval '1 second', 'pending', 0, md5(g::text), now(), '', '',
                   jsonb_build_array('tenant:' || (g %% %s))
              FROM generate_series(1, %s) g""", [keys, keys * per_key])
        fill(db, 1, None)
    holder = psycopg.connect(url)
    for key in range(keys):
        holder.execute("SELECT pg_advisory_lock(hashtext('djasync.limit:tenant:' || %s), 0)",
                       [str(key)])
    holder.commit()
    times = []
    with override_settings(DJASYNC={**DJASYNC, "LIMITS": {**LIMITS,
                                                           "tenant:*": {"concurrency": 1}}}):
        for _ in range(tries):
            start = time.perf_counter()
            with transaction.atomic():
                assert len(executor.claim(1)) == 1
                transaction.set_rollback(True)
            times.append((time.perf_counter() - start) * 1000)
    holder.close()
    connection.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    url = os.environ["DATABASE_URL"]
    rows: dict[str, list[float]] = {}
    with psycopg.connect(url, autocommit=True) as db:
        for _ in range(args.runs):  # alternate, so that the rows share the machine's mood
            for label, limits, keys in (("no LIMITS, jobs without keys", False, None),
                                        ("LIMITS set, jobs without keys", True, None),
                                        ("LIMITS set, one key concurrency 8", True,
                                         '["eight"]')):
                reset(db)
                fill(db, args.n, keys)
                rows.setdefault(label, []).append(drain(url, args.n, limits, args.concurrency))
    print(f"drain of {args.n} no-op jobs, --concurrency {args.concurrency}, --burst, "
          f"median of {args.runs}:")
    base = statistics.median(rows["no LIMITS, jobs without keys"])
    for label, values in rows.items():
        median = statistics.median(values)
        print(f"  {label:40s} {median:7.0f} jobs/s  ({median / base:.0%})  "
              f"runs: {', '.join(f'{v:.0f}' for v in values)}")
    plain, other_key = claim_ms(url, args.waiting)
    print(f"one claim with {args.waiting} due jobs waiting behind a full key ranked first "
          f"(median of 200):")
    print(f"  a job without keys: {plain:.2f} ms;  it and a job of another key: "
          f"{other_key:.2f} ms")
    for keys in (100, 1000):
        print(f"one claim of a job without keys behind {keys} full keys (tenant:*), 10 due jobs "
              f"each: {many_keys_claim_ms(url, keys):.2f} ms")


if __name__ == "__main__":
    main()
