"""``djasync-worker`` options and start-up errors: each fails at once, naming what to fix."""

import datetime
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import djasync
from djasync.models import Job, Status, Worker
from djasync_worker import cli as worker_cli
from tests import jobs
from tests.daemon import ROOT, database_url, worker_env

#: Start-up errors must come well within this (the bad database is refused, not retried).
STARTUP_TIMEOUT_SECONDS = 30

OPTION_ENV_VARS = {
    "--concurrency": "DJASYNC_WORKER_CONCURRENCY",
    "--queue": "DJASYNC_WORKER_QUEUES",
    "--burst": "DJASYNC_WORKER_BURST",
    "--max-jobs-per-child": "DJASYNC_WORKER_MAX_JOBS_PER_CHILD",
    "--shutdown-timeout": "DJASYNC_WORKER_SHUTDOWN_TIMEOUT",
    "--poll-interval": "DJASYNC_WORKER_POLL_INTERVAL",
    "--batch-size": "DJASYNC_WORKER_BATCH_SIZE",
    "--settings": "DJANGO_SETTINGS_MODULE",
    "--pythonpath": "DJASYNC_WORKER_PYTHONPATH",
    "--log-level": "DJASYNC_WORKER_LOG_LEVEL",
    "--log-format": "DJASYNC_WORKER_LOG_FORMAT",
    "--metrics-port": "DJASYNC_WORKER_METRICS_PORT",
    "--metrics-host": "DJASYNC_WORKER_METRICS_HOST",
}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(worker_cli.cli, list(args), env=env, prog_name="djasync-worker")


def assert_usage_error(result: Result, option: str, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert f"'{option}'" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.output


def bad(args: list[str], option: str, fragment: str, *marks: pytest.MarkDecorator):
    return pytest.param(args, option, fragment, marks=marks, id=" ".join(args)[:40])


@pytest.mark.parametrize("args, option, fragment", [
    bad(["--concurrency", "0"], "--concurrency", "0 is not in the range x>=1"),
    bad(["-c", "-3"], "--concurrency", "x>=1"),
    bad(["--concurrency", "two"], "--concurrency", "'two' is not a valid integer"),
    bad(["--queue", "a,b!"], "--queue", "queue name 'b!' is invalid"),
    bad(["--queue", "my queue"], "--queue", "queue name 'my queue' contains a space"),
    bad(["-q", "mail, my queue"], "--queue", "'my queue' contains a space"),
    bad(["-q", "ok", "-q", "-bad"], "--queue", "queue name '-bad' is invalid"),
    bad(["--queue", "x" * 101], "--queue", "1-100 characters"),
    bad(["--log-level", "loud"], "--log-level", "'loud' is not one of 'debug', 'info'"),
    bad(["--log-format", "xml"], "--log-format", "'xml' is not one of 'text', 'json'"),
    bad(["--batch-size", "0"], "--batch-size", "is not in the range 1<=x<="),
    bad(["--batch-size", "100000"], "--batch-size", "is not in the range 1<=x<="),
    bad(["--poll-interval", "0"], "--poll-interval", "x>=0.05"),
    bad(["--poll-interval", "nan"], "--poll-interval", ""),
    bad(["--shutdown-timeout", "-1"], "--shutdown-timeout", "x>=0"),
    bad(["--shutdown-timeout", "nan"], "--shutdown-timeout", ""),
    bad(["--max-jobs-per-child", "0"], "--max-jobs-per-child", "x>=1"),
    bad(["--pythonpath", "/no/such/directory"], "--pythonpath", "does not exist"),
])
def test_a_bad_option_is_refused_before_django_is_touched_naming_the_option(
        options_only, args, option, fragment):
    assert_usage_error(invoke(*args), option, fragment)


@pytest.mark.parametrize("env_var, value, option", [
    ("DJASYNC_WORKER_CONCURRENCY", "0", "--concurrency"),
    ("DJASYNC_WORKER_QUEUES", "a b!", "--queue"),
    ("DJASYNC_WORKER_LOG_LEVEL", "loud", "--log-level"),
    ("DJASYNC_WORKER_LOG_FORMAT", "xml", "--log-format"),
    ("DJASYNC_WORKER_BATCH_SIZE", "0", "--batch-size"),
    ("DJASYNC_WORKER_POLL_INTERVAL", "0", "--poll-interval"),
    ("DJASYNC_WORKER_BURST", "maybe", "--burst"),
])
def test_a_bad_environment_variable_is_refused_like_the_option_it_sets(
        options_only, env_var, value, option):
    result = invoke(env={env_var: value})
    assert_usage_error(result, option, env_var)


def test_an_option_on_the_command_line_beats_its_environment_variable(options_only,
                                                                         monkeypatch):
    result = invoke("--concurrency", "0", env={"DJASYNC_WORKER_CONCURRENCY": "4"})
    assert_usage_error(result, "--concurrency", "0 is not in the range")
    monkeypatch.setenv("DJASYNC_WORKER_CONCURRENCY", "4")
    context = worker_cli.cli.make_context("djasync-worker", ["-c", "3"])
    assert context.params["concurrency"] == 3


def test_queues_may_be_repeated_or_comma_separated_and_are_deduplicated(options_only,
                                                                          monkeypatch):
    context = worker_cli.cli.make_context(
        "djasync-worker", ["-q", "mail,reports", "--queue", "reports", "-q", "low"])
    assert context.params["queues"] == ("mail", "reports", "low")
    monkeypatch.setenv("DJASYNC_WORKER_QUEUES", "a b,c")
    monkeypatch.setenv("DJASYNC_WORKER_CONCURRENCY", "7")
    context = worker_cli.cli.make_context("djasync-worker", [])
    assert (context.params["queues"], context.params["concurrency"]) == (("a", "b", "c"), 7)


def test_spaces_around_commas_are_allowed_and_the_environment_splits_on_whitespace(
        options_only, monkeypatch):
    context = worker_cli.cli.make_context("djasync-worker", ["-q", "mail, sms ,"])
    assert context.params["queues"] == ("mail", "sms")
    monkeypatch.setenv("DJASYNC_WORKER_QUEUES", "mail sms")
    assert worker_cli.cli.make_context("djasync-worker", []).params["queues"] == ("mail", "sms")


def test_version_prints_djasync_django_and_python_versions_and_starts_nothing(options_only):
    import django

    for flag in ("--version", "-V"):
        result = invoke(flag, "--concurrency", "0")  # eager: a bad option after it is not read
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"djasync {djasync.__version__} (Django "), result.output
        assert django.get_version() in result.output


