"""Before/after figures: a worker host cut off mid-job (silent drops both ways, for CUT
seconds): how long its job stays locked, and how soon after the heal the host's sessions and its
LISTEN connection are back. Needs root, ip and nft.

    .venv/bin/python tests/measure_partition.py CODE_DIR stock|recipe CUT_SECONDS

CODE_DIR is the checkout whose worker runs (this one, or an older one); ``stock`` runs the
server with the kernel's keepalive defaults, ``recipe`` with the docs' server recipe.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.netlab import SERVER_RECIPE, Lab, held_by_a_session, wait_for  # noqa: E402

STOCK = {"tcp_keepalives_idle": "0", "tcp_keepalives_interval": "0", "tcp_keepalives_count": "0"}


def main(code: Path, server: dict[str, str], cut_seconds: float) -> None:
    log = Path(f"/tmp/djasync-partition-{os.getpid()}.log")
    with Lab(server) as lab:
        lab.add_host("h1")
        lab.django("migrate", "-v0")
        worker = lab.spawn("h1", [sys.executable, "-m", "djasync_worker", "--settings",
                                  "tests.settings", "--concurrency", "2", "--log-level", "info"],
                           log, env={"PYTHONPATH": str(code)}, cwd=code)
        out = lab.django(code="import djasync\n"
                              "print(djasync.schedule('tests.jobs.sleep', args=[60]).pk)")
        job = int(out.split()[-1])
        with lab.connect() as conn:
            def locked() -> bool:
                return held_by_a_session(conn, job)

            wait_for(locked, 30, "the job to run")
            time.sleep(0.5)
            cut, cut_at = lab.cut("h1"), time.monotonic()
            try:
                wait_for(lambda: not locked(), cut_seconds, "the job to be free", 0.1)
                print(f"job claimable {time.monotonic() - cut_at:.1f} s after the cut")
            except AssertionError:
                print(f"job still locked after {cut_seconds:g} s (the whole cut)")
            time.sleep(max(0.0, cut_seconds - (time.monotonic() - cut_at)))
            lab.heal(cut)
            healed = conn.execute("SELECT now()").fetchone()[0]
            for listener in (False, True):
                what = "the LISTEN session" if listener else "the first other session"

                def back(listener: bool = listener) -> object:
                    return conn.execute(
                        "SELECT min(backend_start) - %s FROM pg_stat_activity WHERE "
                        "client_addr = %s AND backend_start > %s AND "
                        "(application_name = 'djasync-worker listener') = %s",
                        [healed, lab.hosts["h1"], healed, listener]).fetchone()[0]

                try:
                    delay = wait_for(back, 60, what, 0.1)
                    print(f"{what} of the host is back {delay.total_seconds():.1f} s after "
                          "the heal")
                except AssertionError:
                    print(f"{what} of the host is not back 60 s after the heal")
        worker.kill()
    print(f"worker log: {log}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), {"stock": STOCK, "recipe": SERVER_RECIPE}[sys.argv[2]],
         float(sys.argv[3]))
