"""A backend for Django's Tasks framework (``django.tasks``) that stores Tasks as djasync jobs.

Configure it with::

    TASKS = {"default": {"BACKEND": "djasync.backends.DjasyncBackend"}}

``enqueue()`` calls :func:`djasync.schedule`, so a Task enqueued in a transaction exists only if
that transaction commits. Every Task job names :func:`run_task`, which the worker runs like any
other job, inside the transaction that claimed it. ``run_task`` rebuilds the Task, sends Django's
``task_started`` and ``task_finished`` signals, and calls the function. The executor records each
attempt and retries failures. ``get_result()`` reads the job row and its attempt rows.

Django 6.0 and later ship ``django.tasks``. On Django 5.2 the ``django-tasks`` backport
(``django_tasks``) provides the same API.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import re
import signal
import string
import threading
import traceback
from dataclasses import dataclass
from importlib.util import find_spec
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from djasync import exceptions, registry, sql
from djasync.exceptions import DjasyncError, ForbiddenFunction, FunctionNotFound
from djasync.validation import check_meta, check_queue_name, to_json

# The backport's Task and BaseTaskBackend are different classes from django.tasks': a backend
# works only with the @task of the package it subclasses. So use django.tasks when it exists,
# as django-tasks-db does, and the backport only where it does not (Django 5.2).
if find_spec("django.tasks") is not None:
    from django.tasks import DEFAULT_TASK_BACKEND_ALIAS
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import Task, TaskContext, TaskError, TaskResult, TaskResultStatus
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json
elif find_spec("django_tasks") is not None:  # pragma: no cover - Django 5.2 only
    from django_tasks import DEFAULT_TASK_BACKEND_ALIAS  # type: ignore[no-redef]
    from django_tasks.backends.base import BaseTaskBackend  # type: ignore[no-redef]
    from django_tasks.base import (  # type: ignore[no-redef]
        Task,
        TaskContext,
        TaskError,
        TaskResult,
        TaskResultStatus,
    )
    from django_tasks.exceptions import (  # type: ignore[no-redef]
        InvalidTaskError as InvalidTask,
    )
    from django_tasks.exceptions import TaskResultDoesNotExist  # type: ignore[no-redef]
    from django_tasks.signals import (  # type: ignore[no-redef]
        task_enqueued,
        task_finished,
        task_started,
    )
    from django_tasks.utils import normalize_json  # type: ignore[no-redef]
else:
    raise ImportError(
        "djasync.backends needs Django's Tasks framework: Django 6.0 or later, or on Django 5.2 "
        "the django-tasks backport (pip install django-tasks)."
    )

if TYPE_CHECKING:  # pragma: no cover
    from djasync.executor import RunningJob
    from djasync.models import Attempt, Job

__all__ = ["DjasyncBackend", "DjasyncTask", "run_task"]

#: The dotted name of the function every Task job runs (``Job.name`` of a Task). The admin and
#: the worker's log lines show a Task job by its Task's path instead (``registry.display_name``).
RUNNER = registry.TASK_RUNNER

#: OPTIONS keys, with the ``meta`` key each one sets on every job of the backend.
OPTION_META_KEYS = {"MAX_ATTEMPTS": "max_attempts", "TIMEOUT": "timeout", "BACKOFF": "backoff"}
#: The ``DjasyncTask`` fields (``@task`` keyword arguments) that set the same ``meta`` keys.
TASK_META_KEYS = ("max_attempts", "timeout", "backoff")

_RESULT_ID = re.compile(r"[1-9][0-9]{0,18}")
_BIGINT_MAX = 2**63 - 1

#: Whether a transaction in progress holds the pending job's row (a worker running it holds
#: it, FOR NO KEY UPDATE): read, not locked (:data:`sql.LOCKER_IN_PROGRESS`).
_PROBE = f"""
SELECT EXISTS (SELECT 1 FROM djasync_job
                WHERE id = %s AND status = 'pending' AND {sql.LOCKER_IN_PROGRESS})
