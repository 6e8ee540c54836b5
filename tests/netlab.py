"""A network lab on this machine: hosts as network namespaces, partitions as silent drops.

The database "host" is a namespace holding a bridge and a throwaway PostgreSQL (tools/pg.py)
listening on the bridge's address; each worker "host" is a namespace joined to the bridge by a
veth pair. A partition is an nftables rule in the database's namespace that drops packets
silently (no reset, no FIN), which is how a real network failure looks and what TCP notices
last. Nothing is added to the machine's own namespace: the test process reaches the server
through its Unix socket (a file, which no network namespace hides).

Needs root, ``ip`` and ``nft``; :func:`unavailable` says why not when they are missing.
Everything made is named with a random tag and removed by :meth:`Lab.close`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from tests.daemon import wait_for

ROOT = Path(__file__).resolve().parent.parent

#: The server recipe of the docs, so that the server ends a cut-off worker's session (and
#: frees its job) within seconds: 5 + 2 * 3 = 11 s of silence, or 10 s of unacked data.
SERVER_RECIPE = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
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


def unavailable() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces and nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` (Debian: apt-get install iproute2 nftables)"
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


class Lab:
    def __init__(self, server_settings: dict[str, str] | None = None) -> None:
        self.tag = secrets.token_hex(2)
        self.prefix = f"djt-{self.tag}-"
        self.subnet = f"10.211.{secrets.randbelow(200) + 20}"
        self.db_ns = f"{self.prefix}db"
        self.db_address = f"{self.subnet}.1"
        self.hosts: dict[str, str] = {}  # name -> address
        self.processes: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None
        self.cuts = 0
        self.active_cuts: list[str] = []
        self._namespaces: list[str] = []
        try:
            self._make_database_host(server_settings or {})
        except BaseException:
            self.close()
            raise

    # -- building -----------------------------------------------------------------------------

    def _netns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _make_database_host(self, settings: dict[str, str]) -> None:
        import json

        self._netns(self.db_ns)
        _run("ip", "-n", self.db_ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.db_ns, "addr", "add", f"{self.db_address}/24", "dev", "br0")
        _run("ip", "-n", self.db_ns, "link", "set", "br0", "up")
        settings = {"listen_addresses": f"127.0.0.1,{self.db_address}", **settings}
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.db_ns, sys.executable, "-c", _SERVER_SCRIPT,
             json.dumps(settings), f"{self.subnet}.0/24"],
            cwd=ROOT / "tools", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.server.stdout is not None
        line = self.server.stdout.readline().split()
        if len(line) != 2:
            raise RuntimeError("the lab's PostgreSQL did not start (see the output above)")
        self.datadir, self.port = Path(line[0]), int(line[1])

    def add_host(self, name: str) -> str:
        """Make a worker host joined to the database's bridge; return its address."""
        number = 11 + len(self.hosts)
        ns, address = f"{self.prefix}{name}", f"{self.subnet}.{number}"
        outer, inner = f"djt{self.tag}{number}a", f"djt{self.tag}{number}b"
        self._netns(ns)
        _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        _run("ip", "link", "set", outer, "netns", self.db_ns)
        _run("ip", "link", "set", inner, "netns", ns)
        _run("ip", "-n", self.db_ns, "link", "set", outer, "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inner)
        _run("ip", "-n", ns, "link", "set", inner, "up")
        self.hosts[name] = address
        return address

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

    def cut(self, host: str, port: int | None = None, direction: str = "both") -> str:
        """Drop, silently, what ``host`` and the server send each other (only on the host's
        TCP ``port`` if given, e.g. one connection); return the name of the cut, for heal."""
        self.cuts += 1
        table = f"djtcut{self.cuts}"
        address = self.hosts[host]
        match_in = f"ip saddr {address}" + (f" tcp sport {port}" if port else "")
        match_out = f"ip daddr {address}" + (f" tcp dport {port}" if port else "")
        rules = [f"add table inet {table}"]
        if direction in ("both", "in"):
            rules += [f"add chain inet {table} in {{ type filter hook input priority 0; }}",
                      f"add rule inet {table} in {match_in} drop"]
        if direction in ("both", "out"):
            rules += [f"add chain inet {table} out {{ type filter hook output priority 0; }}",
                      f"add rule inet {table} out {match_out} drop"]
        # Bridged traffic between hosts is not filtered: only the server's own packets are.
        subprocess.run(["ip", "netns", "exec", self.db_ns, "nft", "-f", "-"],
                       input="\n".join(rules) + "\n", check=True, capture_output=True,
                       text=True, timeout=30)
        self.active_cuts.append(table)
        return table

    def heal(self, table: str) -> None:
        _run("ip", "netns", "exec", self.db_ns, "nft", "delete", "table", "inet", table)
        self.active_cuts.remove(table)

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
        for ns in self._namespaces:
            if ns != self.db_ns:
                self._kill_inside(ns)
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
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._namespaces.clear()

    @staticmethod
    def _kill_inside(ns: str) -> None:
        listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                timeout=30)
        for pid in listed.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
