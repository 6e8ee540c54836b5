"""The invariants, checked with SQL once the queue has drained (reliability.md §6, I1-I6).

:func:`check` reads the jobs, attempts and ledger rows of a finished run and compares them with
what the harness knows it scheduled, committed, rolled back and killed. Every list it returns
is empty on a correct run, except the negative control's duplicates, which must not be.
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg

LEDGER = "chaos.jobs.ledger"
SLOW = "chaos.jobs.slow"
EXTERNAL = "chaos.jobs.external"
LONG = "chaos.jobs.long"
FINAL = "chaos.jobs.final"
CANCEL_MATE = "chaos.jobs.cancel_mate"
PERIODIC = "chaos.jobs.periodic"
POISON = ("chaos.jobs.segv", "chaos.jobs.sigkill", "chaos.jobs.exit1", "chaos.jobs.always_raise")
#: Flow control (chaos/settings.py LIMITS): what the checker holds the runs to, whatever the
#: workers enforced (a run with a looser limit must fail here).
FLOW_CONCURRENCY = 2
FLOW_RATE_KEY = "api"
FLOW_RATE = 10
FLOW_RATE_SECONDS = 1.0
#: The documented burst on top of a rate's N per window (docs/howto/flow-control.md: none,
#: the burst is part of the N).
FLOW_RATE_BURST = 0
#: A paused queue's jobs may still start this long after the pause took effect.
PAUSE_GRACE_SECONDS = 1.0
FLOW_QUEUE = "flow"
#: Jobs whose only effect is written in their own transaction: duplicates are bugs.
IN_TRANSACTION = (LEDGER, SLOW, FINAL, CANCEL_MATE)

#: Every job and attempt the run ever had: the tables plus what pruning deleted (archived by a
#: trigger in the deleting transaction: chaos/migrations/0002). Subqueries, for any statement.
ALL_JOBS = """(SELECT * FROM djasync_job UNION ALL
 SELECT r.* FROM chaos_pruned p, jsonb_populate_record(NULL::djasync_job, p.row) r
  WHERE p.source = 'job')"""
ALL_ATTEMPTS = """(SELECT * FROM djasync_attempt UNION ALL
 SELECT r.* FROM chaos_pruned p, jsonb_populate_record(NULL::djasync_attempt, p.row) r
  WHERE p.source = 'attempt')"""
#: Keep lists in the report short; the counts are exact.
SAMPLE = 20
#: Start of ``djasync.attempts.LATE_NOTE``: a lost attempt counted after its run's session had
#: ended (so the job was claimable, uncounted, meanwhile). Not imported: the checker runs
#: before Django is set up.
LATE_MARK = "[counted late: "
#: The supervisor's reason for a long job its fence killed (djasync_worker/supervisor.py).
FENCED_LONG = "and with it the flow-control slots it held"
#: The reason ``djasync.leases.free_leases_of_dead`` gives a long job's run whose outcome its
#: worker could not write before it died: the write failed, or committed and was lost (a
#: crash restart with ``synchronous_commit = off``: seed 901, where the fence then killed the
#: child as its session had ended).
OUTCOME_LOST = "could not write this run's outcome"


@dataclass
class Expectations:
    """What the harness did, to compare with what the database says."""

    #: key -> function name, for every job whose scheduling transaction committed (acked).
    committed: dict[str, str] = field(default_factory=dict)
    #: Keys of jobs scheduled in transactions that were rolled back on purpose.
    rolled_back: set[str] = field(default_factory=set)
    #: Batches whose COMMIT failed with the connection: committed or not, but all or nothing.
    uncertain: list[list[str]] = field(default_factory=list)
    #: Child processes the chaos killed (kill -9) or stopped (the supervisor then kills them
    #: for running past their timeout): the only processes whose jobs may be charged a crash.
    killed_children: set[int] = field(default_factory=set)
    stopped_children: set[int] = field(default_factory=set)
    #: When the chaos ended sessions from outside (pg_terminate_backend, restarts): (from, to).
    #: The only events that may make a lost attempt be counted late.
    sessions_ended: list[tuple[datetime.datetime, datetime.datetime]] = field(
        default_factory=list)
    #: Daemons and children of hosts the chaos cut off the network (chaos/network.py): their
    #: jobs may be charged a crash or a timeout.
    cut_pids: set[int] = field(default_factory=set)
    #: Children of supervisors the chaos killed (they die with it; nobody records their crash
    #: at once, their leases expire).
    orphaned_children: set[int] = field(default_factory=set)
    #: (when, kind) of every fault: what may make a long job's lease expire.
    fault_times: list[tuple[datetime.datetime, str]] = field(default_factory=list)
    #: Keys whose cancel (cancel() or deschedule(), by the cancelling producer) returned 1, 0,
    #: or raised (unknown outcome).
    cancel_ok: dict[str, str] = field(default_factory=dict)
    cancel_refused: set[str] = field(default_factory=set)
    cancel_unknown: set[str] = field(default_factory=set)
    #: Keys of jobs that a cancel_mate job tries to cancel.
    mate_keys: set[str] = field(default_factory=set)
    #: Unique keys: the schedules that returned an existing job (so added none), and moments
    #: when more than one job with one unique key was pending (sampled during the run).
    unique_merged: int = 0
    unique_overlaps: list[Any] = field(default_factory=list)
    #: Pauses of the flow queue: (paused at, resumed at). ``paused at`` is taken just before
    #: the pause_queue() call that succeeded (so no later than the pause took effect).
    pauses: list[tuple[datetime.datetime, datetime.datetime]] = field(default_factory=list)
    #: Seconds a long job's lease lasts (DJASYNC["LEASE_SECONDS"]) and the jobs' timeout.
    lease_seconds: float = 2.0
    timeout_seconds: float = 4.0


DUPLICATES = """
SELECT key, count(*) FROM chaos_ledgerentry WHERE kind = %s GROUP BY key HAVING count(*) > 1
ORDER BY count(*) DESC, key
"""

#: I3: an in-transaction effect whose job did not succeed (or does not exist).
EFFECT_WITHOUT_COMPLETION = """
SELECT l.key, j.id, j.status
  FROM (SELECT DISTINCT key FROM chaos_ledgerentry WHERE kind = 'txn') l
  LEFT JOIN all_jobs j ON j.args->>0 = l.key
 WHERE j.id IS NULL OR j.status <> 'succeeded'
 ORDER BY l.key
