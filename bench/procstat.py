"""CPU time and RSS of process trees, read from /proc (Linux only; elsewhere: no figures)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class Stat:
    cpu: float  # own user+system seconds
    reaped: float  # user+system seconds of its reaped children (cutime+cstime)
    rss: int  # bytes


def read_stat(pid: int) -> Stat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17, rss=24
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return Stat((utime + stime) / TICK, (cutime + cstime) / TICK, int(fields[21]) * PAGE)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` (own + reaped children) plus its live descendants' own time."""
    stat = read_stat(root)
    if stat is None:
        return 0.0
    total = stat.cpu + stat.reaped
    for child in children(root):
        total += tree_cpu(child)
    return total


@dataclass
class Sampler:
    """Samples a process and its children every ``interval`` seconds in a thread.

    Keeps the last CPU figure seen for the root and for each child, and (if ``keep_rss``) a
    timeline of ``(time.time(), pid, rss_bytes)`` for each child.
    """

    root: int
    interval: float = 0.1
    keep_rss: bool = False
    root_cpu: float = 0.0
    child_cpu: dict[int, float] = field(default_factory=dict)
    rss: list[tuple[float, int, int]] = field(default_factory=list)
    child_pids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            stat = read_stat(self.root)
            if stat is None:
                return
            self.root_cpu = stat.cpu
            now = time.time()
            for pid in children(self.root):
                child = read_stat(pid)
                if child is None:
                    continue
                if pid not in self.child_cpu:
                    self.child_pids.append(pid)
                self.child_cpu[pid] = child.cpu
                if self.keep_rss:
                    self.rss.append((now, pid, child.rss))
            self._stop.wait(self.interval)