"""


#: Who runs a locked job, and since when: the worker registry (a daemon lists its running jobs
#: at each heartbeat) and the session holding the row lock (its transaction began at the claim).
#: Read only when ``get_result`` finds the job running, so the hot path writes nothing for it.
_RUNNING_ON = """
SELECT (SELECT w.name FROM djasync_worker w
         WHERE w.stopped_at IS NULL AND w.running @> to_jsonb(ARRAY[%(job_id)s::bigint])
         ORDER BY w.last_seen DESC LIMIT 1),
       (SELECT a.xact_start FROM djasync_job j JOIN pg_stat_activity a ON a.backend_xid = j.xmax
         WHERE j.id = %(job_id)s LIMIT 1)
"""


class TaskInterrupted(DjasyncError):
    """The task raised KeyboardInterrupt (its own, not a Ctrl-C of the process)."""


#: Attempts lost with their process are recorded as these (importable) classes.
WorkerLost = exceptions.WorkerLost
TaskTimedOut = exceptions.JobTimedOut


@dataclass(frozen=True, slots=True, kw_only=True)
class DjasyncTask(Task):
    """A Task that may carry djasync execution options, given as ``@task(max_attempts=3)``.

    Django 6.1 (and the backport) pass extra ``@task`` keyword arguments to the backend's
    ``task_class``. ``None`` means the backend's OPTIONS, then the DJASYNC setting, decide.
    ``max_attempts`` and ``backoff`` are the names Django's retry proposal uses as well.
    """

    #: Attempts before the task is FAILED (errors, crashes and timeouts all count).
    max_attempts: int | None = None
    #: Seconds one attempt may run.
    timeout: float | None = None
    #: Seconds before each retry: a number, or ``{"base": s, "factor": f, "max": s}`` for
    #: ``base·factor^(n-1)`` capped at ``max`` (see :func:`djasync.validation.check_backoff`).
    #: Left out of the hash: a dict is unhashable, and equal Tasks still hash alike.
    backoff: float | dict[str, float] | None = dataclasses.field(default=None, hash=False)


class DjasyncBackend(BaseTaskBackend):
    """Store Tasks as djasync jobs; ``djasync-worker`` runs them in their claiming transaction."""

    task_class = DjasyncTask
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        # Backends are built when a tasks.py module is imported, possibly before the app
        # registry is ready: no model imports and no queries here.
        super().__init__(alias, params)
        options = dict(self.options) if isinstance(self.options, dict) else self.options
        #: Flow-control keys by Task path (OPTIONS "LIMITS"): ``@task`` has no place for them.
        #: A key may be a template such as ``"tenant:{tenant_id}"``, formatted from each call's
        #: arguments (see :func:`_keys_for_call`).
        self.task_limits = _limits_from_options(alias, options.pop("LIMITS", {})
                                                if isinstance(options, dict) else {})
        self.meta = _meta_from_options(alias, options)

    def validate_task(self, task: Task) -> None:
        super().validate_task(task)
        try:
            check_queue_name(task.queue_name)
            check_meta(_task_meta(task))
        except (TypeError, ValueError) as exc:
            raise InvalidTask(str(exc)) from None

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        """Write the Task's job in the caller's transaction and return a READY result.

        No ``transaction.on_commit`` wrapper is needed: if the caller rolls back, the job never
        existed, and no worker sees it before the commit.
        """
        from djasync.scheduling import schedule

        self.validate_task(task)
        _task_at(task.module_path)  # refuse now what the worker could not run
        args, kwargs = normalize_json(args), normalize_json(kwargs)
        enqueued_at = timezone.now()
        job = schedule(
            RUNNER,
            args=[task.module_path, args, kwargs],
            kwargs=_envelope(self.alias, task, enqueued_at),
            run_after=task.run_after,
            meta={**self.meta, **_task_meta(task)},
            priority=int(task.priority),
            queue=task.queue_name,
            limits=_keys_for_call(task, self.task_limits.get(task.module_path), args, kwargs),
        )
        result: TaskResult = TaskResult(
            task=task, id=str(job.pk), status=TaskResultStatus.READY,
            enqueued_at=enqueued_at, started_at=None, finished_at=None, last_attempted_at=None,
            args=args, kwargs=kwargs, backend=self.alias, errors=[], worker_ids=[],
        )
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> TaskResult:
        """Read a Task's result from its job row and attempt rows, in any process.

        A pending job is RUNNING while a worker holds its row lock, else READY (see
        :func:`_held_by_a_worker`).
        """
        from djasync.models import Status

        job_id = _job_id(result_id)
        job, attempts = self._load(job_id)
        running_on: tuple[str | None, datetime.datetime | None] | None = None
        if job.status == Status.PENDING and _held_by_a_worker(job_id):
            # It may have finished between the read and the probe: read it again.
            running_on = _running_on(job_id)
            job, attempts = self._load(job_id)
            if job.status != Status.PENDING:
                running_on = None
        return _result_of(job, attempts, running_on=running_on)

    def _load(self, job_id: int) -> tuple[Job, list[Attempt]]:
        from djasync.models import Job

        job = Job.objects.filter(pk=job_id, name=RUNNER, kwargs__backend=self.alias).first()
        if job is None or not _is_envelope(job):
            raise TaskResultDoesNotExist(f"no task result {str(job_id)!r} in backend "
                                         f"{self.alias!r}")
        return job, list(job.attempt_set.order_by("number", "id"))

    def check(self, **kwargs: Any) -> list[Any]:
        from django.apps import apps
        from django.core import checks

        errors: list[Any] = []
        if not apps.is_installed("djasync"):
            errors.append(checks.Error(
                f"TASKS[{self.alias!r}] uses djasync.backends.DjasyncBackend, but 'djasync' is "
                "not in INSTALLED_APPS.",
                hint="Add 'djasync' to INSTALLED_APPS and run migrate.",
                id="djasync.E101",
            ))
        vendor = connection.vendor if "default" in connections else "missing"
        if vendor != "postgresql":
            errors.append(checks.Error(
                f"TASKS[{self.alias!r}] uses djasync, which needs PostgreSQL; the default "
                f"database is {vendor}.",
                hint="Set DATABASES['default']['ENGINE'] to 'django.db.backends.postgresql'.",
                id="djasync.E102",
            ))
        from djasync import conf, limits
        from djasync.exceptions import ImproperlyConfigured as BadSettings

        try:
            configured = conf.get().LIMITS
        except BadSettings:
            configured = {}  # reported by djasync's own check
        for path, keys in sorted(self.task_limits.items()):
            where = f"TASKS[{self.alias!r}]['OPTIONS']['LIMITS'][{path!r}]"
            for key in keys:
                try:
                    fields = _template_fields(key)
                except ValueError as exc:
                    errors.append(checks.Error(f"{where}: {exc}", id="djasync.E105"))
                    continue
                if fields:
                    errors.extend(_check_template(where, path, key, fields, configured))
                elif limits.matching(key, configured) is None:
                    errors.append(checks.Error(
                        f"{where}: key {key!r} matches no entry of DJASYNC['LIMITS']",
                        id="djasync.E104"))
        for queue in sorted(self.queues):
            try:
                check_queue_name(queue)
            except ValueError as exc:
                errors.append(checks.Error(f"TASKS[{self.alias!r}]['QUEUES']: {exc}",
                                           id="djasync.E103"))
        return errors


def run_task(
    task_path: str,
    args: list[Any],
    kwargs: dict[str, Any],
    *,
    backend: str = DEFAULT_TASK_BACKEND_ALIAS,
    takes_context: bool = False,
    enqueued_at: str | None = None,
    run_after: str | None = None,
) -> Any:
    """Run one Task inside the executor (the function of every Task job); return its result.

    It runs in the job's savepoint, in the transaction that claimed the job, so everything the
    Task writes commits with the job's status. ``task_finished`` for a failure is sent inside
    the ``except`` (Django's log receiver attaches ``sys.exc_info()``), then the exception is
    re-raised so that the executor rolls back the Task's writes, records the attempt and
    retries it. As in Django's reference backends, ``SystemExit`` and a ``KeyboardInterrupt``
    the task raises itself are failures of the task like any exception; a Ctrl-C (SIGINT) of
    the process is not, and interrupts the run (see :class:`_Interrupts`).
    """
    from djasync.executor import current_job

    running = current_job()
    if running is None:
        raise DjasyncError("run_task runs Task jobs inside djasync's executor; enqueue the Task")
    task = _task_as_enqueued(task_path, backend, takes_context=takes_context,
                             priority=running.priority, queue=running.queue,
                             run_after=_parse_time(run_after))
    result = _result_in_flight(task, running, args, kwargs, _parse_time(enqueued_at))
    sender = type(task.get_backend())
    task_started.send(sender, task_result=result)
    call_args = [TaskContext(task_result=result), *args] if task.takes_context else args
    interrupts = _Interrupts()
    try:
        with interrupts:
            value = _call_task(task, call_args, kwargs)
        # Fail the attempt here, not after task_finished said SUCCESSFUL, if the value cannot
        # be stored: Tasks return JSON (Django's rule), and jsonb refuses NaN and NUL.
        value = to_json(normalize_json(value), "the task's return value")
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt) and not interrupts.own(exc):
            raise  # a Ctrl-C: the run is interrupted, not failed
        retried = running.attempt < running.max_attempts and not isinstance(
            exc, ForbiddenFunction | FunctionNotFound)
        result.errors.append(TaskError(exception_class_path=_class_path(type(exc)),
                                       traceback="".join(traceback.format_exception(exc))))
        # A failed attempt that will be retried leaves the Task READY, as get_result() will
        # report it once the attempt is recorded; FAILED means no attempt is left.
        if retried:
            _set(result, status=TaskResultStatus.READY)
        else:
            _set(result, status=TaskResultStatus.FAILED, finished_at=timezone.now())
        task_finished.send(sender, task_result=result)
        if isinstance(exc, KeyboardInterrupt):
            # Past the executor (which treats KeyboardInterrupt as a stop), as a failure
            # whose recorded traceback holds the task's own.
            raise TaskInterrupted(f"the task raised KeyboardInterrupt: {exc}") from exc
        raise
    _set(result, status=TaskResultStatus.SUCCESSFUL, finished_at=timezone.now(),
         _return_value=value)
    task_finished.send(sender, task_result=result)
    return value


def _call_task(task: Task, call_args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Call the Task's function (a coroutine function in an event loop of its own)."""
    from djasync.executor import JobWritesLost

    if iscoroutinefunction(task.func):
        # One event loop per call (asgiref makes it in a new thread): the simplest, and it
        # keeps the job in its transaction. Django's connections are per thread; asgiref
        # sends thread-sensitive sync_to_async calls, which is what the async ORM methods
        # (acreate, aget, ...) use, back to this thread. So they run on this thread's
        # connection, inside the job's savepoint, and commit or roll back with the job.
        value = async_to_sync(task.func)(*call_args, **kwargs)
    else:
        value = task.func(*call_args, **kwargs)
    if transaction.get_rollback():
        raise JobWritesLost(
            "the task caught a database error without rolling back to a savepoint of its "
            "own (wrap the statement in transaction.atomic()), so its writes are lost"
        )
    return value


class _Interrupts:
    """Tell a KeyboardInterrupt the task raises itself from a Ctrl-C (SIGINT) of the process.

    In a worker's child SIGINT is ignored (the supervisor handles Ctrl-C), so every
    KeyboardInterrupt there is the task's. Where Python's default handler is in place
    (``flush_queue`` in a terminal), it is wrapped for the call to note a real signal. Under a
    handler of someone else's (or off the main thread) a real interrupt cannot be ruled out,
    and KeyboardInterrupt stops the run as before.
    """

    def __init__(self) -> None:
        self.known = False
        self.signalled = False
        self._installed = False

    def __enter__(self) -> _Interrupts:
        handler = signal.getsignal(signal.SIGINT)
        if handler is signal.SIG_IGN:
            self.known = True
        elif (handler is signal.default_int_handler
              and threading.current_thread() is threading.main_thread()):
            signal.signal(signal.SIGINT, self._on_sigint)
            self.known = self._installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.signalled = True
        signal.default_int_handler(signum, frame)

    def own(self, exc: KeyboardInterrupt) -> bool:
        """Whether ``exc`` is the task's own, not a Ctrl-C."""
        return self.known and not self.signalled


def _meta_from_options(alias: str, options: Any) -> dict[str, Any]:
    """Return the ``meta`` a backend's OPTIONS give each of its jobs."""
    if not isinstance(options, dict):
        raise ImproperlyConfigured(f"TASKS[{alias!r}]['OPTIONS'] must be a dict.")
    unknown = sorted(set(options) - set(OPTION_META_KEYS))
    if unknown:
        raise ImproperlyConfigured(
            f"TASKS[{alias!r}]['OPTIONS'] has unknown key(s) {', '.join(unknown)}; known keys: "
            f"{', '.join(OPTION_META_KEYS)}."
        )
    meta = {OPTION_META_KEYS[key]: value for key, value in options.items()}
    try:
        return check_meta(meta)
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(f"TASKS[{alias!r}]['OPTIONS']: {exc}") from None


def _limits_from_options(alias: str, raw: Any) -> dict[str, list[str]]:
    """Return OPTIONS "LIMITS": Task path -> the flow-control keys its jobs hold."""
    where = f"TASKS[{alias!r}]['OPTIONS']['LIMITS']"
    if not isinstance(raw, dict) or not all(
            isinstance(path, str) and isinstance(keys, list | tuple)
            and all(isinstance(k, str) and k for k in keys) for path, keys in raw.items()):
        raise ImproperlyConfigured(
            f"{where} must be a dict of Task path -> list of limit keys, such as "
            "{'shop.tasks.charge': ['stripe']}.")
    return {path: list(keys) for path, keys in raw.items()}


#: A key template's field: an argument's name, nothing else (no index, attribute or format).
_ARGUMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _template_fields(key: str) -> list[str]:
    """Return the argument names a limit key template uses (``"tenant:{tenant_id}"`` ->
    ``["tenant_id"]``; a plain key has none); raise ValueError for any other field."""
    try:
        parsed = list(string.Formatter().parse(key))
    except ValueError as exc:
        raise ValueError(f"key {key!r} is not a valid template ({exc}); write "
                         "'name:{argument}', and '{{' for a brace") from None
    fields = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not _ARGUMENT_NAME.fullmatch(field) or spec or conversion:
            raise ValueError(f"key {key!r}: a template field is an argument's name, such as "
                             "{tenant_id}; no index, attribute, conversion or format")
        fields.append(field)
    return fields


def _check_template(where: str, path: str, key: str, fields: list[str],
                    configured: dict[str, Any]) -> list[Any]:
    """System-check errors for a key template: it must be ``name:…`` under a pattern
    ``name:*`` of ``DJASYNC["LIMITS"]``, and name arguments of the Task's function."""
    from django.core import checks

    errors = []
    name, colon, _ = key.partition(":")
    if not colon or "{" in name or f"{name}:*" not in configured:
        errors.append(checks.Error(
            f"{where}: key template {key!r} matches no entry of DJASYNC['LIMITS']: a key made "
            "from arguments is 'name:{argument}' under a pattern 'name:*'", id="djasync.E104"))
    try:
        task = import_string(path)
        parameters = _parameters(task)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        errors.append(checks.Error(
            f"{where}: cannot read the arguments of Task {path!r} for key template {key!r}: "
            f"{exc}", id="djasync.E105"))
        return errors
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    names = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}
    unknown = [field for field in fields if field not in names and not takes_any]
    if unknown:
        errors.append(checks.Error(
            f"{where}: key template {key!r} names {', '.join(unknown)}, which "
            f"{path} does not take (it takes: {', '.join(sorted(names)) or 'nothing'})",
            id="djasync.E105"))
    return errors


