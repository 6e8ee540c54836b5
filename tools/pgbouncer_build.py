#!/usr/bin/env python3
"""Build a pinned PgBouncer newer than Debian 12's (1.18) into a cache outside the repository.

PgBouncer 1.21 and newer carry protocol-level prepared statements in transaction mode
(``max_prepared_statements``); Debian 12 ships 1.18. tests/test_pgbouncer.py and
bench/pgbouncer.py run against both: the package's ``/usr/sbin/pgbouncer`` and this build.

The source is upstream's release tarball as Debian's archive keeps it (the ``.orig.tar.gz`` of
a newer Debian release's source package), fetched from the Debian mirror this machine's apt
already uses (its sources list; ``DJASYNC_DEBIAN_MIRROR`` overrides), checked against the
sha256 pinned here, then ``./configure --prefix=CACHE && make && make install``. Needs a C
compiler, make, pkg-config and the headers of libevent, OpenSSL and c-ares (Debian:
``build-essential pkg-config libevent-dev libssl-dev libc-ares-dev``).

Idempotent: a build already in the cache that reports the pinned version is reused (nothing is
downloaded); concurrent runs wait for each other (a lock file). About 20 s on a 2-core machine.
Prints the program's path on success; exits 1 with the reason on failure::

    python3 tools/pgbouncer_build.py            # build (or reuse), print the path
    python3 tools/pgbouncer_build.py --path     # print where it is (or would be), build nothing
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

VERSION = "1.24.1"
#: pgbouncer_1.24.1.orig.tar.gz (upstream's pgbouncer-1.24.1.tar.gz), as Debian 13 ships it.
SHA256 = "da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0"
ARCHIVE = f"pgbouncer_{VERSION}.orig.tar.gz"
POOL_PATH = f"pool/main/p/pgbouncer/{ARCHIVE}"


def cache_root() -> Path:
    """``$DJASYNC_CACHE``, else ``$XDG_CACHE_HOME/djasync``, else ``~/.cache/djasync``."""
    if os.environ.get("DJASYNC_CACHE"):
        return Path(os.environ["DJASYNC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "djasync"


def prefix() -> Path:
    return cache_root() / f"pgbouncer-{VERSION}"


def program() -> Path:
    """Where the built program is (whether or not it is there yet)."""
    return prefix() / "bin" / "pgbouncer"


def built() -> Path | None:
    """The built program if it is in the cache and reports the pinned version, else None."""
    path = program()
    if not os.access(path, os.X_OK):
        return None
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if f"PgBouncer {VERSION}" in out else None


def debian_mirrors() -> list[str]:
    """The Debian archive URLs in apt's sources (deb822 ``URIs:`` and one-line ``deb``
    entries), main archive first; ``DJASYNC_DEBIAN_MIRROR`` alone if set."""
    if os.environ.get("DJASYNC_DEBIAN_MIRROR"):
        return [os.environ["DJASYNC_DEBIAN_MIRROR"].rstrip("/")]
    found: list[str] = []
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if path.suffix not in ("", ".list", ".sources") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        urls = re.findall(r"^\s*URIs:\s*(.+)$", text, re.M) if path.suffix == ".sources" else [
            m for m in re.findall(r"^\s*deb(?:-src)?\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M)]
        for line in urls:
            for url in line.split():
                url = url.rstrip("/")
                if url.endswith("/debian") and url not in found:
                    found.append(url)
    return found


def download(destination: Path) -> None:
    mirrors = debian_mirrors()
    if not mirrors:
        raise RuntimeError("no Debian mirror in apt's sources (set DJASYNC_DEBIAN_MIRROR to "
                           "the archive's URL, the folder that holds pool/)")
    errors = []
    for mirror in mirrors:
        url = f"{mirror}/{POOL_PATH}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as exc:
            errors.append(f"{url}: {exc}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256:
            errors.append(f"{url}: sha256 {digest}, expected {SHA256}")
            continue
        destination.write_bytes(data)
        return
    raise RuntimeError("could not fetch " + ARCHIVE + ": " + "; ".join(errors))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(log=sys.stderr) -> Path:
    """The built program: from the cache, or downloaded, checked and built now."""
    found = built()
    if found is not None:
        return found
    root = cache_root()
    with locked(root / f".pgbouncer-{VERSION}.lock"):
        found = built()  # another run built it while we waited
        if found is not None:
            return found
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"pgbouncer-{VERSION}-build-", dir=root) as tmp:
            work = Path(tmp)
            archive = work / ARCHIVE
            download(archive)
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
                    tar.extractall(work, filter="data")
                else:
                    tar.extractall(work)  # noqa: S202 - checked against the pinned sha256
            source = work / f"pgbouncer-{VERSION}"
            staging = root / f".pgbouncer-{VERSION}.staging"
            shutil.rmtree(staging, ignore_errors=True)
            output = work / "build.log"
            with output.open("wb") as out:
                steps = [["./configure", f"--prefix={prefix()}"],
                         ["make", f"-j{os.cpu_count() or 1}"],
                         ["make", "install", f"DESTDIR={staging}"]]
                for step in steps:
                    if subprocess.run(step, cwd=source, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL).returncode != 0:
                        tail = output.read_text(errors="replace")[-3000:]
                        raise RuntimeError(f"{' '.join(step)} failed:\n{tail}")
            # make install wrote into staging + prefix: move that tree into place at once.
            shutil.rmtree(prefix(), ignore_errors=True)
            os.replace(staging / prefix().relative_to("/"), prefix())
            shutil.rmtree(staging, ignore_errors=True)
        found = built()
        if found is None:
            raise RuntimeError(f"built, but {program()} does not report PgBouncer {VERSION}")
        print(f"pgbouncer_build: built PgBouncer {VERSION} in {time.monotonic() - started:.0f} s"
              f" into {prefix()}", file=log)
        return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", action="store_true",
                        help="print where the program is (or would be); build nothing")
    args = parser.parse_args()
    if args.path:
        print(program())
        return 0
    try:
        print(build())
    except Exception as exc:  # noqa: BLE001 - the reason, in one message, for .ci/run's log
        print(f"pgbouncer_build: PgBouncer {VERSION} not built: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
