"""Throughput of the worker daemon through PgBouncer (transaction mode) against direct.

Fills ``djasync_job`` with N small jobs (``tests.jobs.add``), drains them with
``djasync-worker --burst`` and reports jobs/s from the first to the last ``finished_at``, for:

- ``direct``: straight to PostgreSQL, djasync's statements prepared (the default);
- ``direct-unnamed``: straight to PostgreSQL, statements unnamed (``prepare_threshold: None``),
  what a PgBouncer without prepared-statement support forces;
- ``pgbouncer-<version>``: through each PgBouncer given (``--pgbouncer PATH``, again for more;
  default: Debian's package and the one tools/pgbouncer_build.py built, where present), started
  here in transaction mode, with Django's default settings and ``LISTEN_URL`` straight to
  PostgreSQL: djasync's statements stay prepared through 1.21+ (``max_prepared_statements``
  200) and go unnamed through older ones;
- ``pgbouncer-<version>-unnamed``: through a 1.21+ one with ``prepare_threshold: None``, which
  tells the pooler's own cost from that of the unnamed statements.

Each variant runs ``--reps`` times, interleaved (one of each, each rep starting one variant
later than the last); the median is reported, and the median of each rep's ratio to ``direct``
and to the first PgBouncer (the machine's drift cancels mostly in these). It empties the
djasync tables of ``DATABASE_URL`` (migrated first)::

    DATABASE_URL=postgresql://root@127.0.0.1:5432/h3 .venv/bin/python bench/pgbouncer.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pgbouncer", action="append", metavar="PATH",
                        help="a PgBouncer program to measure (default: Debian's and the built one)")
    args = parser.parse_args()

    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from tests import pgbouncer

    url = os.environ["DATABASE_URL"]
    target = {k: str(v) for k, v in conninfo_to_dict(url).items()
              if k in ("host", "port", "user", "password", "dbname")}
    programs = args.pgbouncer or [p for p in (pgbouncer.executable(),
                                              pgbouncer.built_executable()) if p]
    if not programs:
        raise SystemExit("no PgBouncer: apt-get install pgbouncer, or tools/pgbouncer_build.py")
    work = Path(tempfile.mkdtemp(prefix="djasync-bench-pgbouncer-"))
    settings = work / "settings"
    settings.mkdir()
    (settings / "unnamed_settings.py").write_text(
        "from tests.settings import *  # noqa\n"
        "DATABASES['default']['OPTIONS'] = {'prepare_threshold': None}\n")
    # Through PgBouncer, LISTEN goes straight to PostgreSQL, as docs/howto/pgbouncer.md says.
    listen = f"DJASYNC = {{**DJASYNC, 'LISTEN_URL': {url!r}}}\n"
    (settings / "pooled_settings.py").write_text(
        "from tests.settings import *  # noqa\n" + listen)
    (settings / "pooled_unnamed_settings.py").write_text(
        "from unnamed_settings import *  # noqa\n" + listen)
    variants = {
        "direct": (url, "tests.settings"),
        "direct-unnamed": (url, "unnamed_settings"),
    }
    bouncers = []
    try:
        for number, program in enumerate(programs):
            version = pgbouncer.version(program)
            if version is None:
                raise SystemExit(f"{program} is not PgBouncer")
            tracks = version >= pgbouncer.TRACKS_PREPARED
            bouncer = pgbouncer.start(work / f"pgbouncer-{number}", target,
                                      pool_size=args.concurrency + 4, program=program,
                                      max_prepared_statements=200 if tracks else None)
            bouncers.append(bouncer)
            name = f"pgbouncer-{pgbouncer.dotted(version)}"
            variants[name] = (bouncer.url(), "pooled_settings")
            if tracks:
                variants[f"{name}-unnamed"] = (bouncer.url(), "pooled_unnamed_settings")
        rates: dict[str, list[float]] = {name: [] for name in variants}
        with psycopg.connect(url, autocommit=True) as conn:
            names = list(variants)
            for rep in range(args.reps):
                # Each rep starts at the next variant: none always runs first or after another.
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    database_url, module = variants[name]
                    _fill(conn, args.jobs)
                    env = {**os.environ, "DATABASE_URL": database_url,
                           "PYTHONPATH": f"{settings}:{ROOT}"}
                    subprocess.run(
                        [sys.executable, "-m", "djasync_worker", "--settings", module, "--burst",
                         "--concurrency", str(args.concurrency), "--batch-size",
                         str(args.batch_size), "--log-level", "warning"],
                        cwd=ROOT, env=env, check=True, timeout=600)
                    rate = _rate(conn, args.jobs)
                    rates[name].append(rate)
                    print(f"rep {rep + 1} {name}: {rate:.0f} jobs/s", flush=True)
    finally:
        for bouncer in bouncers:
            bouncer.stop()
    print(f"\n{args.jobs} jobs, --concurrency {args.concurrency}, --batch-size "
          f"{args.batch_size}, median of {args.reps} (the ratio is the median of each rep's "
          "ratio to the direct run next to it, which cancels most of a shared machine's drift):")
    first = next(name for name in rates if name.startswith("pgbouncer-"))
    for name, values in rates.items():
        ratios = [v / d for v, d in zip(values, rates["direct"], strict=True)]
        to_first = [v / d for v, d in zip(values, rates[first], strict=True)]
        print(f"  {name:26} {statistics.median(values):7.0f} jobs/s  "
              f"{statistics.median(ratios):6.1%} of direct  "
              f"{statistics.median(to_first):6.1%} of {first}  "
              f"(runs: {', '.join(f'{v:.0f}' for v in values)}; ratios to direct: "
              f"{', '.join(f'{r:.0%}' for r in ratios)})")


def _fill(conn, jobs: int) -> None:
    conn.execute("TRUNCATE djasync_attempt, djasync_job CASCADE")
    conn.execute("""
        INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, status, run_after,
                                 created_at, attempts, worker, identity)
        SELECT 'tests.jobs.add', '[1, 2]', '{}', '{}', 'default', 0, 'pending',
               now() - interval '1 s', now(), 0, '', ''
          FROM generate_series(1, %s)""", [jobs])
    conn.execute("VACUUM ANALYZE djasync_job")


def _rate(conn, jobs: int) -> float:
    done, first, last = conn.execute(
        "SELECT count(*), min(finished_at), max(finished_at) FROM djasync_job"
        " WHERE status = 'succeeded'").fetchone()
    if done != jobs:
        raise SystemExit(f"{done} of {jobs} jobs succeeded")
    return (jobs - 1) / (last - first).total_seconds()


if __name__ == "__main__":
    main()
