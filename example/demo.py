"""Schedule a few hundred jobs, drain them with the worker daemon, and show what happened.

Run it with ``make demo``, or ``DATABASE_URL=postgresql://... python example/demo.py``.
It migrates the example project into that database and deletes the rows of earlier demo runs
(the shop's tables and djasync jobs whose function is in ``shop.``), nothing else.

The story: 300 orders arrive in one batch. Each gets a job that writes its receipt; the
batch is a group whose final job writes a sales report once every receipt job is finished.
Three orders have a bad total, so their receipt jobs fail three times and end ``failed``;
every tenth order also notifies a (simulated) warehouse that fails the first call, so those
jobs fail once and succeed on their retry.
"""

from __future__ import annotations

import datetime
import decimal
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from djasync.models import Job

EXAMPLE_DIR = Path(__file__).resolve().parent
BATCH = "demo-batch"
ORDERS = 300
BAD_ORDERS = {17, 101, 250}  # order numbers whose total is negative: their receipts fail
WAREHOUSE_EVERY = 10  # every tenth order notifies the warehouse (fails once, then succeeds)
RECEIPT_MAX_ATTEMPTS = 3
CONCURRENCY = 4
WORKER_TIMEOUT_SECONDS = 120


def setup() -> None:
    if not os.environ.get("DATABASE_URL"):
        sys.exit(
            "DATABASE_URL is not set: run `make demo` (it starts a throwaway PostgreSQL), or "
            "set DATABASE_URL=postgresql://user@host:5432/dbname"
        )
    if importlib.util.find_spec("djasync_worker") is None:
        sys.exit("the worker daemon (package djasync_worker) cannot be imported: install this "
                 "project into the environment (`pip install -e .`)")
    sys.path.insert(0, str(EXAMPLE_DIR))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")
    import django

    django.setup()


def clear_old_runs() -> None:
    """Delete what earlier demo runs left: the shop's rows and the shop's jobs."""
    from shop.models import Order, SalesReport

    from djasync.models import Group, Job

    Group.objects.filter(reference=BATCH).delete()  # its jobs go with it (and their attempts)
    Job.objects.filter(name__startswith="shop.").delete()
    Order.objects.all().delete()  # receipts go with their orders
    SalesReport.objects.all().delete()


def schedule_jobs() -> dict[str, Any]:
    """Create the orders and schedule their jobs in one transaction; return what was made."""
    from django.db import transaction
    from shop import jobs
    from shop.models import Order

    import djasync
    from djasync import JobSpec

    # One transaction: no worker sees any of these jobs before all of them (and the orders
    # they refer to) are committed, and the report job is already the group's final job when
    # it becomes visible. Outside a transaction a worker could run it as a plain job first.
    with transaction.atomic():
        orders = Order.objects.bulk_create(
            Order(
                number=f"{n:04d}",
                batch=BATCH,
                customer=f"customer-{n % 37}",
                total=decimal.Decimal("-4.50" if n in BAD_ORDERS else f"{10 + n % 90}.50"),
            )
            for n in range(1, ORDERS + 1)
        )
        receipt_jobs = djasync.schedule_many(
            JobSpec(jobs.write_receipt, [order.id], group=BATCH,
                    meta={"max_attempts": RECEIPT_MAX_ATTEMPTS})
            for order in orders
        )
        group = receipt_jobs[0].group
        assert group is not None
        report_job = group.on_completion(djasync.schedule(jobs.sales_report, [BATCH]))
        # Higher priority runs first: the warehouse hears of these orders before any receipt.
        warehouse_jobs = djasync.schedule_many(
            JobSpec(jobs.notify_warehouse, [order.id], priority=10)
            for order in orders[WAREHOUSE_EVERY - 1 :: WAREHOUSE_EVERY]
        )
        later_job = djasync.schedule(
            jobs.follow_up, [orders[0].id], run_after=datetime.timedelta(days=7)
        )
        djasync.schedule(jobs.follow_up, [orders[1].id])
        descheduled = djasync.deschedule(jobs.follow_up, [orders[1].id])
    return {
        "orders": len(orders),
        "jobs": len(receipt_jobs) + 1 + len(warehouse_jobs) + 2,
        "group": group,
        "report_job": report_job,
        "warehouse_jobs": warehouse_jobs,
        "later_job": later_job,
        "descheduled": descheduled,
    }


def worker_command() -> list[str]:
    return [
        sys.executable, "-m", "djasync_worker",
        "--concurrency", str(CONCURRENCY), "--burst",
        "--settings", "demo_project.settings",
        "--pythonpath", str(EXAMPLE_DIR),
    ]  # fmt: skip


