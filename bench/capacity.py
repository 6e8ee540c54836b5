#!/usr/bin/env python
"""The figures behind docs/explanation/capacity.md: server CPU, WAL and dead tuples per job.

Queues ``--jobs`` no-op jobs (``schedule_many``), drains them with ``djasync-worker --burst``
(``--concurrency 4``, batch 1, then batch ``--batch``), prunes them (``prune_jobs``) and VACUUMs,
measuring around each step: PostgreSQL's CPU (its processes, from /proc), WAL written
(``pg_current_wal_lsn()`` differences) and the tables' dead tuples (``pg_stat_user_tables``).

    .venv/bin/python bench/capacity.py                    # own throwaway PostgreSQL 18
    .venv/bin/python bench/capacity.py --jobs 20000 --batch 20

Autovacuum is off for the two queue tables while it measures, so the dead tuples a step leaves
are counted, not raced by a vacuum (the VACUUM step then measures what the autovacuum would do).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tools")]

import run  # noqa: E402

TABLES = ("djasync_job", "djasync_attempt")


def stats(b: run.Bench) -> dict:
    time.sleep(1.2)  # other backends flush their table statistics at most once a second
    b.q("SELECT pg_stat_clear_snapshot()")
    row = {"wal": int(b.one("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")),
           "cpu": b.server_cpu() or 0.0}
    for table in TABLES:
        dead, upd, hot = b.q("SELECT n_dead_tup, n_tup_upd, n_tup_hot_upd FROM "
                             "pg_stat_user_tables WHERE relname = %s", (table,))[0]
        size = b.one("SELECT pg_total_relation_size(%s)", (table,))
        row[table] = {"dead": dead, "upd": upd, "hot": hot, "bytes": size}
    return row


def diff(before: dict, after: dict, jobs: int, step: str) -> dict:
    out = {"step": step, "jobs": jobs,
           "wal_bytes_per_job": (after["wal"] - before["wal"]) / jobs,
           "server_cpu_us_per_job": (after["cpu"] - before["cpu"]) / jobs * 1e6}
    for table in TABLES:
        out[f"{table}_dead_per_job"] = after[table]["dead"] / jobs
        out[f"{table}_bytes_after"] = after[table]["bytes"]
        upd = after[table]["upd"] - before[table]["upd"]
        hot = after[table]["hot"] - before[table]["hot"]
        out[f"{table}_hot_update_share"] = hot / upd if upd else None
    run.log(json.dumps(out))
    return out


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=20)
    args = p.parse_args()
    cfg = run.Config(run.parse(["--n", str(args.jobs), "--runs", "1"]))
    cfg.work.mkdir(exist_ok=True)
    from pg import EmbeddedPostgres

    server = EmbeddedPostgres(settings=run.SERVER_SETTINGS)
    server.start()
    results = []
    try:
        run.setup_django(server.url)
        from django.core.management import call_command

        b = run.Bench(cfg, server.url, server, server.pgbench, None)
        for table in TABLES:
            b.q(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
        for batch in (1, args.batch):
            n = args.jobs
            b.reset_queue()
            before = stats(b)
            run.enqueue(n)
            after = stats(b)
            results.append(diff(before, after, n, "schedule_many"))
            before = after
            cmd_label = f"drain c4 batch {batch}"
            res = run.run_burst(b, cmd_label, 4, batch)
            figures = run.drain_figures(b, n)
            after = stats(b)
            rec = diff(before, after, n, cmd_label)
            rec["jobs_per_s_after_first"] = n / figures["span_s"]
            rec["worker_cpu_us_per_job"] = res["worker_cpu_s"] / n * 1e6
            results.append(rec)
            before = after
            call_command("prune_jobs", older_than=0, stdout=io.StringIO())
            after = stats(b)
            results.append(diff(before, after, n, "prune_jobs"))
            before = after
            for table in TABLES:
                b.q(f"VACUUM {table}")
            after = stats(b)
            results.append(diff(before, after, n, "VACUUM"))
        print(json.dumps({"results": results, "commands": b.commands,
                          "postgres": b.one("SHOW server_version"),
                          "full_page_writes": b.one("SHOW full_page_writes"),
                          "checkpoint_timeout": b.one("SHOW checkpoint_timeout")}, indent=1))
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