def _parameters(task: Any) -> list[inspect.Parameter]:
    """The parameters a Task's callers pass (its context, if it takes one, is not theirs)."""
    parameters = list(inspect.signature(task.func).parameters.values())
    return parameters[1:] if task.takes_context else parameters


def _keys_for_call(task: Task, keys: list[str] | None, args: Any, kwargs: Any,
                   ) -> list[str] | None:
    """Return the flow-control keys of one call of ``task``: its OPTIONS keys, templates
    formatted from the call's arguments (by name, positional or keyword, defaults included).

    Raise TypeError when a template's argument is not passed or is not a str or an int (a
    key from ``None`` would quietly be ``"tenant:None"``). ``schedule()`` then refuses a key
    matching no entry of ``DJASYNC["LIMITS"]`` (``UnknownLimit``).
    """
    if not keys:
        return keys
    templates = [(key, _template_fields(key)) for key in keys]
    if not any(fields for _, fields in templates):
        return keys
    parameters = _parameters(task)
    signature = inspect.Signature(parameters)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"Task {task.module_path}: its limit keys need its arguments, and this "
                        f"call's do not fit its signature: {exc}") from None
    bound.apply_defaults()
    values = dict(bound.arguments)
    for parameter in parameters:  # **kwargs: its names are arguments too
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            values = {**values.pop(parameter.name, {}), **values}
    made = []
    for key, fields in templates:
        for field in fields:
            if field not in values:
                raise TypeError(f"Task {task.module_path}: limit key {key!r} needs the argument "
                                f"{field!r}, which this call does not pass")
            value = values[field]
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise TypeError(f"Task {task.module_path}: limit key {key!r} needs {field!r} "
                                f"to be a str or an int, not {value!r}")
        made.append(key.format_map({field: str(values[field]) for field in fields}))
    return made