"""

#: I3: a succeeded job without its effect (kind 'txn' for in-transaction jobs, 'external' for
#: the control, whose row is committed before its job's).
COMPLETION_WITHOUT_EFFECT = """
SELECT j.id, j.name, j.args->>0
  FROM all_jobs j
 WHERE j.status = 'succeeded' AND j.name = ANY(%(names)s)
   AND NOT EXISTS (SELECT 1 FROM chaos_ledgerentry l
                    WHERE l.key = j.args->>0 AND l.kind = %(kind)s)
 ORDER BY j.id
"""

#: Two succeeded attempts of one job would be a double completion.
DOUBLE_SUCCESS = """
SELECT job_id, count(*) FROM all_attempts WHERE outcome = 'succeeded'
 GROUP BY job_id HAVING count(*) > 1
"""

JOBS = """
SELECT j.id, j.name, j.args->>0, j.status, j.meta, j.attempts,
       count(a.id), coalesce(array_agg(a.outcome ORDER BY a.id) FILTER (WHERE a.id IS NOT NULL),
                             '{}'),
       count(a.id) FILTER (WHERE strpos(a.exception_message, %s) > 0),
       j.group_id, j.finished_at
  FROM all_jobs j LEFT JOIN all_attempts a ON a.job_id = j.id
 WHERE j.name <> %s
 GROUP BY j.id, j.name, j.args, j.status, j.meta, j.attempts, j.group_id, j.finished_at
"""

#: Attempts of non-poison jobs that did not succeed: each must have a cause in the chaos.
INNOCENT_FAILED_ATTEMPTS = """
SELECT j.id, j.args->>0, a.outcome, a.exception_type, a.exception_message, a.worker,
       a.finished_at
  FROM all_attempts a JOIN all_jobs j ON j.id = a.job_id
 WHERE a.outcome <> 'succeeded' AND NOT (j.name = ANY(%s))
 ORDER BY a.id
"""

ATTEMPT_OUTCOMES = "SELECT outcome, count(*) FROM all_attempts GROUP BY outcome"

#: Lost attempts counted late (LATE_MARK): each needs a session ended by the chaos meanwhile.
LATE_ATTEMPTS = """
SELECT a.id, j.args->>0, a.outcome, a.started_at, a.finished_at, a.worker
  FROM all_attempts a JOIN all_jobs j ON j.id = a.job_id
 WHERE strpos(a.exception_message, %s) > 0
 ORDER BY a.id
"""
#: The reason ``djasync.leases.take`` gives a lost attempt whose lease expired.
LEASE_EXPIRED = "lease expired"
#: Faults that may stop a running long job's lease renewals (not pg_cancel_backend: it only
#: cancels a statement; a failed renewal is tried again a third of a lease later).
LEASE_BREAKERS = ("kill_child", "kill_supervisor", "sigstop_child", "pg_terminate_backend",
                  "pg_restart", "cut_host", "cut_one_way", "cut_commit")
#: Clock slack when matching a late attempt with the chaos event that ended its session.
LATE_SLACK = datetime.timedelta(seconds=1)

#: I5: a session that sits in a transaction doing nothing holds locks and the xmin horizon.
IDLE_IN_TRANSACTION = """
SELECT pid, application_name, state, extract(epoch FROM now() - state_change)::float,
       left(query, 200)
  FROM pg_stat_activity
 WHERE datname = current_database() AND state LIKE 'idle in transaction%%'
   AND now() - state_change > make_interval(secs => %s)
