#!/usr/bin/env python3
"""``make test``: the whole suite, its partition tests beside the rest.

The partition tests (``-m network``, tests/test_network.py) spend most of their time waiting on
TCP's timers in a lab of their own (network namespaces, their own PostgreSQL): about four
minutes of waiting that needs almost no CPU. They run in a second pytest beside the rest of the
suite, which keeps ``make test`` under ten minutes on a 2-core machine; their output is printed
after the rest's, and the run fails if either part fails.

With arguments (``make test PYTEST_ARGS='-k groups -x'``) it is one plain pytest with them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from psycopg.conninfo import conninfo_to_dict

PYTEST = [sys.executable, "-m", "pytest"]


def main(args: list[str]) -> int:
    if args:
        return subprocess.call([*PYTEST, *args])
    # The two pytests must not share a test database: each would drop the other's at start-up.
    dbname = conninfo_to_dict(os.environ.get("DATABASE_URL", "")).get("dbname", "postgres")
    network_env = {**os.environ, "DJASYNC_TEST_DB_NAME": f"test_{dbname}_network"}
    with tempfile.TemporaryFile("w+") as out:
        # No cache plugin: two pytests must not write .pytest_cache at once.
        network = subprocess.Popen([*PYTEST, "-m", "network", "-p", "no:cacheprovider"],
                                   stdout=out, stderr=subprocess.STDOUT, env=network_env)
        try:
            rest = subprocess.call([*PYTEST, "-m", "not network"])
        finally:
            network_code = network.wait()
        out.seek(0)
        print("\n===== the partition tests (-m network), run beside the rest =====", flush=True)
        sys.stdout.write(out.read())
    print(f"make test: the rest exited {rest}, the partition tests {network_code}", flush=True)
    if rest == 5:
        return 5  # nothing collected: the Makefile says so
    return rest or network_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