def _task_meta(task: Task) -> dict[str, Any]:
    """Return the ``meta`` a Task's own options set (only a :class:`DjasyncTask` has them)."""
    meta = {}
    for key in TASK_META_KEYS:
        value = getattr(task, key, None)
        if value is not None:
            meta[key] = value
    return meta


def _envelope(alias: str, task: Task, enqueued_at: datetime.datetime) -> dict[str, Any]:
    """Return the job kwargs that let ``run_task`` and ``get_result`` rebuild the Task.

    ``enqueued_at`` is kept (exactly) so the runner's results agree with ``get_result``'s
    without reading the job row; ``run_after`` is the one asked for, which retries do not move.
    """
    return {
        "backend": alias,
        "takes_context": task.takes_context,
        "enqueued_at": enqueued_at.isoformat(),
        "run_after": task.run_after.isoformat() if task.run_after else None,
    }


def _is_envelope(job: Job) -> bool:
    return (isinstance(job.args, list) and len(job.args) == 3 and isinstance(job.args[0], str)
            and isinstance(job.args[1], list) and isinstance(job.args[2], dict)
            and isinstance(job.kwargs, dict))


def _parse_time(value: Any) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(value) if isinstance(value, str) else None


def _job_id(result_id: Any) -> int:
    if isinstance(result_id, str) and _RESULT_ID.fullmatch(result_id):
        job_id = int(result_id)
        if job_id <= _BIGINT_MAX:
            return job_id
    raise TaskResultDoesNotExist(f"{result_id!r} is not a djasync task result id")