"""


def idle_in_transaction(conn: psycopg.Connection, older_than: float = 2.0,
                        exclude: tuple[str, ...] = ()) -> list[dict]:
    """Sessions idle in a transaction for longer than ``older_than`` seconds, except those
    whose application_name is in ``exclude``."""
    rows = [r for r in conn.execute(IDLE_IN_TRANSACTION, [older_than]).fetchall()
            if r[1] not in exclude]
    return [{"pid": r[0], "application_name": r[1], "state": r[2], "seconds": round(r[3], 1),
             "query": r[4]} for r in rows]


def _pid_of(worker: str) -> int | None:
    match = re.search(r":(\d+)$", worker or "")
    return int(match.group(1)) if match else None


def check(conn: psycopg.Connection, expected: Expectations) -> dict[str, Any]:
    """Run every check; return the findings (see the keys) and ``violations``, a list of
    one-line descriptions of broken invariants (empty when all hold)."""
    violations: list[str] = []
    found: dict[str, Any] = {}
    conn.execute(f"CREATE OR REPLACE TEMP VIEW all_jobs AS {ALL_JOBS}")
    conn.execute(f"CREATE OR REPLACE TEMP VIEW all_attempts AS {ALL_ATTEMPTS}")

    # -- I1 duplicates, and I6 the negative control ------------------------------------------
    dups = conn.execute(DUPLICATES, ["txn"]).fetchall()
    found["duplicates"] = sum(n - 1 for _, n in dups)
    found["duplicate_keys"] = [[k, n] for k, n in dups[:SAMPLE]]
    if dups:
        violations.append(f"I1: {found['duplicates']} duplicate in-transaction effects "
                          f"(keys {found['duplicate_keys'][:5]})")
    control = conn.execute(DUPLICATES, ["external"]).fetchall()
    found["control_duplicates"] = sum(n - 1 for _, n in control)
    found["control_duplicate_keys"] = len(control)

    # -- the jobs as the database has them ---------------------------------------------------
    rows = conn.execute(JOBS, [LATE_MARK, PERIODIC]).fetchall()
    jobs: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    twice: list[str] = []
    for (job_id, name, key, status, meta, attempts_field, attempt_rows, outcomes, late,
         group_id, finished_at) in rows:
        if key in jobs:
            twice.append(key)
        jobs[key] = {"id": job_id, "name": name, "status": status, "meta": meta or {},
                     "attempts": attempts_field, "attempt_rows": attempt_rows,
                     "outcomes": list(outcomes), "late": late, "group_id": group_id,
                     "finished_at": finished_at}
        if key not in expected.committed and not any(key in b for b in expected.uncertain):
            unknown.append(key)
    found["jobs_in_database"] = len(jobs)
    found["jobs_by_status"] = dict(Counter(j["status"] for j in jobs.values()))
    if twice:
        violations.append(f"{len(twice)} keys have two job rows: {twice[:5]}")
    if unknown:
        found["unknown_jobs"] = unknown[:SAMPLE]
        violations.append(f"{len(unknown)} jobs the harness never committed: {unknown[:5]}")

    # -- I2 losses: every acked job exists and is finished -----------------------------------
    # A cancelled job is finished only if someone may have cancelled it (checked below).
    cancellable = (set(expected.cancel_ok) | expected.cancel_refused | expected.cancel_unknown
                   | expected.mate_keys)
    missing = sorted(k for k in expected.committed if k not in jobs)
    not_finished = sorted(k for k, j in jobs.items() if j["status"] not in (
        ("succeeded", "failed", "cancelled") if k in cancellable else ("succeeded", "failed")))
    found["lost_keys"] = missing[:SAMPLE]
    found["stuck_keys"] = [[k, jobs[k]["status"]] for k in not_finished[:SAMPLE]]
    found["losses"] = len(missing) + len(not_finished)
    if missing:
        violations.append(f"I2: {len(missing)} committed jobs are gone: {missing[:5]}")
    if not_finished:
        violations.append(f"I2: {len(not_finished)} jobs never finished: {not_finished[:5]}")

    # Rolled-back batches: no job, no effect.
    ledger_keys = {k for (k,) in conn.execute("SELECT DISTINCT key FROM chaos_ledgerentry")}
    leaked = sorted(k for k in expected.rolled_back if k in jobs or k in ledger_keys)
    found["rolled_back_leaked"] = len(leaked)
    if leaked:
        violations.append(f"I2: {len(leaked)} rolled-back jobs exist or ran: {leaked[:5]}")
    partial = [b for b in expected.uncertain if 0 < sum(k in jobs for k in b) < len(b)]
    found["uncertain_batches"] = len(expected.uncertain)
    found["uncertain_batches_committed"] = sum(
        all(k in jobs for k in b) for b in expected.uncertain)
    if partial:
        violations.append(f"{len(partial)} batches committed in part: {partial[:2]}")

    # -- I3 atomicity -------------------------------------------------------------------------
    orphans = conn.execute(EFFECT_WITHOUT_COMPLETION).fetchall()
    found["effect_without_completion"] = len(orphans)
    if orphans:
        violations.append(f"I3: {len(orphans)} effects without a succeeded job: "
                          f"{[list(r) for r in orphans[:5]]}")
    hollow = conn.execute(COMPLETION_WITHOUT_EFFECT,
                          {"names": list(IN_TRANSACTION), "kind": "txn"}).fetchall()
    hollow += conn.execute(COMPLETION_WITHOUT_EFFECT,
                           {"names": [EXTERNAL], "kind": "external"}).fetchall()
    # L1: a long job that succeeded wrote its effect at least once.
    hollow += conn.execute(COMPLETION_WITHOUT_EFFECT,
                           {"names": [LONG], "kind": "long"}).fetchall()
    found["completion_without_effect"] = len(hollow)
    if hollow:
        violations.append(f"I3: {len(hollow)} succeeded jobs without their effect: "
                          f"{[list(r) for r in hollow[:5]]}")
    doubles = conn.execute(DOUBLE_SUCCESS).fetchall()
    found["double_success_attempts"] = len(doubles)
    if doubles:
        violations.append(f"{len(doubles)} jobs have two succeeded attempts: {doubles[:5]}")

    # -- I4 poison quarantined within max_attempts; no innocent job quarantined --------------
    # The documented guarantee (README, "Known limits"): at most max_attempts attempts, plus
    # one per crash counted late, i.e. whose session someone else ended (pg_terminate_backend,
    # a restart) before its supervisor had written it; such an attempt is marked LATE_MARK.
    poison = {k: j for k, j in jobs.items() if j["name"] in POISON}
    found["poison"] = {
        "jobs": len(poison),
        "quarantined": sum(j["status"] == "failed" for j in poison.values()),
        "attempt_rows_by_function": {
            name.rsplit(".", 1)[1]: sorted(j["attempt_rows"] for j in poison.values()
                                           if j["name"] == name)
            for name in POISON
        },
        #: [attempt rows, of which counted late] of each poison job.
        "rows_and_late_by_function": {
            name.rsplit(".", 1)[1]: sorted([j["attempt_rows"], j["late"]]
                                           for j in poison.values() if j["name"] == name)
            for name in POISON
        },
        "over_max_attempts": sum(j["attempt_rows"] > int(j["meta"].get("max_attempts", 10))
                                 for j in poison.values()),
    }
    for key, job in sorted(poison.items()):
        limit = int(job["meta"].get("max_attempts", 10))
        if job["status"] != "failed":
            violations.append(f"I4: poison job {key} (#{job['id']}) is {job['status']}")
        if job["attempt_rows"] > limit + job["late"]:
            violations.append(f"I4: poison job {key} (#{job['id']}) has {job['attempt_rows']} "
                              f"attempt rows for max_attempts={limit} and {job['late']} "
                              f"counted late: {job['outcomes']}")
    found["late_counted_attempts"] = sum(j["late"] for j in jobs.values())
    # A late count is allowed only where the chaos ended a session from outside (between the
    # attempt's start and its writing): anything else would be a bug hiding behind the mark.
    late_counts = [
        {"attempt": attempt_id, "key": key, "outcome": outcome, "started": str(started),
         "written": str(written), "worker": worker,
         "sessions_ended_meanwhile": [
             [str(began), str(ended)] for began, ended in expected.sessions_ended
             if began <= written + LATE_SLACK and ended >= started - LATE_SLACK]}
        for attempt_id, key, outcome, started, written, worker
        in conn.execute(LATE_ATTEMPTS, [LATE_MARK])
    ]
    found["late_counts"] = late_counts[:SAMPLE]
    unexplained_late = [c for c in late_counts if not c["sessions_ended_meanwhile"]]
    found["unexplained_late_counts"] = unexplained_late[:SAMPLE]
    if unexplained_late:
        violations.append(f"I4: {len(unexplained_late)} lost attempts counted late with no "
                          f"session ended by the chaos meanwhile: {unexplained_late[:3]}")
    false_quarantines = [
        {"key": k, "id": j["id"], "name": j["name"], "outcomes": j["outcomes"]}
        for k, j in sorted(jobs.items()) if j["name"] not in POISON and j["status"] == "failed"
    ]
    found["false_quarantines"] = len(false_quarantines)
    found["false_quarantine_jobs"] = false_quarantines[:SAMPLE]
    if false_quarantines:
        violations.append(f"I4: {len(false_quarantines)} innocent jobs failed: "
                          f"{false_quarantines[:3]}")

    # Attempts charged to innocent jobs: each must have a cause in the chaos.
    charged: Counter[str] = Counter()
    unexplained: list[dict[str, Any]] = []
    lease_window = datetime.timedelta(
        seconds=expected.lease_seconds + expected.timeout_seconds + 5)
    for job_id, key, outcome, exc_type, message, worker, written in conn.execute(
            INNOCENT_FAILED_ATTEMPTS, [list(POISON)]):
        pid = _pid_of(worker)
        if outcome == "crashed" and LEASE_EXPIRED in message:
            # Recorded by the worker that found the lease expired: the run it stands for
            # stopped renewing. Only a fault may do that (a frozen or orphaned child, a
            # restart, a cut session), shortly before.
            cause = "crashed: lease expired after a fault" if any(
                written - lease_window <= at <= written and kind in LEASE_BREAKERS
                for at, kind in expected.fault_times) else None
        elif outcome == "crashed" and (FENCED_LONG in message or OUTCOME_LOST in message):
            # A long job holding flow-control slots, killed by its supervisor's fence because
            # PostgreSQL ended its session; or a long job's finished run whose outcome was
            # lost with its session before its worker died. Either needs a session the chaos
            # ended (a restart, a terminate) or a host cut off, shortly before.
            session_lost = any(
                began - lease_window <= written and ended >= written - lease_window
                for began, ended in expected.sessions_ended) or pid in expected.cut_pids
            label = ("long job fenced after its session ended" if FENCED_LONG in message
                     else "a long job's outcome lost with its session")
            cause = f"crashed: {label}" if session_lost else None
        elif outcome == "crashed":
            cause = "crashed: child killed by chaos" if pid in expected.killed_children else (
                "crashed: stopped child" if pid in expected.stopped_children else (
                    "crashed: host cut off" if pid in expected.cut_pids else None))
        elif outcome == "timed_out" and "due to user request" in message:
            cause = "timed_out: pg_cancel_backend"
        elif outcome == "timed_out":
            cause = "timed_out: stopped child killed by its supervisor" if (
                pid in expected.stopped_children) else (
                "timed_out: host cut off" if pid in expected.cut_pids else None)
        else:  # an error the chaos caused: a terminated connection, a restart
            cause = f"{outcome}: {exc_type}"
        if cause is None:
            unexplained.append({"job": job_id, "key": key, "outcome": outcome,
                                "exception_type": exc_type, "message": message[:200],
                                "worker": worker})
        else:
            charged[cause] += 1
    found["chaos_charged"] = dict(charged)
    found["unexplained_charges"] = unexplained[:SAMPLE]
    if unexplained:
        violations.append(f"I4: {len(unexplained)} innocent attempts charged a crash or "
                          f"timeout the chaos did not cause: {unexplained[:3]}")

    _check_long_jobs(conn, expected, jobs, found, violations)
    found["flow"] = check_flow(conn, expected.pauses, violations)
    _check_cancels(conn, expected, jobs, found, violations)
    _check_groups(conn, jobs, found, violations)
    _check_periodic(conn, found, violations)
    _check_unique(conn, expected, found, violations)
    _check_pruning(conn, found, violations)

    found["attempts"] = dict(conn.execute(ATTEMPT_OUTCOMES).fetchall())
    found["violations"] = violations
    return found


# -- the mixed workload --------------------------------------------------------------------------

LONG_EFFECTS = "SELECT key, pid, run_started FROM chaos_ledgerentry WHERE kind = 'long' ORDER BY id"

#: When each job's success was recorded (its succeeded attempt's finished_at).
SUCCESS_AT = """
SELECT j.args->>0, min(a.finished_at) FROM all_attempts a JOIN all_jobs j ON j.id = a.job_id
 WHERE j.name = %s AND a.outcome = 'succeeded' GROUP BY j.args->>0
