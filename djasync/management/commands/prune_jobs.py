"""Delete old finished jobs."""

from __future__ import annotations

import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from djasync.models import FINISHED_STATUSES
from djasync.pruning import prune
from djasync.workers import prune_stopped


class Command(BaseCommand):
    help = ("Delete finished jobs (and their attempts) older than --older-than days, in batches, "
            "and the rows of workers stopped as long ago.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", type=float, required=True, metavar="DAYS",
                            help="Delete jobs that finished more than DAYS days ago.")
        parser.add_argument("--status", action="append", dest="statuses",
                            choices=[s.value for s in FINISHED_STATUSES],
                            help="Only these statuses (repeatable; default: all finished).")
        parser.add_argument("--dry-run", action="store_true",
                            help="Count what would be deleted; delete nothing.")

    def handle(self, *args: Any, older_than: float, statuses: list[str] | None, dry_run: bool,
               **options: Any) -> None:
        if older_than < 0:
            raise CommandError("--older-than must not be negative")
        count = prune(datetime.timedelta(days=older_than), statuses or FINISHED_STATUSES,
                      dry_run=dry_run)
        verb = "would delete" if dry_run else "deleted"
        self.stdout.write(f"{verb} {count} jobs finished more than {older_than:g} days ago")
        if not dry_run:
            workers = prune_stopped(datetime.timedelta(days=older_than))
            self.stdout.write(f"deleted {workers} rows of workers stopped more than "
                              f"{older_than:g} days ago")