def _task_at(task_path: str) -> Task:
    """Return the Task a dotted path names, if its function is allowed to run.

    The path goes through djasync's allow-list (as a string, before anything is imported), so
    a Task job can run no more than a plain job can.
    """
    function = registry.resolve(task_path)
    try:
        task = import_string(task_path)  # the module is imported by now: this walks attributes
    except ImportError:
        task = None
    if not isinstance(task, Task) or task.func is not function:
        raise FunctionNotFound(
            f"{task_path!r} is not a Task: the module-level name of a Task must be its "
            "function's name (decorate the function with @task)"
        )
    return task


def _task_as_enqueued(task_path: str, alias: str, *, takes_context: bool, priority: int,
                      queue: str, run_after: datetime.datetime | None) -> Task:
    """Return the module's Task with the options it was enqueued with."""
    return dataclasses.replace(_task_at(task_path), backend=alias, priority=priority,
                               queue_name=queue, run_after=run_after,
                               takes_context=takes_context)


def _result_in_flight(task: Task, running: RunningJob, args: list[Any], kwargs: dict[str, Any],
                      enqueued_at: datetime.datetime | None) -> TaskResult:
    """Return the RUNNING result that the signals and ``TaskContext`` see."""
    from djasync.models import Attempt, Outcome

    # ``running.attempt`` comes from the claim's count of attempt rows (exact near max_attempts,
    # rarely one short otherwise). Read the rows, which cost a query, only if there are any.
    earlier = [] if running.attempt == 1 else list(
        Attempt.objects.filter(job_id=running.id).order_by("number", "id"))
    return TaskResult(
        task=task, id=str(running.id), status=TaskResultStatus.RUNNING, enqueued_at=enqueued_at,
        started_at=earlier[0].started_at if earlier else running.started_at,
        finished_at=None, last_attempted_at=running.started_at, args=args, kwargs=kwargs,
        backend=task.backend,
        errors=[_error_of(a) for a in earlier if a.outcome != Outcome.SUCCEEDED],
        worker_ids=[a.worker for a in earlier] + [running.worker],
    )