"""


def _check_long_jobs(conn: psycopg.Connection, expected: Expectations,
                     jobs: dict[str, dict[str, Any]], found: dict[str, Any],
                     violations: list[str]) -> None:
    """Long jobs (meta atomic=False): effects at least once (L1, with I3's
    ``completion_without_effect``), and never more than the runs recorded (L2), never from a
    run that began once the success was recorded (L3)."""
    effects: dict[str, list[tuple[int, datetime.datetime]]] = {}
    for key, pid, started in conn.execute(LONG_EFFECTS):
        effects.setdefault(key, []).append((pid, started))
    success_at = dict(conn.execute(SUCCESS_AT, [LONG]).fetchall())
    killed = expected.killed_children | expected.stopped_children | expected.orphaned_children
    long_jobs = {k: j for k, j in jobs.items() if j["name"] == LONG}
    unrecorded: list[dict[str, Any]] = []
    after_success: list[dict[str, Any]] = []
    excused = 0
    for key, job in sorted(long_jobs.items()):
        runs = effects.get(key, [])
        # L2: each run that wrote an effect is an attempt row (its success, failure, crash, or
        # its lease found expired by the next claim): effects <= attempt rows. A run whose
        # process the chaos killed may go unrecorded only if the job was no longer pending
        # when its lease expired (cancelled meanwhile).
        extra = len(runs) - job["attempt_rows"]
        killed_runs = sum(pid in killed for pid, _ in runs)
        job["long_effects_excused"] = 0
        if extra > 0 and extra <= killed_runs and job["status"] == "cancelled":
            excused += extra
            job["long_effects_excused"] = extra
        elif extra > 0:
            unrecorded.append({"key": key, "id": job["id"], "status": job["status"],
                               "effects": len(runs), "attempt_rows": job["attempt_rows"],
                               "outcomes": job["outcomes"], "pids": [p for p, _ in runs]})
        # L3: a claim needs the job pending, so no run begins after its success was recorded.
        done = success_at.get(key)
        for pid, started in runs:
            if done is not None and started is not None and started > done:
                after_success.append({"key": key, "id": job["id"], "pid": pid,
                                      "run_started": str(started), "succeeded_at": str(done)})
    for entry in unrecorded[:SAMPLE]:  # the details, to tell which run went unrecorded
        entry["runs"] = [[pid, str(started)] for pid, started in effects.get(entry["key"], [])]
        entry["attempts"] = [[o, w, str(b), str(e), m[:80]] for o, w, b, e, m in conn.execute(
            "SELECT outcome, worker, started_at, finished_at, exception_message "
            "FROM all_attempts WHERE job_id = %s ORDER BY id", [entry["id"]])]
    found["long_jobs"] = {
        "jobs": len(long_jobs),
        "by_status": dict(Counter(j["status"] for j in long_jobs.values())),
        "effects": sum(len(r) for r in effects.values()),
        "jobs_with_repeated_effects": sum(len(r) > 1 for r in effects.values()),
        "lease_expired_attempts": conn.execute(
            "SELECT count(*) FROM all_attempts a JOIN all_jobs j ON j.id = a.job_id "
            "WHERE j.name = %s AND strpos(a.exception_message, %s) > 0",
            [LONG, LEASE_EXPIRED]).fetchone()[0],
        "effects_of_killed_runs_excused": excused,
    }
    found["long_effects_unrecorded"] = unrecorded[:SAMPLE]
    found["long_effects_after_success"] = after_success[:SAMPLE]
    if unrecorded:
        violations.append(f"L2: {len(unrecorded)} long jobs have more effects than attempts "
                          f"(a run nobody recorded): {unrecorded[:3]}")
    if after_success:
        violations.append(f"L3: {len(after_success)} long-job runs began after the job's "
                          f"success was recorded: {after_success[:3]}")


def _check_cancels(conn: psycopg.Connection, expected: Expectations,
                   jobs: dict[str, dict[str, Any]], found: dict[str, Any],
                   violations: list[str]) -> None:
    """C1: a cancel that returned success left the job ``cancelled``, never succeeded; C2: and
    without effect (a long job: none beyond the runs recorded before, see L2). C3: a job ends
    ``cancelled`` only if a cancel of it returned success (or its outcome is unknown)."""
    in_job_ok = {k for (k,) in conn.execute(
        "SELECT DISTINCT key FROM chaos_ledgerentry WHERE kind = 'cancel_ok'")}
    txn_keys = {k for (k,) in conn.execute(
        "SELECT DISTINCT key FROM chaos_ledgerentry WHERE kind = 'txn'")}
    long_effects = dict(conn.execute(
        "SELECT key, count(*) FROM chaos_ledgerentry WHERE kind = 'long' GROUP BY key"
    ).fetchall())
    succeeded_ok = dict(expected.cancel_ok)
    succeeded_ok.update((k, "cancel by a job (in-job)") for k in in_job_ok)
    not_cancelled: list[dict[str, Any]] = []
    with_effect: list[dict[str, Any]] = []
    for key, how in sorted(succeeded_ok.items()):
        job = jobs.get(key)
        if job is None:
            continue  # I2 reports it
        if job["status"] != "cancelled" or "succeeded" in job["outcomes"]:
            not_cancelled.append({"key": key, "id": job["id"], "by": how, "name": job["name"],
                                  "status": job["status"], "outcomes": job["outcomes"]})
        # A long job's effects before the cancel are those of runs recorded as attempts (or
        # killed by the chaos while nobody could record them: see L2).
        if job["name"] in IN_TRANSACTION and key in txn_keys or (
                job["name"] == LONG and long_effects.get(key, 0)
                > job["attempt_rows"] + job.get("long_effects_excused", 0)):
            with_effect.append({"key": key, "id": job["id"], "by": how, "name": job["name"],
                                "status": job["status"], "attempt_rows": job["attempt_rows"],
                                "long_effects": long_effects.get(key, 0)})
    unexplained = sorted(
        k for k, j in jobs.items() if j["status"] == "cancelled" and k not in succeeded_ok
        and k not in expected.cancel_unknown)
    found["cancels"] = {
        "returned_success": len(expected.cancel_ok),
        "returned_success_by": dict(Counter(expected.cancel_ok.values())),
        "returned_nothing": len(expected.cancel_refused),
        "outcome_unknown": len(expected.cancel_unknown),
        "in_job_cancels_of_a_batch_mate_ok": len(in_job_ok),
        "in_job_cancels_tried": len(expected.mate_keys),
    }
    found["cancelled_but_not_cancelled"] = not_cancelled[:SAMPLE]
    found["cancelled_with_effect"] = with_effect[:SAMPLE]
    found["cancelled_without_successful_cancel"] = unexplained[:SAMPLE]
    if not_cancelled:
        violations.append(f"C1: {len(not_cancelled)} jobs whose cancel returned success did not "
                          f"end cancelled: {not_cancelled[:3]}")
    if with_effect:
        violations.append(f"C2: {len(with_effect)} jobs whose cancel returned success have "
                          f"effects: {with_effect[:3]}")
    if unexplained:
        violations.append(f"C3: {len(unexplained)} jobs ended cancelled though no cancel of "
                          f"theirs returned success: {unexplained[:5]}")


FINAL_STARTS = """
SELECT j.args->>0, min(a.started_at) FROM all_attempts a JOIN all_jobs j ON j.id = a.job_id
 WHERE j.name = %s GROUP BY j.args->>0
