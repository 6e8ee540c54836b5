"""Start ``djasync-worker`` as a real subprocess against the test database, and wait on rows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from tests.conftest import conninfo

ROOT = Path(__file__).resolve().parent.parent


def database_url(**overrides: Any) -> str:
    params = conninfo()
    params.update(overrides)
    return make_conninfo(**params)


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url()
    env["PYTHONPATH"] = str(ROOT)
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


def short_lease_env(tmp_path: Path, seconds: float = 1) -> dict[str, str]:
    """A worker environment whose settings module ``lease_settings`` has short leases."""
    (tmp_path / "lease_settings.py").write_text(
        "from tests.settings import *  # noqa\n"
        f"DJASYNC = {{**DJASYNC, 'LEASE_SECONDS': {seconds}}}\n"
    )
    return worker_env(PYTHONPATH=f"{tmp_path}:{worker_env()['PYTHONPATH']}")


def start_worker(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "djasync_worker", "--settings", "tests.settings",
               "--log-level", "debug", *args]
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=ROOT, env=env or worker_env(), stdout=out,
                                stderr=subprocess.STDOUT)


def run_worker(*args: str, timeout: float = 60, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "djasync_worker", "--settings", "tests.settings", *args]
    return subprocess.run(command, cwd=ROOT, env=env or worker_env(), capture_output=True,
                          text=True, timeout=timeout)


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition",
             interval: float = 0.02, why: Callable[[], str] | None = None) -> Any:
    """Return the first truthy value of ``condition()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f": {why()}" if why is not None else ""))
        time.sleep(interval)


def stop(process: subprocess.Popen, timeout: float = 20) -> int:
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
