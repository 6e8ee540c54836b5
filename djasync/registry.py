"""Decide which functions may run, and resolve their dotted names.

A job row names its function as a string, and importing a module runs its code. So the name is
checked *as a string* against the allowed module prefixes before anything is imported, and the
object it resolves to must itself be defined in an allowed module (``myapp.views.os.system``
names an allowed module but resolves to ``os.system``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

from django.apps import apps
from django.core.signals import setting_changed
from django.dispatch import receiver

from djasync import conf
from djasync.exceptions import ForbiddenFunction, FunctionNotFound

DOTTED_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")

#: The function every Task job names (see :mod:`djasync.backends`); its first argument is the
#: Task's dotted path.
TASK_RUNNER = "djasync.backends.run_task"


_prefixes: tuple[Any, tuple[str, ...]] | None = None


def allowed_prefixes() -> tuple[str, ...]:
    """Module prefixes whose functions may run.

    The modules of INSTALLED_APPS, except Django's own (``django.contrib.auth`` is installed
    almost everywhere and holds nothing a queue should run), plus ``DJASYNC["ALLOWED_MODULES"]``.
    Computed once per settings (the executor asks for every job).
    """
    global _prefixes
    settings = conf.get()
    if _prefixes is None or _prefixes[0] is not settings:
        app_modules = [
            app.name for app in apps.get_app_configs() if not app.name.startswith("django.")
        ]
        _prefixes = (settings, tuple(app_modules) + settings.ALLOWED_MODULES)
    return _prefixes[1]


@receiver(setting_changed)
def _forget_prefixes(*, setting: str, **kwargs: Any) -> None:
    global _prefixes
    if setting in ("INSTALLED_APPS", "DJASYNC"):
        _prefixes = None


def _in_prefixes(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def check_name(name: Any) -> str:
    """Refuse a name outside the allowed modules without importing anything."""
    if not isinstance(name, str) or not DOTTED_NAME.match(name) or len(name) > 255:
        raise ForbiddenFunction(f"{name!r} is not a dotted Python name such as 'myapp.jobs.send'")
    parts = name.split(".")
    if any(part.startswith("_") for part in parts[1:]):
        raise ForbiddenFunction(f"{name!r} names a private attribute")
    if not _in_prefixes(name.rsplit(".", 1)[0], allowed_prefixes()):
        raise ForbiddenFunction(
            f"{name!r} is not in an allowed module: functions must live in an INSTALLED_APPS "
            "module or in a module listed in DJASYNC['ALLOWED_MODULES']"
        )
    return name


def display_name(name: str, args: Any) -> str:
    """Return the name a job is shown by (admin list, log lines): for a Task job, the Task's path.

    Display only: a worker still resolves ``name``, and ``run_task`` checks the Task's path
    through the allow-list before importing it. A path the allow-list refuses (a row written by
    hand naming ``os.system``, say) is not shown; this checks the string and imports nothing.
    """
    if name != TASK_RUNNER or not isinstance(args, list) or not args:
        return name
    try:
        return check_name(args[0])
    except ForbiddenFunction:
        return name


def name_of(function: Any) -> str:
    """Return the dotted name ``schedule()`` stores for a callable or a name."""
    if isinstance(function, str):
        return function
    # A Django Task object (django.tasks) or functools.wraps'd callable carries the real function.
    target = getattr(function, "func", function)
    if inspect.ismethod(target) and inspect.isclass(target.__self__):
        owner = target.__self__
        return f"{owner.__module__}.{owner.__qualname__}.{target.__name__}"
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise ForbiddenFunction(
            f"{function!r} has no importable dotted name (lambdas, closures and nested "
            "functions cannot be scheduled); pass a module-level function"
        )
    return f"{module}.{qualname}"


def resolve(name: str) -> Callable[..., Any]:
    """Return the callable a dotted name points at, if it is allowed."""
    check_name(name)
    parts = name.split(".")
    # Import the longest importable module prefix, then walk attributes (``mod.Class.method``).
    module = None
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # this prefix is not a module: try a shorter one
            raise  # the module exists but imports something missing: a real error
        break
    if module is None:
        raise FunctionNotFound(f"{name!r}: no module of it can be imported")
    target: Any = module
    for attribute in parts[split:]:
        try:
            target = getattr(target, attribute)
        except AttributeError:
            raise FunctionNotFound(f"{name!r}: {target!r} has no attribute {attribute!r}") from None
    target = getattr(target, "func", target)  # django.tasks Task objects wrap the function
    if not callable(target):
        raise FunctionNotFound(f"{name!r} is not callable")
    defined_in = getattr(target, "__module__", None) or ""
    if not _in_prefixes(defined_in, allowed_prefixes()):
        raise ForbiddenFunction(
            f"{name!r} resolves to an object defined in {defined_in or 'an unknown module'!r}, "
            "which is not an allowed module"
        )
    return target