"""
FINAL_BODIES = """
SELECT l.key, min(l.at) FROM chaos_ledgerentry l JOIN all_jobs j ON j.args->>0 = l.key
 WHERE j.name = %s AND l.kind = 'txn' GROUP BY l.key
"""


def _check_groups(conn: psycopg.Connection, jobs: dict[str, dict[str, Any]],
                  found: dict[str, Any], violations: list[str]) -> None:
    """G1: a group's final job starts (every attempt's start, and ``clock_timestamp()`` at the
    start of its body, in the ledger) only after every other job of its group finished."""
    groups: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for key, job in jobs.items():
        if job["group_id"] is not None:
            groups.setdefault(job["group_id"], []).append((key, job))
    attempt_starts = dict(conn.execute(FINAL_STARTS, [FINAL]).fetchall())
    body_starts = dict(conn.execute(FINAL_BODIES, [FINAL]).fetchall())
    early: list[dict[str, Any]] = []
    with_final = 0
    for group_id, members in sorted(groups.items()):
        finals = [(k, j) for k, j in members if j["name"] == FINAL]
        if not finals:
            continue
        with_final += 1
        others = [(k, j) for k, j in members if j["name"] != FINAL]
        for key, _ in finals:
            starts = [t for t in (attempt_starts.get(key), body_starts.get(key)) if t]
            if not starts:
                continue
            began = min(starts)
            for member, job in others:
                if job["finished_at"] is None or job["finished_at"] > began:
                    early.append({"group": group_id, "final": key, "final_started": str(began),
                                  "member": member, "member_status": job["status"],
                                  "member_finished": str(job["finished_at"])})
    found["groups"] = {"with_final": with_final, "groups": len(groups),
                       "members": sum(len(m) for m in groups.values()) - with_final}
    found["finals_before_members"] = early[:SAMPLE]
    if early:
        violations.append(f"G1: {len(early)} times a group's final job started before a member "
                          f"had finished: {early[:3]}")


def _check_periodic(conn: psycopg.Connection, found: dict[str, Any],
                    violations: list[str]) -> None:
    """P1: each periodic slot inserted once (slot records are pruned: the trigger's log keeps
    them all); P2: one job per slot inserted (same transaction); P3: each periodic job ran to
    success once, with one effect."""
    doubles = [[n, str(s), c] for n, s, c in conn.execute(
        "SELECT name, slot, count(*) FROM chaos_slotlog GROUP BY name, slot "
        "HAVING count(*) > 1 ORDER BY slot")]
    slots = {n: (c, lo, hi) for n, c, lo, hi in conn.execute(
        "SELECT name, count(*), min(slot), max(slot) FROM chaos_slotlog GROUP BY name")}
    jobs_by_name = dict(conn.execute(
        "SELECT args->>0, count(*) FROM all_jobs WHERE name = %s GROUP BY 1", [PERIODIC]
    ).fetchall())
    runs = conn.execute(
        "SELECT j.id, j.status, (SELECT count(*) FROM chaos_ledgerentry l "
        "  WHERE l.kind = 'periodic' AND l.key = 'periodic-' || j.id) "
        "FROM all_jobs j WHERE j.name = %s", [PERIODIC]).fetchall()
    wrong = [[i, st, n] for i, st, n in runs if n != (1 if st == "succeeded" else 0)
             or st != "succeeded"]
    mismatch = {n: [slots.get(n, (0,))[0], jobs_by_name.get(n, 0)]
                for n in set(slots) | set(jobs_by_name)
                if slots.get(n, (0,))[0] != jobs_by_name.get(n, 0)}
    found["periodic"] = {
        "slots": {n: c for n, (c, _, _) in slots.items()},
        "jobs": jobs_by_name,
        "jobs_by_status": dict(Counter(st for _, st, _ in runs)),
        # Informative: slots no daemon enqueued (PostgreSQL restarting, every daemon down).
        "every_second_slots_skipped": (
            int((slots["every-second"][2] - slots["every-second"][1]).total_seconds()) + 1
            - slots["every-second"][0]) if "every-second" in slots else None,
    }
    found["periodic_slots_twice"] = doubles[:SAMPLE]
    found["periodic_slot_job_mismatch"] = mismatch
    found["periodic_runs_wrong"] = wrong[:SAMPLE]
    if not slots:
        violations.append("P: no periodic slot was ever enqueued")
    if doubles:
        violations.append(f"P1: {len(doubles)} periodic slots were enqueued more than once: "
                          f"{doubles[:5]}")
    if mismatch:
        violations.append(f"P2: periodic slots and jobs differ ([slots, jobs] by name): "
                          f"{mismatch}")
    if wrong:
        violations.append(f"P3: {len(wrong)} periodic jobs did not succeed with exactly one "
                          f"effect ([id, status, effects]): {wrong[:5]}")


def _check_unique(conn: psycopg.Connection, expected: Expectations, found: dict[str, Any],
                  violations: list[str]) -> None:
    """U1: never two pending jobs with one unique key (sampled during the run, and at the
    end). Each generation (job row) of a key runs once: I1-I3 on its own key."""
    now = conn.execute(
        "SELECT unique_key, count(*) FROM djasync_job WHERE status = 'pending' "
        "AND unique_key IS NOT NULL GROUP BY 1 HAVING count(*) > 1").fetchall()
    overlaps = expected.unique_overlaps + [["at the end", k, n] for k, n in now]
    generations = dict(conn.execute(
        "SELECT unique_key, count(*) FROM all_jobs WHERE unique_key IS NOT NULL GROUP BY 1"
    ).fetchall())
    found["unique"] = {"keys": len(generations), "generations": sum(generations.values()),
                       "schedules_merged_into_a_pending_job": expected.unique_merged}
    found["unique_pending_twice"] = overlaps[:SAMPLE]
    if overlaps:
        violations.append(f"U1: two pending jobs held one unique key: {overlaps[:5]}")


def _check_pruning(conn: psycopg.Connection, found: dict[str, Any],
                   violations: list[str]) -> None:
    """R1: pruning deleted no pending job; R2: no job of a group while another job of its
    group was pending; R3: no attempt of a job it kept."""
    pending = [[i, s] for i, s in conn.execute(
        "SELECT row_id, row->>'status' FROM chaos_pruned WHERE source = 'job' "
        "AND row->>'status' NOT IN ('succeeded', 'failed', 'cancelled')")]
    broken = [[i, g, n] for i, g, n in conn.execute(
        "SELECT row_id, row->>'group_id', group_pending FROM chaos_pruned "
        "WHERE source = 'job' AND group_pending > 0")]
    orphaned = [i for (i,) in conn.execute(
        "SELECT p.row_id FROM chaos_pruned p JOIN djasync_job j "
        "  ON j.id = (p.row->>'job_id')::bigint WHERE p.source = 'attempt'")]
    found["pruned"] = dict(conn.execute(
        "SELECT source, count(*) FROM chaos_pruned GROUP BY 1").fetchall())
    found["pruned_pending_jobs"] = pending[:SAMPLE]
    found["pruned_group_jobs_while_group_pending"] = broken[:SAMPLE]
    found["pruned_attempts_of_kept_jobs"] = orphaned[:SAMPLE]
    if pending:
        violations.append(f"R1: pruning deleted {len(pending)} unfinished jobs: {pending[:5]}")
    if broken:
        violations.append(f"R2: pruning deleted {len(broken)} jobs of groups with pending jobs "
                          f"([job, group, pending]): {broken[:5]}")
    if orphaned:
        violations.append(f"R3: pruning deleted attempts of {len(orphaned)} jobs it kept: "
                          f"{orphaned[:5]}")


# -- flow control (issue 16) ---------------------------------------------------------------------

#: The most runs of each key running at one moment. A run counts from its start to its last
#: mark (``seen``: its end if it completed, else the last moment it was known to run): a run
#: killed or cut off counts for the time it provably ran, and no longer. An end and a start at
#: one instant do not overlap (ends sort first).
FLOW_OVERLAP = """
WITH events AS (
    SELECT tenant AS key, started AS t, 1 AS d, id FROM chaos_flowrun
    UNION ALL SELECT tenant, {end}, -1, id FROM chaos_flowrun),
