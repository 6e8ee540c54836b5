"""The short chaos run (chaos/run.py --short): kill -9, cut connections, PostgreSQL restarts.

The harness runs once per session, as a subprocess with its own PostgreSQL; each test below
asserts one part of its JSON report. ``make chaos`` runs the long version.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEED = 20240601
WALL_LIMIT_SECONDS = 240

pytestmark = [pytest.mark.daemon, pytest.mark.timeout(WALL_LIMIT_SECONDS + 60)]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("chaos") / "report.json"
    result = subprocess.run(
        [sys.executable, "chaos/run.py", "--short", "--seed", str(SEED), "--report", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=WALL_LIMIT_SECONDS,
    )
    assert path.exists(), f"no report; exit {result.returncode}\n{result.stdout[-4000:]}\n" \
                          f"{result.stderr[-4000:]}"
    data = json.loads(path.read_text())
    data["_output"] = result.stdout[-6000:]
    assert "harness_traceback" not in data, data["harness_traceback"]
    return data


def _checks(report: dict[str, Any]) -> dict[str, Any]:
    return report["checks"]


def test_no_in_transaction_effect_ran_twice(report):
    checks = _checks(report)
    assert checks["duplicates"] == 0, checks["duplicate_keys"]
    assert checks["double_success_attempts"] == 0


def test_no_committed_job_was_lost_and_rolled_back_jobs_never_existed(report):
    checks = _checks(report)
    assert checks["losses"] == 0, (checks["lost_keys"], checks["stuck_keys"])
    assert checks["rolled_back_leaked"] == 0
    assert report["jobs"]["rolled_back"] > 0  # the producer did roll batches back
    assert not checks.get("unknown_jobs")


def test_effects_and_completions_commit_together(report):
    checks = _checks(report)
    assert checks["effect_without_completion"] == 0
    assert checks["completion_without_effect"] == 0


def test_poison_jobs_are_quarantined_and_no_innocent_job_is(report):
    checks = _checks(report)
    poison = checks["poison"]
    assert poison["jobs"] == poison["quarantined"] > 0
    for function, rows in poison["attempt_rows_by_function"].items():
        assert rows and all(n > 0 for n in rows), (function, rows)
    assert checks["false_quarantines"] == 0, checks["false_quarantine_jobs"]
    assert checks["unexplained_charges"] == [], checks["unexplained_charges"]


def test_poison_jobs_stop_at_max_attempts_plus_only_the_crashes_counted_late(report):
    """The documented guarantee (docs, "Known limits"): max_attempts, plus one per crash
    counted late because the chaos ended its session before its supervisor wrote it (each
    such count must match a pg_terminate_backend or restart: `unexplained_late_counts`)."""
    checks = _checks(report)
    for function, jobs in checks["poison"]["rows_and_late_by_function"].items():
        assert all(rows <= 3 + late for rows, late in jobs), (function, jobs)
    assert checks["unexplained_late_counts"] == [], checks["unexplained_late_counts"]


def test_the_checker_recognises_the_late_mark():
    from chaos.checker import LATE_MARK
    from djasync.attempts import LATE_NOTE

    assert LATE_NOTE.startswith(" " + LATE_MARK)


def test_the_negative_control_shows_duplicates(report):
    """Effects written outside the job's transaction do run twice: the chaos bites."""
    assert _checks(report)["control_duplicates"] > 0, report["_output"]


def test_every_kind_of_fault_was_injected(report):
    faults = report["faults"]
    for kind in ("kill_child", "pg_terminate_backend", "pg_cancel_backend", "pg_restart",
                 "sigstop_child"):
        assert faults.get(kind, 0) > 0, faults
    assert faults["pg_restart"] == 3
    modes = [(r["mode"], r["synchronous_commit_off"]) for r in report["restarts"]]
    assert modes == [("fast", False), ("immediate", False), ("immediate", True)]


def test_one_daemon_ran_its_jobs_through_pgbouncer_when_there_is_one(report):
    """With hosts (root) and a PgBouncer (.ci/run installs Debian's and builds 1.24), one
    daemon's connections go through PgBouncer in transaction mode, its LISTEN direct."""
    from tests import pgbouncer

    bouncer = report["pgbouncer"]
    if report["network"].get("unavailable") or not (
            pgbouncer.built_executable() or pgbouncer.executable()):
        assert "version" not in bouncer, bouncer
        pytest.skip(f"no pooled host in this run: {bouncer}")
    assert bouncer["version"] and bouncer["pool_size"] == 6, bouncer  # --concurrency 2, + 4
    assert bouncer["transactions"] > 200, bouncer


