"""The files in deploy/ and docker-compose.yml: what they promise holds."""

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import ROOT

UNIT = ROOT / "deploy" / "djasync-worker.service"

#: systemd-analyze's exposure score of the unit (0 = locked down, 10 = no sandbox); the unit
#: without its sandboxing section scored 9.2.
MAX_EXPOSURE = 2.0


def exposure(unit_text: str, tmp_path) -> float:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "djasync-worker.service"
    unit.write_text(unit_text)
    completed = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                               capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", completed.stdout)
    if completed.returncode != 0 and not found:
        pytest.skip(f"systemd-analyze security --offline=yes does not run here: "
                    f"{completed.stderr.strip()[:200]}")
    assert found, completed.stdout
    return float(found.group(1))


def test_the_systemd_unit_is_sandboxed_to_an_ok_exposure_score(tmp_path):
    assert exposure(UNIT.read_text(), tmp_path) <= MAX_EXPOSURE


def test_the_score_measures_the_sandbox_section(tmp_path):
    text = UNIT.read_text()
    unsandboxed = text.split("# -- Sandboxing", 1)[0] + "[Install]" + text.split("[Install]")[1]
    assert exposure(unsandboxed, tmp_path) > 9


def test_docker_compose_runs_a_postgresql_version_the_documentation_lists():
    compose = (ROOT / "docker-compose.yml").read_text()
    [major] = re.findall(r"image: postgres:(\d+)", compose)
    # The sentence saying which versions djasync is tested on, in the README or the docs site.
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    pattern = re.compile(r"(?:developed|tested) (?:against|on|with) PostgreSQL ([\d, and]+\d)")
    listed = {version for path in texts for sentence in pattern.findall(path.read_text())
              for version in re.findall(r"\d+", sentence)}
    assert listed, "neither the README nor docs/ says which PostgreSQL versions are tested"
    assert major in listed, (major, listed)


def test_docker_compose_mounts_its_volume_where_the_postgresql_18_image_keeps_data():
    compose = (ROOT / "docker-compose.yml").read_text()
    [major] = re.findall(r"image: postgres:(\d+)", compose)
    [mount] = re.findall(r"- \w+:(/var/lib/postgresql\S*)", compose)
    assert mount == ("/var/lib/postgresql" if int(major) >= 18 else "/var/lib/postgresql/data")


def unit_settings(name: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
            if line.startswith(f"{name}=")]


def syscall_set(group: str) -> set[str]:
    """The system calls of a systemd group (``@system-service``), its nested groups expanded."""
    listing = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True,
                             text=True, timeout=30, check=True).stdout.splitlines()[1:]
    names: set[str] = set()
    for entry in (line.strip() for line in listing):
        if entry.startswith("@"):
            names |= syscall_set(entry)
        elif entry and not entry.startswith("#"):
            names.add(entry)
    return names


@pytest.mark.daemon
@pytest.mark.django_db(transaction=True)
def test_the_units_system_call_filter_and_address_families_allow_what_the_worker_does(tmp_path):
    """Run a worker (two children, metrics on, jobs to do) under strace: every system call it
    makes must pass the unit's SystemCallFilter=, every socket its RestrictAddressFamilies=."""
    import djasync
    from djasync.models import Job, Status
    from tests import jobs
    from tests.daemon import worker_env
    from tests.test_worker_cli import make_project

    if shutil.which("strace") is None or shutil.which("systemd-analyze") is None:
        pytest.skip("strace and systemd-analyze are needed")
    for number in range(10):
        djasync.schedule(jobs.add, args=[number, 1])
    trace = tmp_path / "strace.txt"
    script = Path(sys.executable).parent / "djasync-worker"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in worker_env().items() if not k.startswith("DJASYNC_WORKER_")}
    completed = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), str(script), "--settings", "mysite.settings",
         "--burst", "-c", "2", "--metrics-port", str(port)],
        cwd=make_project(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    if completed.returncode != 0 and "ptrace" in completed.stderr:
        pytest.skip(f"strace cannot trace here: {completed.stderr.strip()[:200]}")
    assert completed.returncode == 0, completed.stderr
    assert not Job.objects.exclude(status=Status.SUCCEEDED).exists()
    text = trace.read_text()
    used = set(re.findall(r"^\d+ +([a-z0-9_]+)\(", text, re.MULTILINE))
    allowed: set[str] = set()
    for entry in unit_settings("SystemCallFilter"):
        deny = entry.startswith("~")
        groups = entry.lstrip("~").split()
        calls = set().union(*(syscall_set(g) if g.startswith("@") else {g} for g in groups))
        allowed = allowed - calls if deny else allowed | calls
    assert len(used) > 30, sorted(used)  # the trace did see the worker
    assert used <= allowed, sorted(used - allowed)
    families = set(re.findall(r"socket\((AF_[A-Z0-9]+)", text))
    [restricted] = unit_settings("RestrictAddressFamilies")
    assert families and families <= set(restricted.split()), families
