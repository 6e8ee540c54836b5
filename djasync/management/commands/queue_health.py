"""Show what is waiting, running and failing."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from djasync.health import health


class Command(BaseCommand):
    help = ("Show what the queue holds: counts per status, queue and function, age, errors, "
            "slow jobs, and an estimate of the time to run the due jobs.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON document.")

    def handle(self, *args: Any, json: bool = False, **options: Any) -> None:
        report = health()
        if json:
            self.stdout.write(_dumps(report))
            return
        jobs = report["jobs"]
        self.stdout.write(
            f"jobs: {jobs['pending']} pending ({report['due']} due, {report['running']} running, "
            f"{report['scheduled']} scheduled), {jobs['succeeded']} succeeded, "
            f"{jobs['failed']} failed, {jobs['cancelled']} cancelled"
        )
        age = report["oldest_due_age_seconds"]
        self.stdout.write(f"oldest due job waiting: {'-' if age is None else f'{age:.1f} s'}")
        for queue, counts in sorted(report["queues"].items()):
            summary = ", ".join(f"{k} {v}" for k, v in counts.items())
            self.stdout.write(f"  queue {queue}: {summary}")
        for function, counts in report["functions"].items():
            summary = ", ".join(f"{k} {v}" for k, v in counts.items())
            self.stdout.write(f"  function {function}: {summary}")
        if report["paused_queues"]:
            self.stdout.write(f"paused queues: {', '.join(report['paused_queues'])}")
        for limit in report["limits"]:
            parts = [f"running {limit['running']}"
                     + (f"/{limit['concurrency']}" if limit["concurrency"] else ""),
                     f"waiting {limit['waiting']}"]
            if limit["rate"]:
                parts.append(f"rate used {limit['rate_used']} of {limit['rate']}")
            self.stdout.write(f"  limit {limit['key']}: {', '.join(parts)}")
        last = report["last_hour"]
        self.stdout.write(
            f"last hour: {last['succeeded']} succeeded, {last['errors']} errors, "
            f"{last['crashed']} crashed, {last['timed_out']} timed out"
        )
        for item in last["failing_names"]:
            self.stdout.write(f"  failing: {item['name']} ({item['errors']})")
        for item in report["slowest_names"]:
            self.stdout.write(f"  slowest: {item['name']} avg {item['avg_seconds']} s "
                              f"max {item['max_seconds']} s over {item['runs']} runs")
        estimate = report["estimate"]
        eta = estimate["drain_seconds"]
        self.stdout.write(
            "estimated time to run the due jobs: "
            + ("- (no job succeeded in the last day)" if eta is None else
               f"{eta:.1f} s ({estimate['work_seconds']:.1f} s of run time, from the last "
               f"day's run times, over {max(estimate['worker_processes'], 1)} processes)"))
        alive = [w for w in report["workers"] if w["alive"]]
        self.stdout.write(f"workers alive: {len(alive)}")
        for w in report["workers"]:
            state = "alive" if w["alive"] else "stopped"
            self.stdout.write(
                f"  {w['name']} {state} concurrency {w['concurrency']} queues "
                f"{','.join(w['queues'])} last seen {w['last_seen']} running {w['running']} "
                f"jobs done {w['jobs_done']}"
            )


def _dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
