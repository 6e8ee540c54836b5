"""The DJASYNC setting: every key is checked, a bad one is a clear error and a system check."""

import datetime
import os
import subprocess
import sys
import uuid

import pytest
from django.core import checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings
from django.utils import timezone

import djasync
from djasync import conf, executor
from djasync.exceptions import ForbiddenFunction, ImproperlyConfigured
from djasync.models import Job, Outcome, Status
from tests import jobs
from tests.daemon import ROOT

KNOWN_KEYS = ["MAX_ATTEMPTS", "TIMEOUT", "BACKOFF", "ALLOWED_MODULES", "DEFAULT_QUEUE",
              "DEFAULT_PRIORITY", "TRACEBACK_MAX_CHARS", "PERIODIC"]



def djasync_errors() -> list[checks.CheckMessage]:
    return [message for message in checks.run_checks() if message.id.startswith("djasync.")]


def test_an_unknown_key_is_an_error_that_lists_the_known_keys():
    with pytest.raises(ImproperlyConfigured) as error:
        conf.load({"RETRIES": 3, "MAX_ATTEMPTS": 3})
    message = str(error.value)
    assert "RETRIES" in message
    for key in KNOWN_KEYS:
        assert key in message


def test_a_djasync_setting_that_is_not_a_dict_is_an_error():
    with pytest.raises(ImproperlyConfigured, match="DJASYNC must be a dict, not list"):
        conf.load([("MAX_ATTEMPTS", 3)])


def test_no_setting_and_an_empty_dict_give_the_defaults():
    for raw in (None, {}):
        settings = conf.load(raw)
        assert (settings.MAX_ATTEMPTS, settings.TIMEOUT, settings.DEFAULT_QUEUE,
                settings.DEFAULT_PRIORITY, settings.ALLOWED_MODULES) == (
            10, 300.0, "default", 0, ())
        assert settings.backoff(1) == 60.0


@pytest.mark.parametrize("key, value", [
    ("MAX_ATTEMPTS", 0),
    ("MAX_ATTEMPTS", -1),
    ("MAX_ATTEMPTS", "3"),
    ("MAX_ATTEMPTS", 2.5),
    ("MAX_ATTEMPTS", True),
    ("MAX_ATTEMPTS", None),
    ("TIMEOUT", 0),
    ("TIMEOUT", -5),
    ("TIMEOUT", "60"),
    ("TIMEOUT", True),
    ("TIMEOUT", float("nan")),
    ("TIMEOUT", float("inf")),
    ("TIMEOUT", 7 * 86400 + 1),
    ("DEFAULT_PRIORITY", 101),
    ("DEFAULT_PRIORITY", -101),
    ("DEFAULT_PRIORITY", 1.0),
    ("DEFAULT_PRIORITY", "high"),
    ("ALLOWED_MODULES", "myproject.jobs"),
    ("ALLOWED_MODULES", [""]),
    ("ALLOWED_MODULES", [3]),
    pytest.param("ALLOWED_MODULES", None),
    pytest.param("ALLOWED_MODULES", 5),
    pytest.param("ALLOWED_MODULES", ["my project"],
                 id="ALLOWED_MODULES-space"),
    ("DEFAULT_QUEUE", ""),
    ("DEFAULT_QUEUE", "a b"),
    ("DEFAULT_QUEUE", 5),
    ("DEFAULT_QUEUE", None),
    ("BACKOFF", "no_such_module_xyz.backoff"),
    ("BACKOFF", "tests.jobs.no_such_backoff"),
    ("BACKOFF", "not a dotted path"),
    ("BACKOFF", "tests.jobs.ON_COMMIT_CALLS"),
    ("BACKOFF", 42),
    ("BACKOFF", None),
    ("TRACEBACK_MAX_CHARS", 10),
    ("LISTEN_URL", ""),
    ("LISTEN_URL", 5432),
    ("LISTEN_URL", "host=db port"),
    ("LISTEN_URL", "postgresql://db/x?nosuchoption=1"),
])
def test_a_bad_value_is_an_improperly_configured_error_that_names_its_key(key, value):
    with pytest.raises(ImproperlyConfigured) as error:
        conf.load({key: value})
    assert f"DJASYNC[{key!r}]" in str(error.value)


