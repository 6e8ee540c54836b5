"""Stop every worker claiming jobs of a queue (running jobs finish), until resume_queue."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from djasync.limits import pause_queue


class Command(BaseCommand):
    help = ("Pause a queue: no worker claims its jobs from within a second until it is "
            "resumed (running jobs finish). Survives restarts.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("queue", help="The queue to pause.")

    def handle(self, *args: Any, queue: str, **options: Any) -> None:
        try:
            changed = pause_queue(queue)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"queue {queue} {'paused' if changed else 'was paused already'}")