def test_the_log_level_is_case_insensitive(options_only):
    context = worker_cli.cli.make_context("djasync-worker", ["--log-level", "WARNING"])
    assert context.params["log_level"] == "warning"


def test_help_lists_every_option_with_its_environment_variable(options_only):
    result = CliRunner().invoke(worker_cli.cli, ["--help"], prog_name="djasync-worker",
                                terminal_width=400, max_content_width=400)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.startswith("Usage: djasync-worker [OPTIONS]")
    options_text = text.split(" Options: ", 1)[1]
    documented = {option for param in worker_cli.cli.params for option in param.opts
                  if option.startswith("--") and option not in ("--help", "--version")}
    assert documented == set(OPTION_ENV_VARS)  # a new option must be added to this test
    for option, env_var in OPTION_ENV_VARS.items():
        assert f"{option} " in options_text, f"{option} is not in --help"
        after_option = options_text.split(f"{option} ", 1)[1]
        assert after_option.split("env var: ", 1)[1].startswith(env_var), option
    short = CliRunner().invoke(worker_cli.cli, ["-h"], prog_name="djasync-worker",
                               terminal_width=400, max_content_width=400)
    assert short.output == result.output


# -- start-up errors, in a fresh process -------------------------------------------------------


def run_cli(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m djasync_worker`` with these arguments; return it and its run time."""
    env = {k: v for k, v in env.items() if not k.startswith("DJASYNC_WORKER_")}
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-m", "djasync_worker", *args], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=STARTUP_TIMEOUT_SECONDS)
    return completed, time.monotonic() - started


def assert_refused(completed: subprocess.CompletedProcess, *fragments: str) -> None:
    assert completed.returncode not in (0, None), completed
    for fragment in fragments:
        assert fragment in completed.stderr, completed.stderr
    assert "Traceback" not in completed.stderr, completed.stderr


def settings_module(directory: Path, name: str, body: str) -> str:
    (directory / f"{name}.py").write_text(body)
    return name


@pytest.mark.daemon
def test_no_settings_at_all_is_refused_with_both_ways_to_give_them():
    env = worker_env()
    env.pop("DJANGO_SETTINGS_MODULE", None)
    completed, _ = run_cli("--concurrency", "1", env=env)
    assert completed.returncode == 2
    assert_refused(completed, "--settings", "DJANGO_SETTINGS_MODULE")


@pytest.mark.daemon
def test_a_settings_module_that_does_not_exist_is_refused_naming_settings():
    completed, _ = run_cli("--settings", "no_such_settings_xyz", env=worker_env())
    assert completed.returncode == 2
    assert_refused(completed, "--settings", "no_such_settings_xyz", "--pythonpath")


@pytest.mark.daemon
def test_a_settings_module_named_by_the_environment_that_does_not_exist_is_refused():
    completed, _ = run_cli(env=worker_env(DJANGO_SETTINGS_MODULE="no_such_settings_xyz"))
    assert_refused(completed, "--settings", "no_such_settings_xyz")


@pytest.mark.daemon
def test_a_settings_module_that_raises_on_import_is_refused_with_its_error(tmp_path):
    name = settings_module(tmp_path, "exploding_settings",
                           'raise RuntimeError("settings exploded")\n')
    completed, _ = run_cli("--settings", name, "--pythonpath", str(tmp_path), env=worker_env())
    assert_refused(completed, name, "RuntimeError: settings exploded")


@pytest.mark.daemon
def test_test_settings_without_database_url_are_refused_with_their_own_message():
    env = worker_env()
    del env["DATABASE_URL"]
    completed, _ = run_cli("--settings", "tests.settings", env=env)
    assert_refused(completed, "tests.settings", "DATABASE_URL is not set")


@pytest.mark.daemon

def test_a_settings_module_importing_a_missing_package_names_the_package_not_the_path(tmp_path):
    name = settings_module(tmp_path, "needy_settings", "import missing_dependency_xyz\n")
    completed, _ = run_cli("--settings", name, "--pythonpath", str(tmp_path), env=worker_env())
    assert_refused(completed, "missing_dependency_xyz")
    assert "Invalid value for --settings" not in completed.stderr


@pytest.mark.daemon
def test_an_unreachable_database_is_refused_with_its_host_and_port_and_what_to_check():
    env = worker_env(DATABASE_URL=database_url(host="127.0.0.1", port="1"))
    completed, elapsed = run_cli("--settings", "tests.settings", env=env)
    assert_refused(completed, "cannot connect to PostgreSQL at 127.0.0.1:1",
                   "the server is unreachable", "are HOST and PORT right",
                   "settings: DATABASES['default'] of tests.settings (from --settings)",
                   "Connection refused")
    assert "DATABASE_URL" not in completed.stderr  # a plain Django project does not use it
    assert elapsed < STARTUP_TIMEOUT_SECONDS


@pytest.mark.daemon
def test_a_missing_database_is_refused_as_missing_naming_the_settings_from_the_environment():
    env = worker_env(DATABASE_URL=database_url(dbname="djasync_no_such_database"),
                     DJANGO_SETTINGS_MODULE="tests.settings")
    completed, _ = run_cli(env=env)
    assert_refused(completed, "database 'djasync_no_such_database'",
                   "the database does not exist on that server",
                   "DATABASES['default'] of tests.settings (from DJANGO_SETTINGS_MODULE)")


@pytest.mark.daemon
def test_a_wrong_password_is_refused_as_an_authentication_failure():
    import psycopg

    import pg

    with pg.EmbeddedPostgres() as server:
        server.start()
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE ROLE djasync_pw LOGIN PASSWORD 'right-password'")
        hba = server.datadir / "pg_hba.conf"
        hba.write_text("host all djasync_pw 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        url = psycopg.conninfo.make_conninfo(server.url, user="djasync_pw",
                                             password="wrong-password")
        completed, _ = run_cli("--settings", "tests.settings", env=worker_env(DATABASE_URL=url))
    assert_refused(completed, "authentication failed: check USER and PASSWORD",
                   "as user 'djasync_pw'", "password authentication failed for user")
    assert "wrong-password" not in completed.stderr


@pytest.mark.daemon
def test_a_database_without_the_djasync_tables_is_refused_with_run_migrate():
    # The same server and database, but a search_path that sees none of its tables.
    env = worker_env(PGOPTIONS="-c search_path=djasync_no_such_schema")
    completed, _ = run_cli("--settings", "tests.settings", env=env)
    assert_refused(completed, "djasync tables are missing", "manage.py migrate")


@pytest.mark.daemon
def test_an_invalid_djasync_setting_is_refused_with_the_settings_message(tmp_path):
    name = settings_module(tmp_path, "bad_djasync_settings",
                           "from tests.settings import *  # noqa\n"
                           'DJASYNC = {"MAX_ATTEMPTS": 0}\n')
    completed, _ = run_cli("--settings", name, "--pythonpath", str(tmp_path), env=worker_env())
    assert_refused(completed, "DJASYNC['MAX_ATTEMPTS'] must be an integer >= 1")


@pytest.mark.daemon

def test_allowed_modules_set_to_none_is_refused_without_a_traceback(tmp_path):
    name = settings_module(tmp_path, "none_modules_settings",
                           "from tests.settings import *  # noqa\n"
                           'DJASYNC = {"ALLOWED_MODULES": None}\n')
    completed, _ = run_cli("--settings", name, "--pythonpath", str(tmp_path), env=worker_env())
    assert_refused(completed, "ALLOWED_MODULES")


@pytest.mark.daemon
def test_settings_without_djasync_in_installed_apps_are_refused(tmp_path):
    name = settings_module(tmp_path, "no_djasync_settings",
                           "from tests.settings import *  # noqa\n"
                           'INSTALLED_APPS = [a for a in INSTALLED_APPS if a != "djasync"]\n')
    completed, _ = run_cli("--settings", name, "--pythonpath", str(tmp_path), env=worker_env())
    assert_refused(completed, "'djasync' is not in INSTALLED_APPS")


@pytest.mark.daemon
@pytest.mark.django_db(transaction=True)
def test_burst_on_an_empty_queue_exits_0_quickly_and_leaves_a_future_job_pending():
    job = djasync.schedule(jobs.add, args=[1, 2], run_after=datetime.timedelta(hours=1))
    completed, elapsed = run_cli("--settings", "tests.settings", "--burst", "--concurrency", "2",
                                 env=worker_env())
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    assert "burst: no due job left" in completed.stderr
    assert elapsed < STARTUP_TIMEOUT_SECONDS
    assert Job.objects.get(pk=job.pk).status == Status.PENDING
    worker = Worker.objects.get()
    assert (worker.concurrency, worker.jobs_done) == (2, 0) and worker.stopped_at is not None


# -- how users start it: from the project directory, or through manage.py ----------------------

MANAGE_PY = '''import os, sys
if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    from django.core.management import execute_from_command_line
    execute_from_command_line(sys.argv)
'''


def make_project(directory: Path) -> Path:
    """A startproject-shaped directory: manage.py and a ``mysite`` package using the test
    settings."""
    (directory / "mysite").mkdir()
    (directory / "mysite" / "__init__.py").write_text("")
    (directory / "mysite" / "settings.py").write_text("from tests.settings import *  # noqa\n")
    (directory / "manage.py").write_text(MANAGE_PY)
    return directory


def run_in(directory: Path, *command: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or worker_env()).items() if not k.startswith("DJASYNC_WORKER_")}
    return subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True,
                          timeout=STARTUP_TIMEOUT_SECONDS * 2)


@pytest.mark.daemon
@pytest.mark.django_db(transaction=True)
def test_the_console_script_finds_the_settings_module_in_the_current_directory(tmp_path):
    project = make_project(tmp_path)
    job = djasync.schedule(jobs.add, args=[2, 3])
    script = Path(sys.executable).parent / "djasync-worker"
    completed = run_in(project, str(script), "--settings", "mysite.settings", "--burst", "-c", "1")
    assert completed.returncode == 0, completed.stderr
    assert Job.objects.get(pk=job.pk).status == Status.SUCCEEDED


@pytest.mark.daemon
@pytest.mark.django_db(transaction=True)
def test_manage_py_djasync_worker_runs_the_worker_with_the_same_options(tmp_path):
    project = make_project(tmp_path)
    env = worker_env()
    env.pop("DJANGO_SETTINGS_MODULE", None)
    job = djasync.schedule(jobs.add, args=[2, 3], queue="mail")
    other = djasync.schedule(jobs.add, args=[1, 1], queue="other")
    completed = run_in(project, sys.executable, "manage.py", "djasync_worker", "--burst",
                       "--concurrency", "1", "-q", "mail", env=env)
    assert completed.returncode == 0, completed.stderr
    assert "burst: no due job left" in completed.stderr
    assert Job.objects.get(pk=job.pk).status == Status.SUCCEEDED
    assert Job.objects.get(pk=other.pk).status == Status.PENDING  # -q was honoured
    refused = run_in(project, sys.executable, "manage.py", "djasync_worker", "-q", "my queue",
                     env=env)
    assert refused.returncode == 2, refused
    assert "Usage: manage.py djasync_worker [OPTIONS]" in refused.stderr
    assert "'my queue' contains a space" in refused.stderr


@pytest.mark.daemon
def test_manage_py_help_for_djasync_worker_shows_the_worker_options(tmp_path):
    project = make_project(tmp_path)
    for args in (["djasync_worker", "--help"], ["help", "djasync_worker"]):
        completed = run_in(project, sys.executable, "manage.py", *args)
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.startswith("Usage: manage.py djasync_worker [OPTIONS]")
        for option in OPTION_ENV_VARS:
            assert option in completed.stdout, (args, option)
    listing = run_in(project, sys.executable, "manage.py", "help")
    assert "djasync_worker" in listing.stdout


def test_call_command_is_refused_with_the_way_to_run_the_worker():
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match="python manage.py djasync_worker"):
        call_command("djasync_worker")
