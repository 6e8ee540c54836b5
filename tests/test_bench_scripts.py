"""The benchmark scripts behind the docs' figures still run and still measure what they say,
at a size that takes seconds (the figures themselves come from full runs: bench/REPORT.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.daemon import ROOT, worker_env

pytestmark = pytest.mark.django_db(transaction=True)


def bench(*args: str, url: str | None = None, timeout: float = 180) -> str:
    env = worker_env(**({"DATABASE_URL": url} if url else {}))
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_claimers_counts_the_locked_rows_a_claim_walks_past(scratch_database):
    out = bench("bench/claimers.py", "--holders", "0,3", "--limit", "1,2", "--jobs", "50",
                "--repeat", "5", "--use-env-db", url=scratch_database)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["holders"], r["limit"]) for r in rows] == [(0, 1), (0, 2), (3, 1), (3, 2)]
    # Each holder locks one of the best jobs: the timed claim must step over exactly those.
    assert [r["rows_walked_past"] for r in rows] == [0, 0, 3, 3]
    assert all(r["server_ms"] > 0 and r["wall_ms"] >= r["server_ms"] for r in rows)
    assert "| claimers holding a job |" in out


def test_capacity_reports_wal_cpu_and_dead_rows_per_job_for_each_step():
    out = bench("bench/capacity.py", "--jobs", "200", "--batch", "5")
    report = json.loads(out)  # the log goes to stderr
    steps = [r["step"] for r in report["results"]]
    assert steps == ["schedule_many", "drain c4 batch 1", "prune_jobs", "VACUUM",
                     "schedule_many", "drain c4 batch 5", "prune_jobs", "VACUUM"]
    by_step = {r["step"]: r for r in report["results"]}
    for step in ("schedule_many", "drain c4 batch 1", "drain c4 batch 5", "prune_jobs"):
        assert by_step[step]["jobs"] == 200
        assert by_step[step]["wal_bytes_per_job"] > 0, step  # every step writes
    assert by_step["drain c4 batch 1"]["jobs_per_s_after_first"] > 0
    # The drain updates each job and adds its attempt: dead rows appear before the VACUUM.
    assert by_step["drain c4 batch 1"]["djasync_job_dead_per_job"] > 0
    assert report["postgres"]


def test_ab_alternates_the_two_commits_and_reports_per_pair_ratios():
    out = bench("bench/ab.py", "--base", "HEAD", "--head", "HEAD", "--pairs", "2", "--n", "200",
                "--concurrency", "1")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    drains = [r for r in lines if "side" in r]
    # ABBA: the order flips every pair; every drain ran all its jobs once (drain_figures).
    assert [(r["pair"], r["side"]) for r in drains] == [(0, "base"), (0, "head"),
                                                        (1, "head"), (1, "base")]
    assert all(r["jobs"] == 200 and r["worker_cpu_s"] > 0 and r["empty"]["worker_cpu_s"] > 0
               and r["server_cpu_s"] > 0 and r["calls"] >= 200 for r in drains)
    summary = [r["summary"] for r in lines if "summary" in r]
    assert {r["figure"] for r in summary} >= {"jobs/s", "worker CPU ms/job",
                                               "server CPU ms/job, start-up excluded"}
    assert all(r["pairs"] == 2 and r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
               for r in summary)
    # The same code on both sides: the same statements per job, counted from the server log.
    (counted,) = [r["statements_per_job"] for r in lines if "statements_per_job" in r]
    assert counted["base"] > 4 and abs(counted["head"] - counted["base"]) < 0.5
    assert "| c1 | jobs/s |" in out


def test_ab_drains_jobs_with_keys_under_limits_and_refuses_limits_without_keys():
    out = bench("bench/ab.py", "--base", "HEAD", "--head", "HEAD", "--pairs", "1", "--n", "200",
                "--concurrency", "1", "--limits", '{"eight": {"concurrency": 8}}',
                "--keys", '["eight"]')
    drains = [json.loads(line) for line in out.splitlines() if line.startswith('{"')]
    drains = [r for r in drains if "side" in r]
    assert len(drains) == 2 and all(r["jobs"] == 200 for r in drains)
    done = subprocess.run([sys.executable, "bench/ab.py", "--limits", '{"eight": {}}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--limits and --keys go together" in done.stderr
    done = subprocess.run([sys.executable, "bench/ab.py", "--limits", '{"eight": {}}',
                           "--keys", '"eight"'], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "--keys a JSON array of key strings" in done.stderr