running AS (
    SELECT key, t, sum(d) OVER (PARTITION BY key ORDER BY t, d, id ROWS UNBOUNDED PRECEDING) AS n
      FROM events)
SELECT key, max(n), min(t) FILTER (WHERE n > %(limit)s), count(*) FILTER (WHERE n > %(limit)s)
  FROM running GROUP BY key ORDER BY key
"""
#: Where a run ends for F1: its last mark, or, for a run that did not finish, the end of its
#: server session if the chaos ended that session first (pg_terminate_backend, a restart:
#: ``chaos_sessionend``, from the server log: the line the session logs just before it exits
#: and its locks go, to the millisecond, plus one). Its slot was free from then on: its child
#: ran on until its supervisor noticed and killed it (a few ms), and its marks with it.
FLOW_RUN_END = """
CASE WHEN finished IS NULL THEN least(seen, coalesce((
    SELECT min(e.at) FROM chaos_sessionend e
     WHERE e.backend = chaos_flowrun.backend AND e.at >= chaos_flowrun.started), seen))
     ELSE seen END"""
#: The runs of ``key`` running at instant ``t`` (to show an over-run).
FLOW_RUNNING_AT = f"""
SELECT job_key, kind, pid, started, seen, finished IS NOT NULL, backend FROM chaos_flowrun
 WHERE tenant = %s AND started <= %s AND {FLOW_RUN_END} > %s ORDER BY started
