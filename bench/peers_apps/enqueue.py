"""Queue N no-op jobs for one peer, in bulk where it offers a bulk form: python enqueue.py PEER N"""

import asyncio
import os
import sys

peer, n = sys.argv[1], int(sys.argv[2])
if peer == "procrastinate":
    from proc_app import app, noop

    with app.open():
        for base in range(0, n, 1000):
            noop.batch_defer(*[{} for _ in range(min(1000, n - base))])
elif peer == "pgqueuer":
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    async def go() -> None:
        connection = await asyncpg.connect(os.environ["PEER_DSN"])
        queries = Queries(AsyncpgDriver(connection))
        for base in range(0, n, 1000):
            size = min(1000, n - base)
            await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
        await connection.close()

    asyncio.run(go())
elif peer == "django-tasks-db":
    import django

    os.environ["DJANGO_SETTINGS_MODULE"] = "djt_settings"
    django.setup()
    from django.db import transaction
    from djt_app.tasks import noop

    with transaction.atomic():  # no bulk form: one enqueue() per job, one commit
        for _ in range(n):
            noop.enqueue()
else:
    raise SystemExit(f"unknown peer {peer}")
