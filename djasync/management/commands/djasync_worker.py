"""``python manage.py djasync_worker``: the ``djasync-worker`` daemon, started through manage.py.

The options are ``djasync-worker``'s own: this command hands its arguments to that click command
unchanged, so both spellings parse, check and document options in one place. It is the one spot
where the ``djasync`` app reaches into the ``djasync_worker`` package (both ship in the same
distribution); the import waits until the command runs.
"""

from __future__ import annotations

import os
from typing import Any

import click
from django.core.management.base import BaseCommand, CommandError


def _worker_command() -> click.Command:
    from djasync_worker.cli import cli

    return cli


class Command(BaseCommand):
    help = "Run djasync jobs: a supervisor and --concurrency child processes (djasync-worker)."

    def run_from_argv(self, argv: list[str]) -> None:
        """Parse ``argv[2:]`` with ``djasync-worker``'s click options and run it; exit with its
        code. manage.py has set up Django already (with ``--settings``/``--pythonpath`` if given,
        which click reads again, to the same effect)."""
        prog_name = f"{os.path.basename(argv[0])} {argv[1]}"
        _worker_command().main(args=argv[2:], prog_name=prog_name)

    def print_help(self, prog_name: str, subcommand: str) -> None:
        """``manage.py help djasync_worker``: click's help, the same as ``--help``."""
        command = _worker_command()
        with click.Context(command, info_name=f"{prog_name} {subcommand}",
                           **command.context_settings) as context:
            click.echo(command.get_help(context))

    def handle(self, *args: Any, **options: Any) -> None:
        # Only call_command() gets here: run_from_argv above never calls handle().
        raise CommandError(
            "djasync_worker runs from the command line (python manage.py djasync_worker ... or "
            "djasync-worker ...); it is not meant for call_command()"
        )
