"""Hosts as network namespaces on this machine, and partitions as silent drops.

A :class:`Network` is a "database host" namespace holding a bridge, and "worker hosts", each a
namespace joined to the bridge by a veth pair, with addresses in a private /24 that exists
only inside these namespaces. A cut is an nftables table in the database host's namespace that
drops packets silently (no reset, no FIN), which is how a real network failure looks and what
TCP notices last. Nothing is added to the machine's own namespace.

Used by tests/netlab.py (a PostgreSQL started inside the database host) and by the chaos
harness (which enters the database host itself, so that its own PostgreSQL listens there).
Needs root, ``ip`` and ``nft``; :func:`unavailable` says why not when they are missing.
Everything made is named with a random tag and removed by :meth:`Network.close`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"network namespaces need `{tool}` (Debian: apt-get install iproute2 nftables)"
    return None


def run(*argv: str, stdin: str | None = None) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


class Network:
    """A bridge in a database host namespace, worker hosts joined to it, and cuts."""

    def __init__(self, word: str = "djt") -> None:
        self.tag = secrets.token_hex(2)
        self.word = word
        self.prefix = f"{word}-{self.tag}-"
        self.subnet = f"10.211.{secrets.randbelow(200) + 20}"
        self.db_ns = f"{self.prefix}db"
        self.db_address = f"{self.subnet}.1"
        self.hosts: dict[str, str] = {}  # name -> address
        self.cuts = 0
        self.active_cuts: list[str] = []
        self._namespaces: list[str] = []
        self._home_fd: int | None = None
        try:
            self._netns(self.db_ns)
            run("ip", "-n", self.db_ns, "link", "add", "br0", "type", "bridge")
            run("ip", "-n", self.db_ns, "addr", "add", f"{self.db_address}/24", "dev", "br0")
            run("ip", "-n", self.db_ns, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    @property
    def cidr(self) -> str:
        return f"{self.subnet}.0/24"

    def _netns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def namespace(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def add_host(self, name: str) -> str:
        """Make a worker host joined to the database's bridge; return its address."""
        number = 11 + len(self.hosts)
        ns, address = self.namespace(name), f"{self.subnet}.{number}"
        outer, inner = f"{self.word}{self.tag}{number}a", f"{self.word}{self.tag}{number}b"
        self._netns(ns)
        run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        run("ip", "link", "set", outer, "netns", self.db_ns)
        run("ip", "link", "set", inner, "netns", ns)
        run("ip", "-n", self.db_ns, "link", "set", outer, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inner)
        run("ip", "-n", ns, "link", "set", inner, "up")
        self.hosts[name] = address
        return address

    def exec_argv(self, host: str) -> list[str]:
        """The prefix that runs a command inside ``host`` (``ip netns exec`` execs it: the
        process keeps the pid)."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def enter_database_host(self) -> None:
        """Move the calling thread (call it before starting others) into the database host's
        namespace: servers it starts listen there, on the bridge, and its 127.0.0.1 is the
        database host's own."""
        self._home_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.db_ns}", os.O_RDONLY)
        try:
            os.setns(target, os.CLONE_NEWNET)
        finally:
            os.close(target)

    def leave_database_host(self) -> None:
        if self._home_fd is not None:
            os.setns(self._home_fd, os.CLONE_NEWNET)
            os.close(self._home_fd)
            self._home_fd = None

    def cut(self, host: str, port: int | None = None, direction: str = "both") -> str:
        """Drop, silently, what ``host`` and the server send each other (only on the host's
        TCP ``port`` if given, e.g. one connection); ``direction`` "in" drops only what the
        host sends, "out" only what it receives. Return the name of the cut, for heal."""
        table, rules = self.cut_rules(host, port, direction)
        # Bridged traffic between hosts is not filtered: only the server's own packets are.
        run("ip", "netns", "exec", self.db_ns, "nft", "-f", "-", stdin="\n".join(rules) + "\n")
        self.active_cuts.append(table)
        return table

    def cut_rules(self, host: str, port: int | None, direction: str) -> tuple[str, list[str]]:
        """A new cut's nftables table name and the rules that make it (see :meth:`cut`)."""
        if direction not in ("both", "in", "out"):
            raise ValueError(f"direction must be both, in or out, not {direction!r}")
        self.cuts += 1
        table = f"{self.word}cut{self.cuts}"
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
        return table, rules

    def heal(self, table: str) -> None:
        run("ip", "netns", "exec", self.db_ns, "nft", "delete", "table", "inet", table)
        self.active_cuts.remove(table)

    def heal_all(self) -> None:
        for table in list(self.active_cuts):
            self.heal(table)

    def kill_hosts(self) -> None:
        """SIGKILL whatever still runs in a worker host."""
        for ns in self._namespaces:
            if ns != self.db_ns:
                kill_inside(ns)

    def close(self) -> None:
        """Kill what runs in the worker hosts and delete every namespace (a process still
        inside the database host, e.g. a server, keeps that namespace alive until it exits)."""
        self.leave_database_host()
        self.kill_hosts()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._namespaces.clear()


def kill_inside(ns: str) -> None:
    listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                            timeout=30)
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
