"""Every ```python sample of the docs (docs/**/*.md and README.md) runs, so none can rot.

How a page's samples run (one test per page, samples in page order, one namespace per page):

- A sample whose first line is a file name comment, ``# shop/jobs.py`` (anything may follow
  it: ``# shop/jobs.py: the jobs``), becomes that module: later samples of the page import it
  (``from shop.jobs import send_receipt``), and its functions are allowed job functions (its
  top-level package joins ``DJASYNC["ALLOWED_MODULES"]`` while the page runs). A ``*/urls.py``
  module becomes the ``ROOT_URLCONF`` for the rest of the page.
- A settings sample (``# mysite/settings.py``) is checked: its ``DJASYNC`` through djasync's
  own validation, and its ``DJASYNC`` and ``TASKS`` apply to the rest of the page.
- A ``django.test.TestCase`` that a sample defines is run, and must pass.
- Everything runs in the test's transaction, which rolls back at the end (Django configured with
  tests.settings; tests.jobs holds importable job functions).
- A sample preceded by the line ``<!-- skip-sample: reason -->`` is not run; keep them rare.

The ```console blocks that show ``djasync-worker --help`` are compared with click's own output,
and the reference tables with the code: every setting, every management-command option and
every metric the worker serves is documented, and nothing else is.
"""

from __future__ import annotations

import re
import sys
import types
import unittest
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import pytest
from django.conf import settings
from django.test import TestCase, override_settings

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
PAGES = [page for page in PAGES if "_build" not in page.parts]

FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<info>[^\n]*)$")
SKIP = re.compile(r"^<!--\s*skip-sample:\s*(?P<reason>\S.*?)\s*-->$")
MODULE_COMMENT = re.compile(r"^#\s*(?P<path>[A-Za-z_][\w/]*)\.py\b")


@dataclass
class Sample:
    page: Path
    line: int
    language: str
    code: str
    skip_reason: str | None

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def samples(page: Path) -> list[Sample]:
    """Return the fenced blocks of a Markdown page, with the skip marker that precedes each."""
    found: list[Sample] = []
    lines = page.read_text().splitlines()
    index = 0
    previous = ""
    while index < len(lines):
        match = FENCE.match(lines[index].strip())
        if not match:
            if lines[index].strip():
                previous = lines[index].strip()
            index += 1
            continue
        fence, info = match["fence"], match["info"].strip()
        indent = len(lines[index]) - len(lines[index].lstrip())
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][indent:])
            index += 1
        index += 1
        skip = SKIP.match(previous)
        language = info.split()[0].strip("{}") if info else ""
        found.append(Sample(page, start + 1, language, "\n".join(body) + "\n",
                            skip["reason"] if skip else None))
        previous = ""
    return found


def python_samples(page: Path) -> list[Sample]:
    return [sample for sample in samples(page) if sample.language == "python"]


def pages_with_python() -> list[Path]:
    return [page for page in PAGES if python_samples(page)]


def test_the_docs_have_python_samples_and_few_skips() -> None:
    every = [sample for page in PAGES for sample in python_samples(page)]
    skipped = [sample for sample in every if sample.skip_reason]
    assert len(every) >= 25, f"only {len(every)} python samples found: is the extraction broken?"
    assert len(skipped) * 5 <= len(every), (
        "more than a fifth of the samples are skipped: "
        + ", ".join(sample.where() for sample in skipped)
    )


def test_a_skip_marker_says_why_and_stands_right_before_a_fence() -> None:
    for page in PAGES:
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines):
            if not line.strip().startswith("<!--") or "skip-sample" not in line:
                continue
            assert SKIP.match(line.strip()), f"{page}:{number + 1}: write <!-- skip-sample: why -->"
            following = next((other for other in lines[number + 1:] if other.strip()), "")
            assert FENCE.match(following.strip()), (
                f"{page}:{number + 1}: the skip marker must come directly before a fence"
            )


def _keeping_the_connection(case: type[TestCase]) -> type[TestCase]:
    """``case`` whose class teardown rolls its atomic blocks back but leaves the connection open.

    Django's ``TestCase.tearDownClass`` closes every connection; here the page's samples run in
    one transaction (pytest-django's), so the close would break the connection for the page's
    next TestCase (Django keeps the closed connection while inside an atomic block)."""

    def tear_down_class(cls: type[TestCase]) -> None:
        cls._rollback_atomics(cls.cls_atomics)  # type: ignore[attr-defined]
        super(TestCase, cls).tearDownClass()

    return type(case.__name__, (case,), {"tearDownClass": classmethod(tear_down_class),
                                         "__module__": case.__module__})


