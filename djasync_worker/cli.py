"""``djasync-worker``: parse and check options, set up Django, start the supervisor.

Every check runs before a process is forked, so bad input fails at once with a message that
names the option at fault.
"""

from __future__ import annotations

import math
import os
import platform
import signal
import sys
from typing import Any

import click

#: Each job of a batch is a subtransaction; past 64 in one transaction PostgreSQL's
#: subtransaction cache overflows and every session's snapshots get slower.
MAX_BATCH_SIZE = 50


def _queues(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from djasync.validation import check_queue_name

    # Commas separate names on the command line; the environment variable's value is split on
    # whitespace by click before it gets here. A space inside one -q value is a mistake (a
    # queue name cannot hold one), not a second queue.
    names: list[str] = []
    for item in value:
        for name in (part.strip() for part in item.split(",")):
            if not name:
                continue
            if any(character.isspace() for character in name):
                raise click.BadParameter(
                    f"queue name {name!r} contains a space; a queue name cannot (several "
                    "queues: repeat --queue, or separate them with commas)"
                )
            try:
                names.append(check_queue_name(name))
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from None
    return tuple(dict.fromkeys(names))


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    import django
    import psycopg

    import djasync

    click.echo(f"djasync {djasync.__version__} (Django {django.get_version()}, "
               f"psycopg {psycopg.__version__}, Python {platform.python_version()})")
    ctx.exit()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Print the versions of djasync, Django, psycopg "
                                              "and Python, and exit.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=os.cpu_count() or 1,
              envvar="DJASYNC_WORKER_CONCURRENCY", show_envvar=True,
              help="Child processes running jobs in parallel.")
@click.option("-q", "--queue", "queues", multiple=True, callback=_queues,
              envvar="DJASYNC_WORKER_QUEUES", show_envvar=True,
              help="Queue to serve (repeatable, or comma-separated); default: all queues.")
@click.option("--burst", is_flag=True, envvar="DJASYNC_WORKER_BURST", show_envvar=True,
              help="Exit 0 once no due job is left, instead of waiting for more.")
@click.option("--max-jobs-per-child", type=click.IntRange(min=1), default=None,
              envvar="DJASYNC_WORKER_MAX_JOBS_PER_CHILD", show_envvar=True,
              help="Replace a child after it ran this many jobs (bounds memory growth).")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0,
              callback=_finite,
              envvar="DJASYNC_WORKER_SHUTDOWN_TIMEOUT", show_envvar=True,
              help="Seconds running jobs get to finish after SIGTERM; then they are killed "
                   "and roll back.")
@click.option("--poll-interval", type=click.FloatRange(min=0.05), default=5.0,
              callback=_finite,
              envvar="DJASYNC_WORKER_POLL_INTERVAL", show_envvar=True,
              help="Seconds between polls when no notification arrives (fallback).")
@click.option("--batch-size", type=click.IntRange(min=1, max=MAX_BATCH_SIZE), default=1,
              envvar="DJASYNC_WORKER_BATCH_SIZE", show_envvar=True,
              help="Jobs a child claims per transaction, each in its own savepoint.")
@click.option("--settings", envvar="DJANGO_SETTINGS_MODULE", show_envvar=True,
              help="Django settings module, e.g. mysite.settings.")
@click.option("--pythonpath", type=click.Path(exists=True, file_okay=False, resolve_path=True),
              multiple=True, envvar="DJASYNC_WORKER_PYTHONPATH", show_envvar=True,
              help="Directory to add to the import path (repeatable).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"],
                                               case_sensitive=False),
              default="info", envvar="DJASYNC_WORKER_LOG_LEVEL", show_envvar=True,
              help="Level of the djasync, djasync_worker and django.tasks loggers.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              envvar="DJASYNC_WORKER_LOG_FORMAT", show_envvar=True,
              help="One line per event: plain text, or a JSON object.")
@click.option("--metrics-port", type=click.IntRange(min=1, max=65535), default=None,
              envvar="DJASYNC_WORKER_METRICS_PORT", show_envvar=True,
              help="Serve Prometheus metrics on this port at /metrics (needs "
                   "djasync[metrics]); off by default.")
@click.option("--metrics-host", default="127.0.0.1",
              envvar="DJASYNC_WORKER_METRICS_HOST", show_envvar=True,
              help="Address the metrics endpoint listens on (0.0.0.0: every interface).")
def cli(concurrency: int, queues: tuple[str, ...], burst: bool, max_jobs_per_child: int | None,
        shutdown_timeout: float, poll_interval: float, batch_size: int, settings: str | None,
        pythonpath: tuple[str, ...], log_level: str, log_format: str, metrics_port: int | None,
        metrics_host: str) -> None:
    """Run djasync jobs: a supervisor and --concurrency child processes.

    SIGTERM or SIGINT stops claiming and lets running jobs finish (up to --shutdown-timeout);
    a second signal stops at once. Either way nothing is half done: a job that does not
    finish rolls back and runs again later.
    """
    from djasync_worker import logs

    # Until the supervisor installs its handlers, a stop request simply ends start-up.
    signal.signal(signal.SIGTERM, _exit_during_startup)
    metrics = _start_metrics(metrics_host, metrics_port) if metrics_port else None
    logs.configure(log_level, log_format)
    origin = _settings_origin(settings)
    _setup_django(settings, pythonpath)
    logs.configure(log_level, log_format)  # again: Django's LOGGING setting may have changed them
    # The start-up check connects with the worker's options too (connect_timeout, keepalives):
    # started while cut off from the database, it gives up in seconds instead of waiting on
    # TCP's SYN back-off for minutes (and connecting seconds after the network returns).
    from djasync.connections import configure_worker_connections

    configure_worker_connections()
    _check_database(origin)

    from djasync_worker.supervisor import Options, Supervisor

    options = Options(concurrency=concurrency, queues=queues, burst=burst,
                      max_jobs_per_child=max_jobs_per_child, shutdown_timeout=shutdown_timeout,
                      poll_interval=poll_interval, batch_size=batch_size)
    from django.db import DatabaseError

    try:
        code = Supervisor(options, metrics=metrics).run()
    except DatabaseError as exc:  # the database went away between the check and the start
        raise click.ClickException(f"lost the database while starting: {exc}") from None
    sys.exit(code)


