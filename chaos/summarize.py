"""Print a Markdown table of chaos reports: ``python chaos/summarize.py chaos/reports/*.json``.

Used to write chaos/REPORT.md; every figure comes from the JSON reports as chaos/run.py wrote
them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _faults(report: dict[str, Any]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(report["faults"].items()))


def _restarts(report: dict[str, Any]) -> str:
    return ", ".join(
        f"{r['mode']}{' sync-off' if r['synchronous_commit_off'] else ''} "
        f"{r['accept_to_first_commit_seconds']}" for r in report["restarts"])


def row(report: dict[str, Any]) -> dict[str, str]:
    checks, jobs = report["checks"], report["jobs"]
    poison = checks["poison"]
    pairs = [p for per in poison["rows_and_late_by_function"].values() for p in per]
    attempts = checks["attempts"]
    return {
        "seed": str(report["seed"]),
        "result": "pass" if report["ok"] else "FAIL: " + "; ".join(report["violations"])[:200],
        "code": report["code"],
        "wall s": str(report["wall_seconds"]),
        "jobs scheduled / committed / rolled back":
            f"{jobs['scheduled']} / {jobs['committed']} / {jobs['rolled_back']}",
        "attempts (all / by outcome)":
            f"{sum(attempts.values())} / " + ", ".join(f"{k} {v}"
                                                        for k, v in sorted(attempts.items())),
        "faults survived": _faults(report),
        "duplicates": str(checks["duplicates"]),
        "losses": str(checks["losses"]),
        "effect w/o completion / completion w/o effect":
            f"{checks['effect_without_completion']} / {checks['completion_without_effect']}",
        "rolled-back jobs leaked": str(checks["rolled_back_leaked"]),
        "poison quarantined": f"{poison['quarantined']} of {poison['jobs']}",
        "poison attempt rows (max 3)": f"{min(p[0] for p in pairs)}-{max(p[0] for p in pairs)}",
        "poison over max_attempts / counted late":
            f"{poison['over_max_attempts']} / {sum(p[1] for p in pairs)}",
        "late-counted attempts (all jobs; unexplained)":
            f"{checks['late_counted_attempts']} ({len(checks['unexplained_late_counts'])})",
        "false quarantines": str(checks["false_quarantines"]),
        "restart: s from accepting connections to first commit": _restarts(report),
        "SIGTERM drain s (slow jobs running)":
            f"{report['sigterm']['drain_seconds']} ({report['sigterm']['slow_jobs_running']})",
        "double SIGTERM exit / s": f"{report['double_sigterm']['exit_code']} / "
                                   f"{report['double_sigterm']['seconds']}",
        "throughput jobs/s: no faults / under chaos (chaos s)":
            f"{report['throughput']['no_chaos_jobs_per_s']} / "
            f"{report['throughput']['chaos_jobs_per_s']} "
            f"({report['throughput']['chaos_seconds']})",
        "drain after last fault s (limit)":
            f"{report['drain_seconds_after_last_fault']} ({report['drain_limit_seconds']})",
        "negative-control duplicates": str(checks["control_duplicates"]),
        "daemon exits (unexpected)":
            f"{report['daemon_exits']['total']} ({len(report['daemon_exits']['unexpected'])})",
    }


def table(reports: list[dict[str, Any]]) -> str:
    rows = [row(r) for r in reports]
    lines = ["| figure | " + " | ".join(f"seed {r['seed']}" for r in rows) + " |",
             "| --- |" + " --- |" * len(rows)]
    for key in rows[0]:
        if key == "seed":
            continue
        lines.append(f"| {key} | " + " | ".join(r[key] for r in rows) + " |")
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