def _result_of(job: Job, attempts: list[Attempt], *,
               running_on: tuple[str | None, datetime.datetime | None] | None) -> TaskResult:
    """Return the result a job row and its attempt rows describe; ``running_on`` (the worker
    and the start of the run, each if known) when a worker is running it now."""
    from djasync.models import Outcome, Status

    task_path, args, kwargs = job.args
    envelope = job.kwargs
    try:
        task = _task_as_enqueued(
            task_path, envelope["backend"], takes_context=bool(envelope.get("takes_context")),
            priority=job.priority, queue=job.queue,
            run_after=_parse_time(envelope.get("run_after")))
    except (ForbiddenFunction, FunctionNotFound) as exc:
        # A TaskResult needs its Task: a job naming a Task that is gone from the code (or
        # one written by hand) has no result this process can build.
        raise TaskResultDoesNotExist(f"task result {str(job.pk)!r}: {exc}") from exc
    if job.status == Status.PENDING:
        status = TaskResultStatus.RUNNING if running_on is not None else TaskResultStatus.READY
    elif job.status == Status.SUCCEEDED:
        status = TaskResultStatus.SUCCESSFUL
    else:  # failed, or cancelled before it ran ("unable to start": Django has no CANCELLED)
        status = TaskResultStatus.FAILED
    result: TaskResult = TaskResult(
        task=task, id=str(job.pk), status=status,
        enqueued_at=_parse_time(envelope.get("enqueued_at")) or job.created_at,
        started_at=attempts[0].started_at if attempts else None,
        finished_at=job.finished_at if status in (TaskResultStatus.SUCCESSFUL,
                                                  TaskResultStatus.FAILED) else None,
        last_attempted_at=attempts[-1].started_at if attempts else None,
        args=args, kwargs=kwargs, backend=envelope["backend"],
        errors=[_error_of(a) for a in attempts if a.outcome != Outcome.SUCCEEDED],
        worker_ids=[a.worker for a in attempts],
    )
    if running_on is not None:  # the run going on now is an attempt too
        worker, started = running_on
        if worker:
            result.worker_ids.append(worker)
        if started is not None:
            _set(result, last_attempted_at=started, started_at=result.started_at or started)
    if status == TaskResultStatus.SUCCESSFUL:
        _set(result, _return_value=job.result)
    return result