def drain(log_path: Path) -> tuple[int, float]:
    """Run the worker daemon until no due job is left; return its exit code and the seconds."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        worker = subprocess.Popen(worker_command(), stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        try:
            returncode = worker.wait(timeout=WORKER_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            returncode = -9
            print(f"the worker was still running after {WORKER_TIMEOUT_SECONDS} s: killed it")
    return returncode, time.monotonic() - started


def report(made: dict[str, Any], returncode: int, elapsed: float, log_path: Path) -> list[str]:
    """Print the summary; return the problems found (empty when all went as it should)."""
    from django.db.models import Count, Max, Min
    from shop.models import Receipt

    from djasync.models import Attempt, Group, Job, Status

    problems: list[str] = []
    jobs = Job.objects.filter(name__startswith="shop.")
    by_status = dict(jobs.values_list("status").annotate(n=Count("id")).order_by())
    attempts = Attempt.objects.filter(job__in=jobs)
    finished = jobs.exclude(status=Status.PENDING).exclude(status=Status.CANCELLED).count()

    span = attempts.aggregate(first=Min("started_at"), last=Max("started_at"))
    running = (span["last"] - span["first"]).total_seconds() if span["first"] else 0.0
    print(f"drained in {elapsed:.2f} s with worker start-up: {finished} jobs finished "
          f"({attempts.count()} attempts), {finished / elapsed:.0f} jobs/s; "
          f"from first to last attempt {running:.2f} s, {finished / max(running, 1e-3):.0f} jobs/s")
    print("jobs by status: " + ", ".join(f"{s} {by_status.get(s, 0)}" for s in Status.values))

    retried = (jobs.filter(name="shop.jobs.notify_warehouse")
               .annotate(n=Count("attempt_set")).values_list("status", "n"))
    flaky_ok = sum(1 for status, n in retried if status == Status.SUCCEEDED and n == 2)
    print(f"retried: {flaky_ok} of {len(made['warehouse_jobs'])} warehouse jobs failed once "
          "and succeeded on their second attempt")
    if flaky_ok != len(made["warehouse_jobs"]):
        problems.append("not every warehouse job succeeded on its second attempt")

    print("results:")
    for name in ("shop.jobs.write_receipt", "shop.jobs.notify_warehouse"):
        for job in jobs.filter(name=name, status=Status.SUCCEEDED).order_by("id")[:2]:
            print(f"  #{job.id} {_call(job)} -> {json.dumps(job.result)}")

    error = (attempts.filter(job__name="shop.jobs.write_receipt", job__status=Status.FAILED)
             .select_related("job").order_by("-id").first())
    if error is None:
        problems.append("no recorded error for the failing receipt jobs")
    else:
        print(f"an error: #{error.job_id} {_call(error.job)}, attempt {error.number} of "
              f"{error.job.max_attempts} ({error.outcome}):\n"
              f"  {error.exception_type}: {error.exception_message}")
    failed_orders = list(jobs.filter(name="shop.jobs.write_receipt", status=Status.FAILED)
                         .values_list("args__0", flat=True))
    leaked = Receipt.objects.filter(order_id__in=failed_orders).count()
    print(f"  its writes rolled back: {leaked} receipts exist for the "
          f"{len(failed_orders)} failed orders")
    if len(failed_orders) != len(BAD_ORDERS) or leaked:
        problems.append(f"expected {len(BAD_ORDERS)} failed receipt jobs and no receipt for them")

    group = Group.objects.get(pk=made["group"].pk)
    final = Job.objects.get(pk=made["report_job"].pk)
    progress = group.progress()
    print(f"group {group.reference!r}: {progress['succeeded']} succeeded, "
          f"{progress['failed']} failed, {progress['pending']} pending of {progress['total']}")
    last_other = (group.jobs.exclude(pk=final.pk).aggregate(last=Max("finished_at"))["last"])
    ran_last = (final.status == Status.SUCCEEDED and last_other is not None
                and final.started_at is not None and final.started_at >= last_other
                and final.result.get("pending_when_run") == 0)
    print(f"  final job #{final.id} {_call(final)}: {final.status}, "
          f"{'ran last' if ran_last else 'did NOT run last'}\n    -> {json.dumps(final.result)}")
    if not ran_last:
        problems.append("the group's final job did not run after all the group's other jobs")

    later = Job.objects.get(pk=made["later_job"].pk)
    print(f"still pending: #{later.id} {_call(later)}, due {later.run_after:%Y-%m-%d %H:%M} UTC; "
          f"deschedule() cancelled {made['descheduled']} job")
    left = jobs.due().count()
    if left:
        problems.append(f"{left} due jobs are still pending")
    if by_status.get(Status.PENDING, 0) != 1 or by_status.get(Status.CANCELLED, 0) != 1:
        problems.append("expected exactly one pending (next week) and one cancelled job")
    if returncode != 0:
        problems.append(f"the worker exited with code {returncode} (see {log_path})")
    return problems


def _call(job: Job) -> str:
    args = ", ".join(json.dumps(arg) for arg in job.args)
    return f"{job.name.rsplit('.', 1)[-1]}({args})"


def main() -> int:
    setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    clear_old_runs()
    made = schedule_jobs()
    with tempfile.NamedTemporaryFile(prefix="djasync-demo-worker-", suffix=".log",
                                     delete=False) as log_file:
        log_path = Path(log_file.name)
    print(f"scheduled {made['jobs']} jobs for {made['orders']} orders; draining them with "
          f"`djasync_worker --concurrency {CONCURRENCY} --burst` (log: {log_path})\n")
    returncode, elapsed = drain(log_path)
    problems = report(made, returncode, elapsed, log_path)
    if problems:
        print("\nSOMETHING IS WRONG:\n" + "\n".join(f"  - {p}" for p in problems))
        if returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            print(f"\nlast lines of {log_path}:\n" + "\n".join(f"  {line}" for line in tail))
        return 1
    print("\nall as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
