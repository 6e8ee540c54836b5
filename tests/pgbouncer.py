"""Start a real PgBouncer in front of the test database: Debian's ``pgbouncer`` package (1.18
on Debian 12), or the newer one tools/pgbouncer_build.py builds into a cache (1.21+: prepared
statements through the pooler, ``max_prepared_statements``).

Used by tests/test_pgbouncer.py, tests/test_network.py and bench/pgbouncer.py. Each instance has
its own directory (ini, userlist), listens on a free port of 127.0.0.1 only (no Unix socket), or
on another address inside a network namespace (then also on a Unix socket in its directory,
which the test process reaches from outside it), and is stopped by :meth:`PgBouncer.stop`.
PgBouncer refuses to run as root: as root it is started with ``-u`` and an unprivileged user,
which must be able to read its directory.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:  # a script (bench/pgbouncer.py), not pytest
    sys.path.insert(0, str(ROOT / "tools"))

import pgbouncer_build  # noqa: E402  (tools/pgbouncer_build.py: the pinned newer PgBouncer)

#: Who runs PgBouncer when we are root (it will not run as root).
RUN_AS_WHEN_ROOT = "nobody"
#: The first PgBouncer that carries prepared statements in transaction mode.
TRACKS_PREPARED = (1, 21)

#: The PgBouncer recipe of docs/howto/pgbouncer.md ("Network failures behind PgBouncer"): its
#: client sockets end a silent peer as the server recipe's do (howto/network-failures.md), 6 s
#: after the last packet heard or after unacknowledged data; PgBouncer then closes the
#: client's server connection, and PostgreSQL rolls its transaction back. ``tcp_user_timeout``
#: needs PgBouncer 1.13+ (Linux); PgBouncer applies all of them to its server sockets too.
CLIENT_TCP_RECIPE = {
    "tcp_keepalive": "1",
    "tcp_keepidle": "3",
    "tcp_keepintvl": "1",
    "tcp_keepcnt": "3",
    "tcp_user_timeout": "6000",
}


#: The whole recipe of docs/howto/pgbouncer.md's ini: the client TCP settings, and a retry of
#: PostgreSQL's login within 1 s after a failed one (15 s by default, during which every client
#: is refused with the cached error: the chaos run saw a daemon 12.7 s from back after a
#: restart).
RECIPE = {**CLIENT_TCP_RECIPE, "server_login_retry": "1"}


def executable() -> str | None:
    """PgBouncer's program, if installed (Debian puts it in /usr/sbin)."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


def built_executable() -> str | None:
    """The newer PgBouncer tools/pgbouncer_build.py built into its cache, if it is there."""
    found = pgbouncer_build.built()
    return str(found) if found is not None else None


def version(program: str | None = None) -> tuple[int, ...] | None:
    """The version of ``program`` (default: the installed PgBouncer), e.g. (1, 18, 0); None if
    there is no such program."""
    program = program or executable()
    if program is None:
        return None
    out = subprocess.run([program, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x or 0) for x in found.groups()) if found else None