def _held_by_a_worker(job_id: int) -> bool:
    """Tell whether a worker is running this pending job right now (holds its row lock).

    The lock *is* djasync's "running" mark, so this is exact, not a heartbeat's guess, with
    three limits: a job claimed in a batch is RUNNING while it waits its turn; a row locked
    for a moment by an admin action (cancel, retry) or an UPDATE looks RUNNING for that moment;
    and a row locked by two transactions at once (a multixact) is not seen as locked. The probe
    reads the row's locker and locks nothing (:data:`_PROBE`), so no worker's claim is
    disturbed by it.
    """
    from djasync.executor import current_job

    running = current_job()
    if running is not None and running.id == job_id:
        return True  # our own transaction holds the lock
    with connection.cursor() as cursor:
        cursor.execute(_PROBE, [job_id])
        (held,) = cursor.fetchone()
    return bool(held)


def _running_on(job_id: int) -> tuple[str | None, datetime.datetime | None]:
    """The worker daemon running a locked job, and when its transaction began (either may be
    unknown: the registry lists it at the daemon's next heartbeat)."""
    with connection.cursor() as cursor:
        cursor.execute(_RUNNING_ON, {"job_id": job_id})
        worker, started = cursor.fetchone()
    return worker, started


def _error_of(attempt: Attempt) -> TaskError:
    path = attempt.exception_type or "builtins.Exception"
    if path == _class_path(TaskInterrupted):  # recorded through this wrapper, as the task's
        path = _class_path(KeyboardInterrupt)
    text = attempt.traceback or f"{path}: {attempt.exception_message}"
    return TaskError(exception_class_path=path, traceback=text)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _set(result: TaskResult, **values: Any) -> None:
    # TaskResult is frozen; Django's own backends change theirs this way too.
    for name, value in values.items():
        object.__setattr__(result, name, value)
