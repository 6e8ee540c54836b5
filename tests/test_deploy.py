"""The files in deploy/ and docker-compose.yml: what they promise holds."""

import re
import shutil
import subprocess

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