def test_work_resumes_soon_after_each_postgresql_restart(report):
    for restart in report["restarts"]:
        assert restart["accept_to_first_commit_seconds"] is not None, restart
        assert restart["accept_to_first_commit_seconds"] < 15, restart


def test_the_queue_drains_after_the_last_fault_and_no_session_idles_in_a_transaction(report):
    assert report["drain_seconds_after_last_fault"] <= report["drain_limit_seconds"]
    assert report["idle_in_transaction_after_drain"] == []
    assert not [v for v in report["violations"] if v.startswith("I5")], report["violations"]


def test_sigterm_lets_slow_jobs_finish_and_every_daemon_exits_0_within_its_grace(report):
    sigterm = report["sigterm"]
    assert sigterm["slow_jobs_running"] > 0
    assert sigterm["slow_jobs_succeeded"] >= sigterm["slow_jobs_running"]
    assert [d["exit_code"] for d in sigterm["daemons"]] == [0] * len(sigterm["daemons"])
    assert sigterm["drain_seconds"] < 20


def test_a_second_sigterm_stops_at_once_and_the_cut_job_runs_once_later(report):
    double = report["double_sigterm"]
    assert double["exit_code"] == 0 and double["seconds"] < 5
    assert (double["job_status_after"], double["ledger_rows_after"]) == ("pending", 0)
    assert double["ledger_rows_after_rerun"] == 1


def test_a_stopping_daemon_claims_no_new_job(report):
    assert report["sigterm"]["jobs_claimed_after_sigterm"] == 0


def test_no_daemon_exits_unless_the_chaos_killed_it(report):
    assert report["daemon_exits"]["unexpected"] == []


# -- the mixed workload (issue 13): long jobs, a batch daemon, groups, cancels, periodic jobs,
# -- pruning and unique keys, while the faults go on.


def test_the_mixed_workload_ran_while_the_faults_went_on(report):
    mixed = report["mixed"]
    assert all(mixed["actions"].get(a, 0) > 0
               for a in ("long", "group", "cancel", "mate", "unique")), mixed
    assert mixed["prune_runs"] > 0 and mixed["jobs_pruned"] > 0, mixed
    assert mixed["unique_samples"] > 0, mixed


def test_long_jobs_take_effect_at_least_once_and_only_in_runs_that_were_recorded(report):
    """L1: succeeded => an effect; L2: effects <= attempt rows (every run is recorded);
    L3: no run begins after the job's success was recorded."""
    checks = _checks(report)
    assert checks["long_jobs"]["by_status"].get("succeeded", 0) > 0, checks["long_jobs"]
    assert checks["completion_without_effect"] == 0
    assert checks["long_effects_unrecorded"] == []
    assert checks["long_effects_after_success"] == []


def test_a_cancel_that_returned_success_leaves_the_job_cancelled_and_without_effect(report):
    """C1-C3, for cancel(), deschedule() and a job cancelling its batch-mate."""
    checks = _checks(report)
    assert checks["cancels"]["returned_success"] > 0, checks["cancels"]
    assert checks["cancels"]["in_job_cancels_tried"] > 0, checks["cancels"]
    assert checks["cancelled_but_not_cancelled"] == []
    assert checks["cancelled_with_effect"] == []
    assert checks["cancelled_without_successful_cancel"] == []


def test_a_groups_final_job_starts_only_after_every_member_finished(report):
    checks = _checks(report)
    assert checks["groups"]["with_final"] > 0, checks["groups"]
    assert checks["finals_before_members"] == []


def test_each_periodic_slot_is_enqueued_once_and_its_job_runs_once(report):
    checks = _checks(report)
    assert checks["periodic"]["slots"].get("every-second", 0) > 0, checks["periodic"]
    assert checks["periodic_slots_twice"] == []
    assert checks["periodic_slot_job_mismatch"] == {}
    assert checks["periodic_runs_wrong"] == []


def test_one_pending_job_per_unique_key_at_any_time(report):
    checks = _checks(report)
    assert checks["unique"]["generations"] > checks["unique"]["keys"] > 0, checks["unique"]
    assert checks["unique_pending_twice"] == []