@pytest.mark.parametrize("key, value, expected", [
    ("MAX_ATTEMPTS", 1, 1),
    ("TIMEOUT", None, None),
    ("TIMEOUT", 0.5, 0.5),
    ("DEFAULT_PRIORITY", -100, -100),
    ("DEFAULT_PRIORITY", 100, 100),
    ("ALLOWED_MODULES", ["a.b", "c"], ("a.b", "c")),
    ("ALLOWED_MODULES", (), ()),
    ("DEFAULT_QUEUE", "mail.high:1", "mail.high:1"),
    ("LISTEN_URL", None, None),
    ("LISTEN_URL", "postgresql://u@db:5432/x", "postgresql://u@db:5432/x"),
    ("LISTEN_URL", "host=db port=5432 dbname=x", "host=db port=5432 dbname=x"),
])
def test_a_good_value_is_accepted(key, value, expected):
    assert getattr(conf.load({key: value}), key) == expected


def test_a_backoff_given_as_a_callable_or_a_dotted_path_is_used():
    assert conf.load({"BACKOFF": lambda attempt: attempt * 2}).backoff(3) == 6.0
    assert conf.load({"BACKOFF": "tests.jobs.hourly_backoff"}).backoff(2) == 7200.0


def test_unimportable_backoff_names_the_path_in_the_message():
    with pytest.raises(ImproperlyConfigured, match="cannot be imported.*no_such_module_xyz"):
        conf.load({"BACKOFF": "no_such_module_xyz.backoff"})
    with pytest.raises(ImproperlyConfigured, match="must be a callable"):
        conf.load({"BACKOFF": 42})


@override_settings(DJASYNC={"MAX_ATTEMPTS": 0})
def test_system_checks_report_a_bad_setting_as_djasync_e001():
    [error] = djasync_errors()
    assert error.id == "djasync.E001" and error.level == checks.ERROR
    assert "DJASYNC['MAX_ATTEMPTS']" in error.msg


@override_settings(DJASYNC={"ALLOWED_MODULES": None})
def test_system_checks_report_a_non_iterable_allowed_modules_as_djasync_e001():
    [error] = djasync_errors()
    assert error.id == "djasync.E001" and "ALLOWED_MODULES" in error.msg


@override_settings(DJASYNC={"TIMEOUTS": 5})
def test_manage_py_check_fails_on_an_unknown_key():
    with pytest.raises(SystemCheckError) as error:
        call_command("check")
    assert "djasync.E001" in str(error.value) and "TIMEOUTS" in str(error.value)


def test_system_checks_pass_with_the_test_settings_and_with_a_good_setting():
    assert djasync_errors() == []
    with override_settings(DJASYNC={"MAX_ATTEMPTS": 3, "ALLOWED_MODULES": ["x"]}):
        assert djasync_errors() == []


@pytest.mark.django_db(transaction=True)
@override_settings(DJASYNC={"BACKOFF": "tests.jobs.hourly_backoff"})
def test_the_executor_reschedules_a_failed_attempt_with_the_configured_backoff():
    job = djasync.schedule(jobs.always_raise)
    before = timezone.now()
    [finished] = executor.run_batch()
    after = timezone.now()
    job.refresh_from_db()
    assert (finished.outcome, job.status) == (Outcome.ERROR, Status.PENDING)
    hour = datetime.timedelta(hours=1)
    assert before + hour <= job.run_after <= after + hour
    # The backoff is given the attempt number: the second retry waits two hours.
    Job.objects.filter(pk=job.pk).update(run_after=timezone.now())
    before = timezone.now()
    [finished] = executor.run_batch()
    after = timezone.now()
    job.refresh_from_db()
    assert finished.attempt == 2
    assert before + 2 * hour <= job.run_after <= after + 2 * hour


@pytest.mark.django_db(transaction=True)
def test_the_executor_follows_a_backoff_callable_and_max_attempts_from_the_setting():
    with override_settings(DJASYNC={"BACKOFF": lambda attempt: 0.0, "MAX_ATTEMPTS": 2}):
        job = djasync.schedule(jobs.always_raise)
        statuses = [executor.run_batch()[0].status for _ in range(2)]
    assert statuses == [Status.PENDING, Status.FAILED]
    assert Job.objects.get(pk=job.pk).attempts == 2


@pytest.mark.django_db(transaction=True)
@override_settings(DJASYNC={"DEFAULT_QUEUE": "low", "DEFAULT_PRIORITY": -7})
def test_schedule_uses_the_default_queue_and_priority_from_the_setting():
    job = djasync.schedule(jobs.add, args=[1, 2])
    assert (job.queue, job.priority) == ("low", -7)
    assert executor.run_batch(queues=["default"]) == []
    assert [f.job_id for f in executor.run_batch(queues=["low"])] == [job.pk]


