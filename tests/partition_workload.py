"""Jobs for tests/test_partitioning.py, scheduled through djasync's own API in a process of its
own (the test's database is not the one it partitions): ``python -m tests.partition_workload
PHASE`` with ``DATABASE_URL`` naming the scratch database. Prints the ids as JSON."""

from __future__ import annotations

import datetime
import json
import os
import sys


def main(phase: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from django.db import transaction

    import djasync
    from djasync.models import Job
    from tests import jobs

    out: dict[str, object] = {}
    with transaction.atomic():
        out["plain"] = [djasync.schedule(jobs.add, args=[i, i]).pk for i in range(50)]
        members = [djasync.schedule(jobs.add, args=[i, 1], group=f"g-{phase}").pk
                   for i in range(3)]
        group = Job.objects.get(pk=members[0]).group
        out["members"] = members
        out["final"] = group.on_completion(djasync.schedule(jobs.echo, args=[phase])).pk
        out["unique"] = [djasync.schedule(jobs.echo, args=["u", phase], unique="u-" + phase).pk
                         for _ in range(2)]
        out["later"] = djasync.schedule(jobs.add, args=[0, 0],
                                        run_after=datetime.timedelta(days=30)).pk
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