def dotted(version: tuple[int, ...] | None) -> str:
    return ".".join(map(str, version or ()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgBouncer:
    directory: Path
    port: int
    process: subprocess.Popen
    #: The program's version, e.g. (1, 24, 1).
    version: tuple[int, ...]
    #: The server PgBouncer forwards to (host, port, user, password): the target's conninfo.
    target: dict[str, str]
    log: Path
    #: Where this process reaches it: 127.0.0.1, or its Unix socket's directory when it runs
    #: in another network namespace.
    local_host: str = "127.0.0.1"
    #: Where it listens for TCP clients (``listen_addr``).
    listen_addr: str = "127.0.0.1"

    def conninfo(self, **overrides: Any) -> dict[str, Any]:
        """Connection parameters that reach the target's database through this PgBouncer, from
        this process."""
        return {**self.target, "host": self.local_host, "port": str(self.port), **overrides}

    def remote_conninfo(self, **overrides: Any) -> dict[str, Any]:
        """The same through its TCP address (``listen_addr``), e.g. for another namespace."""
        return {**self.target, "host": self.listen_addr, "port": str(self.port), **overrides}

    def url(self, **overrides: Any) -> str:
        return make_conninfo(**self.conninfo(**overrides))

    def remote_url(self, **overrides: Any) -> str:
        return make_conninfo(**self.remote_conninfo(**overrides))

    def admin(self, command: str) -> list[tuple[Any, ...]]:
        """Run a command on PgBouncer's admin console (``SHOW POOLS``, ``SHOW STATS`` …)."""
        params = self.conninfo(dbname="pgbouncer")
        with psycopg.connect(**params, autocommit=True, prepare_threshold=None) as conn:
            return conn.execute(command).fetchall()

    def admin_dicts(self, command: str) -> list[dict[str, Any]]:
        """Like :meth:`admin`, each row a dict by column name."""
        params = self.conninfo(dbname="pgbouncer")
        with psycopg.connect(**params, autocommit=True, prepare_threshold=None) as conn:
            cursor = conn.execute(command)
            names = [column.name for column in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(directory: Path, target: dict[str, str], *, pool_mode: str = "transaction",
          pool_size: int = 6, max_prepared_statements: int | None = None,
          program: str | None = None, listen_addr: str = "127.0.0.1",
          namespace: str | None = None, settings: dict[str, str] | None = None) -> PgBouncer:
    """Start ``program`` (default: the installed PgBouncer) in ``directory`` for every database
    of the ``target`` server; wait until it accepts connections. ``max_prepared_statements``
    needs PgBouncer 1.21 or newer (from 1.24 its default is 200, so 0 turns it off).

    ``namespace``: run it inside that network namespace (``ip netns exec``), listening on
    ``listen_addr`` there and on a Unix socket in ``directory`` for this process. ``settings``:
    more ``[pgbouncer]`` settings (e.g. :data:`CLIENT_TCP_RECIPE`), over the defaults here."""
    program = program or executable()
    if program is None:
        raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
    found_version = version(program)
    if found_version is None:
        raise RuntimeError(f"{program} is not PgBouncer (its --version says nothing of it)")
    if max_prepared_statements is not None and found_version < TRACKS_PREPARED:
        raise ValueError(f"PgBouncer {dotted(found_version)} has no max_prepared_statements")
    directory.mkdir(parents=True, exist_ok=True)
    user = target.get("user") or pwd.getpwuid(os.geteuid()).pw_name
    server = f"host={target.get('host') or '127.0.0.1'} port={target.get('port') or 5432}"
    if target.get("password"):
        server += f" password={target['password']}"
    password = (target.get("password") or "").replace('"', '""')
    (directory / "userlist.txt").write_text(f'"{user}" "{password}"\n')
    log = directory / "pgbouncer.log"
    for attempt in range(5):  # a free port may be taken between our look and PgBouncer's bind
        port = _free_port()
        ini_settings = {
            "listen_addr": listen_addr,
            "listen_port": str(port),
            "unix_socket_dir": str(directory) if namespace else "",
            "auth_type": "trust",
            "auth_file": str(directory / "userlist.txt"),
            "admin_users": user,
            "pool_mode": pool_mode,
            "default_pool_size": str(pool_size),
            "max_client_conn": "500",
            # psycopg and Django send nothing PgBouncer does not know; jdbc-style extras would
            # go here. statement_timeout is *not* listed: a client must not be able to set it.
            "ignore_startup_parameters": "extra_float_digits",
            "server_lifetime": "3600",
            "server_idle_timeout": "60",
            "log_connections": "0",
            "log_disconnections": "0",
        }
        if max_prepared_statements is not None:
            ini_settings["max_prepared_statements"] = str(max_prepared_statements)
        ini_settings.update(settings or {})
        ini = directory / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = {server}\n\n[pgbouncer]\n"
            + "".join(f"{key} = {value}\n" for key, value in ini_settings.items())
        )
        command = [program, str(ini)]
        if os.geteuid() == 0:
            _open_to(directory, RUN_AS_WHEN_ROOT)
            command[1:1] = ["-u", RUN_AS_WHEN_ROOT]
        if namespace:
            command[:0] = ["ip", "netns", "exec", namespace]  # it execs: the pid is PgBouncer's
        with log.open("ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        bouncer = PgBouncer(directory, port, process, found_version, dict(target), log,
                            local_host=str(directory) if namespace else "127.0.0.1",
                            listen_addr=listen_addr)
        if _wait_ready(bouncer):
            return bouncer
        bouncer.stop()
        if attempt == 4 or "Address already in use" not in log.read_text(errors="replace"):
            raise RuntimeError(f"pgbouncer did not start; its log:\n{log.read_text()[-2000:]}")
    raise AssertionError("unreachable")


def _wait_ready(bouncer: PgBouncer, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bouncer.process.poll() is not None:
            return False
        try:
            with psycopg.connect(**bouncer.conninfo(), connect_timeout=2,
                                 prepare_threshold=None) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            time.sleep(0.05)
    return False


def _open_to(directory: Path, username: str) -> None:
    """Let ``username`` read ``directory`` and traverse its parents (pytest's tmp dirs are 0700)."""
    path = directory
    while path != path.parent:
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(mode | stat.S_IXOTH)
        path = path.parent
    for child in directory.iterdir():
        child.chmod(child.stat().st_mode | stat.S_IROTH)
    directory.chmod(directory.stat().st_mode | stat.S_IROTH | stat.S_IWOTH | stat.S_IXOTH)
