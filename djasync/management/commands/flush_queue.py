"""Run the due jobs once, in this process, and exit."""

from __future__ import annotations

import sys
import traceback
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from djasync.executor import Finished, drain
from djasync.models import Job, Outcome, Status
from djasync.validation import check_queue_name
from djasync.workers import InProcessWatch


def _queue(value: str) -> str:
    try:
        return check_queue_name(value)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


class Command(BaseCommand):
    help = "Run the due jobs once, in this process, one transaction per job, then exit."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                            help="Stop after N jobs (default: until no due job is left).")
        parser.add_argument("-q", "--queue", action="append", dest="queues", metavar="QUEUE",
                            help="Only run jobs of this queue (repeatable; default: all).")
        parser.add_argument("-f", "--filter", dest="name_prefix", metavar="PREFIX",
                            help="Only run jobs whose function name starts with PREFIX.")
        parser.add_argument("--fail-fast", action="store_true",
                            help="Stop at the first failed attempt, even one that will be "
                                 "retried, and exit with an error that reports it.")

    def handle(self, *args: Any, jobs: int | None, queues: list[str] | None,
               name_prefix: str | None, fail_fast: bool, **options: Any) -> None:
        if jobs is not None and jobs < 1:
            raise CommandError("--jobs must be at least 1")
        queues = [_queue(q) for q in queues] if queues else None
        tty = self.stdout.isatty()
        total = Job.objects.due().count() if tty else 0
        counts = {"ok": 0, "retry": 0, "failed": 0}

        def report(finished: Finished) -> None:
            ok = finished.outcome == Outcome.SUCCEEDED
            counts["ok" if ok else "failed" if finished.status == Status.FAILED else "retry"] += 1
            what = "ok" if ok else f"{finished.outcome.label} ({finished.status}): {finished.error}"
            line = (f"{finished.job_id}: {finished.name} attempt {finished.attempt} "
                    f"{what} [{finished.duration * 1000:.1f} ms]")
            if tty:
                done = sum(counts.values())
                self.stdout.write(f"\r\x1b[K{line}\n{_bar(done, max(total, done))}", ending="")
            else:
                self.stdout.write(line)
            self.stdout.flush()

        def ended(finished: Finished) -> None:
            watch.finished(1)  # the job's transaction has ended: not running any more
            report(finished)

        try:
            # A job that kills this process is charged a crash by the next flush_queue (or
            # daemon) instead of blocking every later run (see InProcessWatch).
            with InProcessWatch(queues) as watch:
                finished = drain(max_jobs=jobs, queues=queues, name_prefix=name_prefix,
                                 worker=watch.name, stop_on_failure=fail_fast,
                                 on_finished=ended, before_each=lambda job: watch.running(job.id))
        except KeyboardInterrupt:
            self.stderr.write("\ninterrupted: the running job was rolled back and stays queued")
            sys.exit(130)
        if tty:
            self.stdout.write("\r\x1b[K", ending="")
        if not finished:
            self.stdout.write("No jobs to execute")
            return
        self.stdout.write(
            f"{len(finished)} attempts: {counts['ok']} succeeded, {counts['retry']} failed and "
            f"will be retried, {counts['failed']} failed for good"
        )
        if fail_fast:
            failed = next((f for f in finished if f.outcome != Outcome.SUCCEEDED), None)
            if failed is not None:
                # As django-async's flush_queue did: the run stops, and fails, at the first
                # failed attempt, whether or not a retry is scheduled.
                if failed.exception is not None:
                    self.stderr.write("".join(traceback.format_exception(failed.exception)))
                retry = " (a retry is scheduled)" if failed.status == Status.PENDING else ""
                raise CommandError(f"job {failed.job_id} ({failed.name}) attempt "
                                   f"{failed.attempt} failed{retry}: {failed.error}")
        if counts["failed"]:
            raise CommandError(f"{counts['failed']} jobs failed for good (attempts used up)")


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
