"""A network lab on this machine: hosts as network namespaces, partitions as silent drops.

The namespaces, the bridge and the cuts are tools/netns.py's (the chaos harness uses them too);
the lab adds a throwaway PostgreSQL (tools/pg.py) in the database "host", listening on the
bridge's address, and helpers to run Django and worker processes. The test process reaches
the server through its Unix socket (a file, which no network namespace hides).

Needs root, ``ip`` and ``nft``; :func:`unavailable` says why not when they are missing.
Everything made is named with a random tag and removed by :meth:`Lab.close`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from tests.daemon import wait_for

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:  # a script (tests/measure_partition.py), not pytest
    sys.path.insert(0, str(ROOT / "tools"))

import netns  # noqa: E402  (tools/netns.py: the namespaces and the cuts, shared with chaos/)

__all__ = ["ROOT", "SERVER_RECIPE", "Lab", "unavailable", "wait_for"]

#: The server recipe of the docs (howto/network-failures.md), so that the server ends a cut-off
#: worker's session (and frees its job) within seconds: 6 s after the last packet it heard
#: from the host, or after data it sent went unacknowledged; a statement running meanwhile
#: looks at its socket every second.
SERVER_RECIPE = {
    "tcp_keepalives_idle": "3",
    "tcp_keepalives_interval": "1",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "6000",
    "client_connection_check_interval": "1000",
}

_SERVER_SCRIPT = """
import sys, json
import psycopg
import pg
server = pg.EmbeddedPostgres(settings=json.loads(sys.argv[1]))
server.start()
with open(server.datadir / "pg_hba.conf", "a") as hba:
    hba.write("host all all " + sys.argv[2] +  " trust\\n")
with psycopg.connect(server.url, autocommit=True) as conn:
    conn.execute("SELECT pg_reload_conf()")
print(server.datadir, server.port, flush=True)
sys.stdin.read()  # until the lab closes our stdin
server.close()
"""


def held_by_a_session(conn: psycopg.Connection, job_id: int) -> bool:
    """Whether a transaction in progress holds ``job_id``'s row: its locker (``xmax``) is a
    session's transaction id. Looked up without locking the row: a probe that locks it (as the
    network tests' did, with SKIP LOCKED, for an instant) makes a claim running at that instant
    skip the job, and the test then waits for a claim that passed it over (about one run in ten
    in CI, 2026-12-06, direct and through PgBouncer: the COMMIT had gone through, the next
    claim had found the job locked by the test's own probe)."""
    return conn.execute(
        "SELECT EXISTS (SELECT 1 FROM djasync_job j JOIN pg_stat_activity a "
        "ON a.backend_xid = j.xmax WHERE j.id = %s)", [job_id]).fetchone()[0]


def unavailable() -> str | None:
    """Why the lab cannot run here, or None."""
    return netns.unavailable()


class Lab(netns.Network):
    def __init__(self, server_settings: dict[str, str] | None = None) -> None:
        self.processes: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None
        super().__init__("djt")
        try:
            self._start_server(server_settings or {})
        except BaseException:
            self.close()
            raise

    def _start_server(self, settings: dict[str, str]) -> None:
        import json

        settings = {"listen_addresses": f"127.0.0.1,{self.db_address}", **settings}
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.db_ns, sys.executable, "-c", _SERVER_SCRIPT,
             json.dumps(settings), self.cidr],
            cwd=ROOT / "tools", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.server.stdout is not None
        line = self.server.stdout.readline().split()
        if len(line) != 2:
            raise RuntimeError("the lab's PostgreSQL did not start (see the output above)")
        self.datadir, self.port = Path(line[0]), int(line[1])

    # -- using --------------------------------------------------------------------------------

    @property
    def local_url(self) -> str:
        """The server through its Unix socket, for the test process."""
        return f"postgresql://postgres@/djasync?host={self.datadir}&port={self.port}"

    @property
    def remote_url(self) -> str:
        """The server across the bridge, for the hosts."""
        return f"postgresql://postgres@{self.db_address}:{self.port}/djasync"

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.local_url, autocommit=True, **kwargs)

    def django(self, *argv: str, code: str | None = None) -> str:
        """Run a Django command (or ``python -c code`` with Django set up) against the lab's
        server from this namespace; return its output."""
        env = {**os.environ, "DATABASE_URL": self.local_url, "PYTHONPATH": str(ROOT),
               "DJANGO_SETTINGS_MODULE": "tests.settings"}
        if code is not None:
            argv = ("-c", "import django; django.setup()\n" + code)
        else:
            argv = ("-m", "django", *argv)
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{argv} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def spawn(self, host: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace, its output appended to ``log``."""
        full_env = {**os.environ, "DATABASE_URL": self.remote_url, "PYTHONPATH": str(ROOT),
                    **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        with log.open("ab") as out:
            process = subprocess.Popen(["ip", "netns", "exec", f"{self.prefix}{host}", *argv],
                                       cwd=cwd, env=full_env, stdout=out,
                                       stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    # -- cleaning up --------------------------------------------------------------------------

    def reset(self) -> None:
        """Heal, kill what was spawned, wait for the hosts' sessions to end, empty the job
        tables."""
        for table in list(self.active_cuts):
            self.heal(table)
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
            process.wait(10)
        self.processes.clear()
        with self.connect() as conn:
            wait_for(lambda: not conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE client_addr <<= %s::inet",
                [f"{self.subnet}.0/24"]).fetchone(), 30, "the hosts' sessions to end")
            conn.execute("TRUNCATE djasync_job CASCADE")

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        # Whatever is left in a worker namespace (a child of a killed supervisor dies with it).
        self.kill_hosts()
        if self.server is not None:
            assert self.server.stdin is not None
            with contextlib.suppress(OSError):
                self.server.stdin.close()  # the server script stops PostgreSQL and exits
            try:
                self.server.wait(60)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
            if self.server.stdout is not None:
                self.server.stdout.close()
        super().close()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