def _start_metrics(host: str, port: int) -> Any:
    """Bind the metrics port before Django is set up (see ``metrics.start``); undo at exit."""
    from djasync_worker import metrics

    try:
        exporter = metrics.start(host, port)
    except metrics.MetricsError as exc:
        raise click.ClickException(str(exc)) from None
    click.get_current_context().call_on_close(exporter.close)
    return exporter


def _exit_during_startup(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _settings_origin(settings: str | None) -> str:
    """Say where the settings module came from, for error messages: "mysite.settings (from
    DJANGO_SETTINGS_MODULE)" tells a user which file to open."""
    source = click.get_current_context().get_parameter_source("settings")
    how = "DJANGO_SETTINGS_MODULE" if source is click.core.ParameterSource.ENVIRONMENT else (
        "--settings")
    return f"{settings} (from {how})"


def _setup_django(settings: str | None, pythonpath: tuple[str, ...]) -> None:
    # The current directory comes first after --pythonpath, as for `python manage.py` and
    # `celery -A`: run from the project directory, `--settings mysite.settings` just works. A
    # console script's sys.path[0] is its own bin/ directory, not the current one.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for path in reversed(pythonpath):
        sys.path.insert(0, path)
    if not settings:
        raise click.UsageError(
            "no Django settings: pass --settings mysite.settings or set DJANGO_SETTINGS_MODULE"
        )
    os.environ["DJANGO_SETTINGS_MODULE"] = settings
    import django
    from django.core.exceptions import ImproperlyConfigured

    try:
        django.setup()
    except ModuleNotFoundError as exc:
        if exc.name and not settings.startswith(exc.name):
            raise click.ClickException(
                f"Django settings {settings!r} import {exc.name!r}, which is not installed: {exc}"
            ) from None
        raise click.BadParameter(
            f"cannot import {settings!r} from the current directory ({cwd}) or the import path: "
            f"{exc}. Run from your project's directory (where manage.py is), or name it with "
            "--pythonpath.",
            param_hint="--settings",
        ) from None
    except ImproperlyConfigured as exc:
        raise click.ClickException(f"Django settings {settings!r} are not usable: {exc}") from None
    except Exception as exc:
        raise click.ClickException(
            f"loading Django settings {settings!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    from django.apps import apps

    if not apps.is_installed("djasync"):
        raise click.ClickException(f"'djasync' is not in INSTALLED_APPS of {settings}")
    from djasync import conf
    from djasync.exceptions import ImproperlyConfigured as DjasyncConfigError

    try:
        conf.get()
    except DjasyncConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _check_database(origin: str) -> None:
    from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

    connection = connections[DEFAULT_DB_ALIAS]
    source = f"DATABASES[{DEFAULT_DB_ALIAS!r}] of {origin}"
    if connection.vendor != "postgresql":
        raise click.ClickException(f"djasync needs PostgreSQL; {source} uses {connection.vendor}")
    where = _describe(connection.settings_dict)
    try:
        connection.ensure_connection()
        tables = connection.introspection.table_names()
    except DatabaseError as exc:
        message = str(exc).strip()
        raise click.ClickException(
            f"cannot connect to PostgreSQL at {where}: {_what_failed(message)}\n"
            f"  settings: {source}\n  PostgreSQL said: {message}"
        ) from None
    finally:
        connection.close()
    if "djasync_job" not in tables:
        raise click.ClickException(
            f"the djasync tables are missing in {where} ({source}): run "
            "`python manage.py migrate` first"
        )


#: Fragments of libpq's and the server's connection errors (they carry no SQLSTATE, so the text
#: is all there is), and what each means for the user. First match wins.
CONNECTION_FAILURES: tuple[tuple[tuple[str, ...], str], ...] = (
    # "authentication failed" also covers ident, peer, SCRAM and certificate failures.
    (("authentication failed", "no password supplied", "no pg_hba.conf entry", "role \""),
     "authentication failed: check USER and PASSWORD (and the server's pg_hba.conf)"),
    (("does not exist",),
     "the database does not exist on that server: create it, or correct NAME"),
    (("connection refused", "timeout expired", "could not translate host name",
      "failed to resolve host", "no route to host", "network is unreachable",
      "no such file or directory", "could not connect", "server closed the connection"),
     "the server is unreachable: is PostgreSQL running there, and are HOST and PORT right?"),
)


def _what_failed(message: str) -> str:
    lowered = message.lower()
    for fragments, meaning in CONNECTION_FAILURES:
        if any(fragment in lowered for fragment in fragments):
            return meaning
    return "the connection failed"


def _describe(settings_dict: dict[str, Any]) -> str:
    host = settings_dict.get("HOST") or "local socket"
    port = settings_dict.get("PORT") or 5432
    return f"{host}:{port} database {settings_dict.get('NAME')!r} as user " \
           f"{settings_dict.get('USER') or '(default)'!r}"


def main() -> None:
    cli(prog_name="djasync-worker")