"""
#: Runs of the paused queue that started after the pause's grace and before the resume.
FLOW_STARTED_WHILE_PAUSED = """
SELECT job_key, pid, started, extract(epoch FROM started - %(paused)s) FROM chaos_flowrun
 WHERE queue = %(queue)s AND started > %(paused)s + make_interval(secs => %(grace)s)
   AND started < %(resumed)s ORDER BY started
"""
FLOW_PAUSE_EDGES = """
SELECT extract(epoch FROM max(started) FILTER (WHERE started >= %(paused)s
                                                 AND started < %(resumed)s) - %(paused)s),
       extract(epoch FROM min(started) FILTER (WHERE started >= %(resumed)s) - %(resumed)s),
       count(*) FILTER (WHERE started >= %(paused)s - interval '5 s' AND started < %(paused)s)
  FROM chaos_flowrun WHERE queue = %(queue)s
"""
#: The most committed stamps of the key's tokens in any window of its length (each stamp
#: opens one: [stamp, stamp + window)).
FLOW_RATE_WINDOWS = """
SELECT coalesce(max(n), 0), count(*) FROM (
    SELECT count(*) OVER (ORDER BY used_at RANGE BETWEEN CURRENT ROW
                          AND make_interval(secs => %(per)s) - interval '1 microsecond' FOLLOWING) n
      FROM chaos_tokenlog WHERE key = %(key)s) w
