"""What a PyPI user installs: the wheel and sdist are built from a copy of this checkout, the
wheel is installed in a clean virtualenv, and what a Django project needs must be in it.

The build uses the setuptools of the dev group (``--no-isolation``: no download, a few seconds);
the clean virtualenv gets the wheel without its dependencies and borrows them from this one, so
the test needs no network either.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

import djasync
from tests.daemon import ROOT

pytestmark = pytest.mark.packaging

#: What the copy of the checkout leaves out: environments, caches and earlier builds.
IGNORED = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", "dist",
                                 ".mypy_cache", ".pytest_cache", ".ruff_cache", ".peers-venv",
                                 "work", "_build")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def run(*command: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run([str(part) for part in command], capture_output=True, text=True,
                               timeout=120, **kwargs)
    assert completed.returncode == 0, (command, completed.stdout[-3000:], completed.stderr[-3000:])
    return completed


def build_can_run() -> str | None:
    """Why the build cannot run here, or None."""
    for module in ("build", "setuptools"):
        if importlib.util.find_spec(module) is None:
            return f"the {module!r} package is not installed (it is in the dev dependency group)"
    from importlib.metadata import version

    from packaging.requirements import Requirement

    for requirement in map(Requirement, PYPROJECT["build-system"]["requires"]):
        if version(requirement.name) not in requirement.specifier:
            return f"the installed {requirement.name} {version(requirement.name)} does not " \
                   f"satisfy the build's {requirement}"
    return None


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    reason = build_can_run()
    if reason:
        pytest.skip(reason)
    source = tmp_path_factory.mktemp("source") / "djasync"
    shutil.copytree(ROOT, source, ignore=IGNORED, symlinks=True)
    out = tmp_path_factory.mktemp("dist")
    # No target: the sdist first, then the wheel built from the unpacked sdist, so a file the
    # sdist forgot is missing from the wheel too.
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source)
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def venv(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean virtualenv holding the wheel; this environment's packages (Django, psycopg,
    click, ...) come after it on its path, never this checkout's djasync."""
    path = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", "--without-pip", path)
    python = path / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
        "--no-index", dists["wheel"])
    site_packages = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
                             ).stdout.strip())
    # A .pth line only appends a directory: the outer site-packages' own .pth files (this
    # checkout's editable install among them) are not run.
    (site_packages / "zz_outer_site_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return path


def installed(venv: Path, code: str) -> Any:
    completed = run(venv / "bin" / "python", "-c", code, cwd=venv, env=clean_env())
    return json.loads(completed.stdout)


def clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}


def source_files(package: str, *patterns: str) -> set[str]:
    return {path.relative_to(ROOT).as_posix() for pattern in patterns
            for path in (ROOT / package).glob(pattern) if "__pycache__" not in path.parts}


def test_the_wheel_holds_templates_static_files_migrations_and_type_markers(dists):
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    expected = (source_files("djasync", "templates/**/*.html", "static/**/*.*", "migrations/*.py",
                             "management/commands/*.py", "py.typed")
                | source_files("djasync_worker", "*.py", "py.typed"))
    assert {"djasync/templates/admin/djasync/dashboard.html",
            "djasync/static/djasync/dashboard.css", "djasync/migrations/0001_initial.py",
            "djasync/py.typed", "djasync_worker/py.typed"} <= expected  # the globs find them
    assert expected <= names, sorted(expected - names)
    dist_info = f"djasync-{djasync.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    assert not [name for name in names if name.startswith("tests/")]


def test_the_sdist_holds_the_license_and_changelog_and_not_the_tests(dists):
    with tarfile.open(dists["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml",
            "djasync/py.typed", "djasync/templates/admin/djasync/dashboard.html"} <= names
    # The tests need a PostgreSQL server and tools/, chaos/ and example/: not shipped at all,
    # rather than shipped without what they need (see MANIFEST.in).
    assert not [name for name in names if name.startswith(("tests/", "tools/", "chaos/"))]


def test_twine_check_passes_for_the_wheel_and_the_sdist(dists):
    if importlib.util.find_spec("twine") is None:
        pytest.skip("twine is not installed (it is in the dev dependency group)")
    completed = run(sys.executable, "-m", "twine", "check", "--strict", dists["wheel"],
                    dists["sdist"])
    assert completed.stdout.count("PASSED") == 2, completed.stdout


def test_the_installed_wheel_is_the_one_imported_with_its_version_and_metadata(venv):
    found = installed(venv, """if True:
        import json, djasync, djasync_worker
        from importlib import metadata
        meta = metadata.metadata("djasync")
        scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
        print(json.dumps({
            "file": djasync.__file__, "worker": djasync_worker.__file__,
            "version": djasync.__version__, "metadata_version": metadata.version("djasync"),
            "requires": metadata.requires("djasync"), "extras": meta.get_all("Provides-Extra"),
            "classifiers": meta.get_all("Classifier"), "script": scripts.get("djasync-worker"),
            "license": meta["License-Expression"], "urls": meta.get_all("Project-URL"),
        }))""")
    assert found["file"].startswith(str(venv)) and found["worker"].startswith(str(venv))
    assert found["version"] == found["metadata_version"] == djasync.__version__
    assert found["script"] == "djasync_worker.cli:main"
    assert found["license"] == "BSL-1.0"
    assert "psycopg>=3.2.4" in found["requires"]  # the application chooses psycopg's build
    assert {"binary", "c", "metrics", "tasks"} <= set(found["extras"])
    assert "dev" not in found["extras"]  # a dependency group, never published
    assert {"Typing :: Typed", "Framework :: Django :: 5.2", "Framework :: Django :: 6.0",
            "Framework :: Django :: 6.1"} <= set(found["classifiers"])
    assert any(url.startswith("Changelog, ") for url in found["urls"])


def test_the_classifiers_are_ones_pypi_accepts():
    trove_classifiers = pytest.importorskip("trove_classifiers")
    unknown = set(PYPROJECT["project"]["classifiers"]) - set(trove_classifiers.classifiers)
    assert not unknown


def test_the_installed_entry_points_run(venv):
    env = clean_env()
    version = run(venv / "bin" / "djasync-worker", "--version", cwd=venv, env=env).stdout
    assert version.startswith(f"djasync {djasync.__version__} (Django ")
    usage = run(venv / "bin" / "python", "-m", "djasync_worker", "--help", cwd=venv, env=env)
    assert "--concurrency" in usage.stdout
    # manage.py finds the djasync_worker command in the installed app.
    (venv / "settings_for_check.py").write_text(
        "SECRET_KEY = 'x'\nINSTALLED_APPS = ['django.contrib.contenttypes', 'djasync']\n"
        "DATABASES = {'default': {'ENGINE': 'django.db.backends.postgresql', 'NAME': 'x'}}\n")
    env.update(PYTHONPATH=str(venv), DJANGO_SETTINGS_MODULE="settings_for_check")
    help_text = run(venv / "bin" / "python", "-m", "django", "help", "djasync_worker", cwd=venv,
                    env=env).stdout
    assert help_text.startswith("Usage: ") and "--concurrency" in help_text