def test_pruning_never_deletes_a_pending_job_nor_part_of_an_unfinished_group(report):
    checks = _checks(report)
    assert checks["pruned"].get("job", 0) > 0, checks["pruned"]
    assert checks["pruned_pending_jobs"] == []
    assert checks["pruned_group_jobs_while_group_pending"] == []
    assert checks["pruned_attempts_of_kept_jobs"] == []


def test_the_report_lists_no_violation(report):
    assert report["violations"] == []


# -- hosts and network cuts (issue 14): the daemons on hosts (network namespaces), cut off
# -- by nftables (chaos/network.py). Needs root, ip and nft; without them the run has no hosts.


def _network(report: dict[str, Any]) -> dict[str, Any]:
    network = report.get("network") or {}
    if "cuts" not in network:
        pytest.skip(f"the run had no hosts: {network.get('unavailable')}")
    return network


def test_hosts_were_cut_off_both_ways_one_way_at_a_commit_and_on_the_listen_connection(report):
    network = _network(report)
    assert report["faults"].get("cut_listener", 0) > 0, network["cuts"]
    assert sum(report["faults"].get(k, 0)
               for k in ("cut_host", "cut_one_way", "cut_commit")) >= 2, network["cuts"]
    assert all(c["healed"] for c in network["cut_log"]), network["cut_log"]


def test_no_job_stays_locked_longer_than_the_bound_after_a_cut(report):
    """N1: a cut host's transactions (its claimed jobs) end within the server's detection of
    the cut, plus slack; no host transaction outlasts a job's timeout plus that."""
    network = _network(report)
    assert not [v for v in report["violations"] if v.startswith("N1")], report["violations"]
    for cut in network["cut_log"]:
        if "locked_after_cut_s" in cut:
            assert cut["locked_after_cut_s"] <= cut["locked_bound_s"], cut
    assert (network["longest_host_transaction_s"]
            <= network["bounds_s"]["host_transaction"]), network


def test_every_host_reconnects_after_each_heal_and_a_listen_cut_is_noticed(report):
    """N2 and N3."""
    network = _network(report)
    assert not [v for v in report["violations"] if v[:2] in ("N2", "N3")], report["violations"]
    for cut in network["cut_log"]:
        assert cut["back_after_heal_s"] is not None, cut
        assert cut["back_after_heal_s"] <= network["bounds_s"]["back_after_heal"], cut


# -- flow control (issue 16): flow jobs over tenant keys of concurrency 2 (some also holding a
# -- rated key, some long), half of them in a queue paused and resumed, while the faults go on.


def _flow(report: dict[str, Any]) -> dict[str, Any]:
    return _checks(report)["flow"]


def test_no_key_ever_runs_more_jobs_at_once_than_its_concurrency(report):
    """F1, with runs killed or cut off mid-way counted for the time they ran."""
    flow = _flow(report)
    assert len(flow["max_overlap_by_key"]) == 6, flow
    assert max(flow["max_overlap_by_key"].values()) == 2, flow  # reached, never passed
    assert flow["over_runs"] == []
    # The faults did cut flow runs short (their records end at their last mark).
    assert sum(killed for *_, killed in flow["runs"]) > 0, flow["runs"]
    kinds = {(kind, queue, rated) for kind, queue, rated, _, _ in flow["runs"]}
    assert {("atomic", "flow", True), ("long", "default", False)} <= kinds, kinds


def test_a_paused_queue_starts_nothing_a_second_after_the_pause_and_runs_once_resumed(report):
    """F2."""
    (pause,) = _flow(report)["pauses"]
    (harness,) = report["pauses"]
    assert pause["starts_in_5_s_before"] > 0 and harness["due_at_resume"] > 0, harness
    assert pause["started_while_paused"] == []
    assert pause["first_start_after_resume_s"] is not None, pause


def test_no_window_of_a_rate_holds_more_starts_than_the_rate(report):
    """F3: the committed stamps of the rated key's tokens, and a stamp for every committed
    rated run."""
    rate = _flow(report)["rate"]
    assert rate["stamps"] > rate["rate"], rate
    assert rate["max_in_a_window"] <= rate["rate"] + rate["burst"], rate
    assert rate["committed_runs_without_token"] == []