"""
FLOW_RATE_FULL_WINDOWS = """
SELECT used_at, n FROM (
    SELECT used_at, count(*) OVER (ORDER BY used_at RANGE BETWEEN CURRENT ROW
                          AND make_interval(secs => %(per)s) - interval '1 microsecond' FOLLOWING) n
      FROM chaos_tokenlog WHERE key = %(key)s) w
 WHERE n > %(allowed)s ORDER BY used_at LIMIT 5
"""
#: A committed run of a rated atomic job whose claiming transaction stamped fewer tokens of
#: the key than it committed rated runs: a start the rate did not count.
FLOW_RATED_RUNS_WITHOUT_TOKEN = """
SELECT c.xid, count(*), (SELECT count(*) FROM chaos_tokenlog t
                          WHERE t.xid = c.xid AND t.key = %(key)s)
  FROM chaos_flowcommit c JOIN chaos_flowrun r ON r.id = c.run_id
 WHERE r.rated GROUP BY c.xid
HAVING count(*) > (SELECT count(*) FROM chaos_tokenlog t WHERE t.xid = c.xid AND t.key = %(key)s)
"""
FLOW_RUNS = """
SELECT kind, queue, rated, count(*), count(*) FILTER (WHERE finished IS NULL)
  FROM chaos_flowrun GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""


def check_flow(conn: psycopg.Connection,
               pauses: list[tuple[datetime.datetime, datetime.datetime]],
               violations: list[str], *, concurrency: int = FLOW_CONCURRENCY,
               rate: int = FLOW_RATE, rate_key: str = FLOW_RATE_KEY,
               rate_seconds: float = FLOW_RATE_SECONDS, burst: int = FLOW_RATE_BURST,
               queue: str = FLOW_QUEUE, grace: float = PAUSE_GRACE_SECONDS) -> dict[str, Any]:
    """F1-F3 over ``chaos_flowrun``, ``chaos_flowcommit`` and ``chaos_tokenlog`` (chaos
    migration 0003): appends to ``violations``, returns the figures."""
    found: dict[str, Any] = {"runs": [list(r) for r in conn.execute(FLOW_RUNS)]}
    # F1: never more than ``concurrency`` runs of a key at once.
    overlap = conn.execute(FLOW_OVERLAP.format(end=FLOW_RUN_END),
                           {"limit": concurrency}).fetchall()
    found["runs_ended_with_their_session"] = conn.execute(
        f"SELECT count(*) FROM chaos_flowrun WHERE {FLOW_RUN_END} < seen").fetchone()[0]
    found["max_overlap_by_key"] = {key: n for key, n, _, _ in overlap}
    found["max_overlap"] = max((n for _, n, _, _ in overlap), default=0)
    # The same if every run cut short had run on to its next mark (and a little more): for
    # information (a run may die just before a mark), never a violation.
    slack = f"seen + make_interval(secs => {2 * 0.025 + 0.05})"
    upper = conn.execute(FLOW_OVERLAP.format(
        end=f"CASE WHEN finished IS NULL THEN {slack} ELSE seen END"),
        {"limit": concurrency}).fetchall()
    found["max_overlap_if_cut_runs_ran_to_their_next_mark"] = max(
        (n for _, n, _, _ in upper), default=0)
    over = []
    for key, n, first, moments in overlap:
        if n > concurrency:
            runs = conn.execute(FLOW_RUNNING_AT, [key, first, first]).fetchall()
            over.append({"key": key, "max": n, "first_at": str(first), "moments": moments,
                         "runs_then": [[str(c) for c in r] for r in runs]})
    found["over_runs"] = over[:SAMPLE]
    if over:
        violations.append(f"F1: {len(over)} keys had more than {concurrency} runs at once: "
                          f"{[(o['key'], o['max'], o['first_at']) for o in over[:5]]}")
    # F2: no run of the paused queue starts later than ``grace`` after the pause until resumed.
    found["pauses"] = []
    for paused, resumed in pauses:
        params = {"paused": paused, "resumed": resumed, "queue": queue, "grace": grace}
        late = conn.execute(FLOW_STARTED_WHILE_PAUSED, params).fetchall()
        last, first_after, before = conn.execute(FLOW_PAUSE_EDGES, params).fetchone()
        found["pauses"].append({
            "paused_at": str(paused), "seconds": round((resumed - paused).total_seconds(), 2),
            "starts_in_5_s_before": before,
            "last_start_after_pause_s": None if last is None else round(float(last), 3),
            "first_start_after_resume_s": (None if first_after is None
                                           else round(float(first_after), 3)),
            "started_while_paused": [[k, p, str(t), round(float(s), 3)]
                                     for k, p, t, s in late[:SAMPLE]]})
        if late:
            violations.append(f"F2: {len(late)} runs of paused queue {queue!r} started more "
                              f"than {grace} s after the pause: {late[:3]}")
    # F3: no window of the rate's length holds more than N (+ the burst) committed starts,
    # and every committed rated run's claim stamped a token.
    params = {"key": rate_key, "per": rate_seconds, "allowed": rate + burst}
    most, stamps = conn.execute(FLOW_RATE_WINDOWS, params).fetchone()
    found["rate"] = {"key": rate_key, "rate": rate, "per_s": rate_seconds, "burst": burst,
                     "stamps": stamps, "max_in_a_window": most}
    if most > rate + burst:
        full = conn.execute(FLOW_RATE_FULL_WINDOWS, params).fetchall()
        found["rate"]["windows_over"] = [[str(t), n] for t, n in full]
        violations.append(f"F3: a window of {rate_seconds} s holds {most} starts of "
                          f"{rate_key!r} (rate {rate} + burst {burst}): {full[:3]}")
    untokened = conn.execute(FLOW_RATED_RUNS_WITHOUT_TOKEN, params).fetchall()
    found["rate"]["committed_runs_without_token"] = [list(r) for r in untokened[:SAMPLE]]
    if untokened:
        violations.append(f"F3: {len(untokened)} claims committed more rated runs than "
                          f"tokens stamped: {untokened[:3]}")
    return found