@pytest.fixture
def outside_module(tmp_path, monkeypatch) -> str:
    """A module outside INSTALLED_APPS, importable from sys.path; return its name."""
    name = f"djasync_outside_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def triple(x):\n    return 3 * x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.django_db(transaction=True)
def test_allowed_modules_lets_a_module_outside_installed_apps_be_scheduled_and_run(outside_module):
    function = f"{outside_module}.triple"
    with override_settings(DJASYNC={"ALLOWED_MODULES": [outside_module]}):
        job = djasync.schedule(function, args=[5])
        [finished] = executor.run_batch()
    assert (finished.job_id, finished.outcome, finished.result) == (job.pk, Outcome.SUCCEEDED, 15)


@pytest.mark.django_db(transaction=True)
def test_without_allowed_modules_the_same_name_is_refused_before_it_is_imported(outside_module):
    with pytest.raises(ForbiddenFunction, match="not in an allowed module"):
        djasync.schedule(f"{outside_module}.triple", args=[5])
    assert outside_module not in sys.modules
    assert not Job.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_allowed_module_prefix_does_not_allow_a_module_that_merely_starts_with_it(
        outside_module):
    with override_settings(DJASYNC={"ALLOWED_MODULES": [outside_module[:-2]]}), \
            pytest.raises(ForbiddenFunction):
        djasync.schedule(f"{outside_module}.triple", args=[5])
    assert outside_module not in sys.modules


@pytest.mark.django_db(transaction=True)
def test_a_job_whose_module_is_no_longer_allowed_is_failed_without_running(outside_module):
    with override_settings(DJASYNC={"ALLOWED_MODULES": [outside_module]}):
        job = djasync.schedule(f"{outside_module}.triple", args=[5])
    sys.modules.pop(outside_module, None)  # schedule() imported it; start afresh
    [finished] = executor.run_batch()
    job.refresh_from_db()
    assert (finished.status, job.status, job.result) == (Status.FAILED, Status.FAILED, None)
    assert "not in an allowed module" in job.attempt_set.get().exception_message
    assert outside_module not in sys.modules


def run_check(tmp_path, databases: str) -> subprocess.CompletedProcess[str]:
    """``django-admin check`` (no --database) in a fresh process with these DATABASES."""
    (tmp_path / "check_settings.py").write_text(
        "from tests.settings import *  # noqa\n"
        f"DATABASES = {databases}\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
           "DJANGO_SETTINGS_MODULE": "check_settings"}
    return subprocess.run([sys.executable, "-m", "django", "check"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_manage_py_check_reports_a_sqlite_default_database_without_being_asked_for_databases(
        tmp_path):
    completed = run_check(tmp_path, '{"default": {"ENGINE": "django.db.backends.sqlite3", '
                                    f'"NAME": "{tmp_path}/db.sqlite3"}}}}')
    assert completed.returncode == 1, completed
    assert "djasync.E003" in completed.stderr
    assert "'django.db.backends.sqlite3' (sqlite)" in completed.stderr


def test_the_database_check_reads_the_engine_and_never_connects(tmp_path):
    completed = run_check(tmp_path, '{"default": {"ENGINE": "django.db.backends.postgresql", '
                                    '"HOST": "127.0.0.1", "PORT": "1", "NAME": "x"}}')
    assert completed.returncode == 0, completed.stderr
    assert "no issues" in completed.stdout


def test_the_listen_connection_takes_listen_url_with_the_worker_connection_options(settings):
    from djasync.connections import listen_conninfo

    database = {"host": "bouncer", "port": 6432, "dbname": "app", "keepalives_idle": 5}
    assert listen_conninfo(database) == database  # no LISTEN_URL: the database's own
    settings.DJASYNC = {**settings.DJASYNC,
                        "LISTEN_URL": "postgresql://u@db:5432/app?keepalives_idle=30",
                        "WORKER_CONNECTION_OPTIONS": {"connect_timeout": 3}}
    params = listen_conninfo(database)
    assert (params["host"], params["port"], params["user"], params["dbname"]) == (
        "db", "5432", "u", "app")
    assert params["keepalives_idle"] == "30"  # the URL's own value wins
    assert params["connect_timeout"] == 3 and params["tcp_user_timeout"] == 4_000
