"""Let workers claim jobs of a paused queue again."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from djasync.limits import resume_queue


class Command(BaseCommand):
    help = "Resume a paused queue: workers claim its jobs again at once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("queue", help="The queue to resume.")

    def handle(self, *args: Any, queue: str, **options: Any) -> None:
        try:
            changed = resume_queue(queue)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"queue {queue} {'resumed' if changed else 'was not paused'}")
