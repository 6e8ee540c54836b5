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
POISON = ("chaos.jobs.segv", "chaos.jobs.sigkill", "chaos.jobs.exit1", "chaos.jobs.always_raise")
#: Jobs whose only effect is written in their own transaction: duplicates are bugs.
IN_TRANSACTION = (LEDGER, SLOW)
#: Keep lists in the report short; the counts are exact.
SAMPLE = 20
#: Start of ``djasync.attempts.LATE_NOTE``: a lost attempt counted after its run's session had
#: ended (so the job was claimable, uncounted, meanwhile). Not imported: the checker runs
#: before Django is set up.
LATE_MARK = "[counted late: "


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


DUPLICATES = """
SELECT key, count(*) FROM chaos_ledgerentry WHERE kind = %s GROUP BY key HAVING count(*) > 1
ORDER BY count(*) DESC, key
"""

#: I3: an in-transaction effect whose job did not succeed (or does not exist).
EFFECT_WITHOUT_COMPLETION = """
SELECT l.key, j.id, j.status
  FROM (SELECT DISTINCT key FROM chaos_ledgerentry WHERE kind = 'txn') l
  LEFT JOIN djasync_job j ON j.args->>0 = l.key
 WHERE j.id IS NULL OR j.status <> 'succeeded'
 ORDER BY l.key
"""

#: I3: a succeeded job without its effect (kind 'txn' for in-transaction jobs, 'external' for
#: the control, whose row is committed before its job's).
COMPLETION_WITHOUT_EFFECT = """
SELECT j.id, j.name, j.args->>0
  FROM djasync_job j
 WHERE j.status = 'succeeded' AND j.name = ANY(%(names)s)
   AND NOT EXISTS (SELECT 1 FROM chaos_ledgerentry l
                    WHERE l.key = j.args->>0 AND l.kind = %(kind)s)
 ORDER BY j.id
"""

#: Two succeeded attempts of one job would be a double completion.
DOUBLE_SUCCESS = """
SELECT job_id, count(*) FROM djasync_attempt WHERE outcome = 'succeeded'
 GROUP BY job_id HAVING count(*) > 1
"""

JOBS = """
SELECT j.id, j.name, j.args->>0, j.status, j.meta, j.attempts,
       count(a.id), coalesce(array_agg(a.outcome ORDER BY a.id) FILTER (WHERE a.id IS NOT NULL),
                             '{}'),
       count(a.id) FILTER (WHERE strpos(a.exception_message, %s) > 0)
  FROM djasync_job j LEFT JOIN djasync_attempt a ON a.job_id = j.id
 GROUP BY j.id
"""

#: Attempts of non-poison jobs that did not succeed: each must have a cause in the chaos.
INNOCENT_FAILED_ATTEMPTS = """
SELECT j.id, j.args->>0, a.outcome, a.exception_type, a.exception_message, a.worker
  FROM djasync_attempt a JOIN djasync_job j ON j.id = a.job_id
 WHERE a.outcome <> 'succeeded' AND NOT (j.name = ANY(%s))
 ORDER BY a.id
"""

ATTEMPT_OUTCOMES = "SELECT outcome, count(*) FROM djasync_attempt GROUP BY outcome"

#: Lost attempts counted late (LATE_MARK): each needs a session ended by the chaos meanwhile.
LATE_ATTEMPTS = """
SELECT a.id, j.args->>0, a.outcome, a.started_at, a.finished_at, a.worker
  FROM djasync_attempt a JOIN djasync_job j ON j.id = a.job_id
 WHERE strpos(a.exception_message, %s) > 0
 ORDER BY a.id
"""
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
    rows = conn.execute(JOBS, [LATE_MARK]).fetchall()
    jobs: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    twice: list[str] = []
    for job_id, name, key, status, meta, attempts_field, attempt_rows, outcomes, late in rows:
        if key in jobs:
            twice.append(key)
        jobs[key] = {"id": job_id, "name": name, "status": status, "meta": meta or {},
                     "attempts": attempts_field, "attempt_rows": attempt_rows,
                     "outcomes": list(outcomes), "late": late}
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
    missing = sorted(k for k in expected.committed if k not in jobs)
    not_finished = sorted(k for k, j in jobs.items() if j["status"] not in ("succeeded", "failed"))
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
    for job_id, key, outcome, exc_type, message, worker in conn.execute(
            INNOCENT_FAILED_ATTEMPTS, [list(POISON)]):
        pid = _pid_of(worker)
        if outcome == "crashed":
            cause = "crashed: child killed by chaos" if pid in expected.killed_children else (
                "crashed: stopped child" if pid in expected.stopped_children else None)
        elif outcome == "timed_out" and "due to user request" in message:
            cause = "timed_out: pg_cancel_backend"
        elif outcome == "timed_out":
            cause = "timed_out: stopped child killed by its supervisor" if (
                pid in expected.stopped_children) else None
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

    found["attempts"] = dict(conn.execute(ATTEMPT_OUTCOMES).fetchall())
    found["violations"] = violations
    return found