class _Page:
    """The modules, settings and namespace that one page's samples share."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack
        self.namespace: dict[str, object] = {"__name__": "__docs_sample__"}
        self.modules: dict[str, types.ModuleType] = {}
        self.saved_modules: dict[str, types.ModuleType | None] = {}
        self.packages: list[str] = []

    def run(self, sample: Sample) -> None:
        first = sample.code.lstrip().splitlines()[0] if sample.code.strip() else ""
        match = MODULE_COMMENT.match(first)
        code = compile(sample.code, sample.where(), "exec")
        if match is None:
            exec(code, self.namespace)
            self._run_test_cases(self.namespace, sample)
            return
        dotted = match["path"].replace("/", ".")
        module = self._module(dotted)
        exec(code, module.__dict__)
        if dotted.rsplit(".", 1)[-1] == "settings":
            self._apply_settings(module, sample)
        else:
            self._allow(dotted.split(".")[0])
        if dotted.endswith(".urls") or dotted == "urls":
            self.stack.enter_context(override_settings(ROOT_URLCONF=dotted))
        self._run_test_cases(module.__dict__, sample)

    def _module(self, dotted: str) -> types.ModuleType:
        parts = dotted.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name in self.modules:
                continue
            self.saved_modules.setdefault(name, sys.modules.get(name))
            module = types.ModuleType(name)
            module.__file__ = f"<docs sample {name.replace('.', '/')}.py>"
            if depth < len(parts):
                module.__path__ = []
            sys.modules[name] = module
            self.modules[name] = module
            if depth > 1:
                setattr(self.modules[".".join(parts[:depth - 1])], parts[depth - 1], module)
        return self.modules[dotted]

    def _allow(self, package: str) -> None:
        if package in self.packages:
            return
        self.packages.append(package)
        current = dict(settings.DJASYNC)
        allowed = tuple(current.get("ALLOWED_MODULES", ())) + (package,)
        self.stack.enter_context(override_settings(DJASYNC={**current, "ALLOWED_MODULES": allowed}))

    def _apply_settings(self, module: types.ModuleType, sample: Sample) -> None:
        from djasync import conf

        values = {name: getattr(module, name) for name in ("DJASYNC", "TASKS")
                  if hasattr(module, name)}
        if "DJASYNC" in values:
            # The sample's own values over the suite's (whose BACKOFF keeps retries quick).
            merged = {**settings.DJASYNC, **values["DJASYNC"]}
            if "ALLOWED_MODULES" in values["DJASYNC"]:
                merged["ALLOWED_MODULES"] = (*values["DJASYNC"]["ALLOWED_MODULES"],
                                             *self.packages)
            values["DJASYNC"] = merged
        if values:
            self.stack.enter_context(override_settings(**values))
        if "DJASYNC" in values:
            from djasync.checks import check_periodic, check_settings

            conf.get()  # raises ImproperlyConfigured for a bad key or value
            errors = check_settings() + check_periodic()
            assert not errors, f"{sample.where()}: manage.py check would say {errors}"
        if "TASKS" in values:
            from djasync.backends import DjasyncBackend

            for alias, options in values["TASKS"].items():
                if options["BACKEND"] == "djasync.backends.DjasyncBackend":
                    DjasyncBackend(alias, options)
        if hasattr(module, "INSTALLED_APPS"):
            assert "djasync" in module.INSTALLED_APPS, f"{sample.where()}: djasync not installed"

    def _run_test_cases(self, namespace: dict[str, object], sample: Sample) -> None:
        cases = [value for value in list(namespace.values())
                 if isinstance(value, type) and issubclass(value, TestCase)
                 and value is not TestCase and value.__module__ == namespace["__name__"]
                 and not getattr(value, "_docs_sample_ran", False)]
        for case in cases:
            case._docs_sample_ran = True  # type: ignore[attr-defined]
            suite = unittest.defaultTestLoader.loadTestsFromTestCase(_keeping_the_connection(case))
            result = unittest.TestResult()
            suite.run(result)
            problems = result.errors + result.failures
            assert result.testsRun and not problems, (
                f"{sample.where()}: {case.__name__} failed:\n"
                + "\n".join(text for _, text in problems)
            )

    def close(self) -> None:
        for name, module in self.saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture
def page_context(db: None) -> Iterator[_Page]:
    from django import conf as django_conf

    with ExitStack() as stack:
        if hasattr(django_conf, "DEPRECATED_EMAIL_SETTINGS"):  # Django 6.1: MAILERS, not EMAIL_*
            locmem = {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}
            stack.enter_context(override_settings(MAILERS={"default": locmem}))
        page = _Page(stack)
        try:
            yield page
        finally:
            page.close()


@pytest.mark.parametrize("page", pages_with_python(), ids=lambda page: str(page.relative_to(ROOT)))
def test_every_python_sample_of_the_page_runs(page: Path, page_context: _Page) -> None:
    from django.core import mail

    mail.outbox = []
    for sample in python_samples(page):
        if sample.skip_reason:
            continue
        try:
            page_context.run(sample)
        except ModuleNotFoundError as exc:
            if exc.name == "django.tasks" and find_spec("django.tasks") is None:
                pytest.skip("django.tasks needs Django 6 (the backport is django_tasks)")
            raise AssertionError(f"the sample at {sample.where()} failed: {exc!r}") from exc
        except Exception as exc:
            raise AssertionError(f"the sample at {sample.where()} failed: {exc!r}") from exc


def _help_text(block: str) -> tuple[str, str] | None:
    """Split a console block showing ``$ <command> --help`` into the command and its output."""
    lines = block.splitlines()
    if not lines or not lines[0].startswith("$ ") or not lines[0].rstrip().endswith("--help"):
        return None
    return lines[0][2:].strip(), "\n".join(lines[1:]).strip()


def test_console_blocks_showing_help_match_the_commands_own_output() -> None:
    from click.testing import CliRunner

    from djasync_worker.cli import cli

    compared = 0
    for page in PAGES:
        for sample in samples(page):
            if sample.language != "console" or (shown := _help_text(sample.code)) is None:
                continue
            command, text = shown
            assert command.split()[0] == "djasync-worker", f"{sample.where()}: unknown command"
            result = CliRunner().invoke(cli, command.split()[1:], prog_name="djasync-worker",
                                        terminal_width=80)
            normalise = _normalise_help
            assert normalise(text) == normalise(result.output), (
                f"{sample.where()}: the help shown differs from `{command}`:\n{result.output}"
            )
            compared += 1
    assert compared, "no console block shows djasync-worker --help"


def _normalise_help(text: str) -> str:
    """Compare help texts word by word: line wrapping and the CPU-count default may differ."""
    text = " ".join(text.split())
    return re.sub(r"(--concurrency [^\[]*\[default: )\d+", r"\1N", text)


def _section(page: str, heading: str) -> str:
    """Return the text of a page from ``heading`` to the next heading of the same level."""
    text = (ROOT / page).read_text()
    level = heading.split()[0]
    start = text.index(heading + "\n")
    following = re.search(rf"^{level} ", text[start + len(heading):], flags=re.M)
    return text[start:start + len(heading) + following.start()] if following else text[start:]


def test_the_settings_reference_lists_every_djasync_setting_and_no_other() -> None:
    from dataclasses import fields

    from djasync.conf import Settings

    table = (ROOT / "docs" / "reference" / "settings.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", table, flags=re.M))
    assert documented == {field.name for field in fields(Settings) if field.name.isupper()}


@pytest.mark.parametrize("command", ["flush_queue", "queue_health", "prune_jobs"])
def test_the_management_commands_reference_lists_every_option_of_the_command(command: str) -> None:
    from django.core.management import load_command_class

    parser = load_command_class("djasync", command).create_parser("manage.py", command)
    base = load_command_class("djasync", "queue_health").__class__.__mro__[1]
    base_options = {option for action in base().create_parser("manage.py", "x")._actions
                    for option in action.option_strings}
    options = {option for action in parser._actions for option in action.option_strings
               if option.startswith("--") and option not in base_options}
    section = _section("docs/reference/management-commands.md", f"## `{command}`")
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", section))
    assert options <= mentioned, f"{command}: undocumented {sorted(options - mentioned)}"
    assert mentioned <= options, f"{command}: no such option {sorted(mentioned - options)}"


def test_the_metrics_reference_lists_every_metric_the_worker_serves() -> None:
    source = (ROOT / "djasync_worker" / "metrics.py").read_text()
    served = set(re.findall(r'"(djasync_[a-z_]+)"', source))
    served |= {f"djasync_jobs_{name}_total"
               for name in re.findall(r'= counter\("([a-z_]+)"', source)}
    # prometheus-client adds _total to a counter's name when it is served.
    served = {name + "_total" if name == "djasync_listen_reconnects" else name for name in served}
    table = (ROOT / "docs" / "reference" / "metrics.md").read_text()
    documented = set(re.findall(r"`(djasync_[a-z_]+)`", table))
    assert served, "no metric names found in djasync_worker/metrics.py"
    assert served == documented, (
        f"undocumented: {sorted(served - documented)}; not served: {sorted(documented - served)}"
    )


def test_the_api_reference_lists_every_field_of_jobs_and_attempts() -> None:
    from djasync.models import Attempt, Job

    text = (ROOT / "docs" / "reference" / "api.md").read_text()
    for model in (Job, Attempt):
        for field in model._meta.get_fields():
            if field.concrete and not field.primary_key and field.name != "job":
                assert f"`{field.name}`" in text, f"{model.__name__}.{field.name} is undocumented"
