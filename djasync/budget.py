"""The connection budget: what the worker daemons need of PostgreSQL's ``max_connections``.

A daemon holds one connection per child, one for its supervisor and one for its LISTEN
connection: ``concurrency + 2``. On top of that, while they run: one per running long
(non-atomic) job (its lease renewer) and, behind a connection pooler, one more per running
long job with flow-control keys (the one holding its slots: ``limits``), one per child
that recounted attempts on a fresh snapshot (REPEATABLE READ or SERIALIZABLE only, near
``max_attempts``), and one for the metrics scrape (``--metrics-port``). Those come and go;
the steady part is counted here, for every daemon registered as alive (the
``djasync_worker`` table) plus the one starting. The explanation, with the recipe for many
hosts, is docs/explanation/connections.md.

PostgreSQL refuses connections past ``max_connections`` less the slots it keeps for
superusers (``superuser_reserved_connections``, and ``reserved_connections`` on 16+). The
worker warns at start-up, in one line, when the daemons alone would take more than
:data:`WARN_FRACTION` of that: the web application, cron jobs and ``psql`` sessions need the
rest, and a daemon that cannot connect does no work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.db import connection

from djasync.workers import IN_PROCESS_PREFIX, STALE_AFTER

logger = logging.getLogger(__name__)

#: Warn when the daemons' connections exceed this share of what non-superusers may open.
WARN_FRACTION = 0.8
#: Connections of a daemon besides its children: the supervisor's and the LISTEN connection.
PER_DAEMON = 2
#: Connections of a ``flush_queue`` run: its own and its crash watch's side connection.
PER_FLUSH_QUEUE = 2

BUDGET_QUERY = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
       count(w.id),
       coalesce(sum(CASE WHEN starts_with(w.name, %(in_process)s) THEN %(per_flush)s
                         ELSE w.concurrency + %(per_daemon)s END), 0),
       pg_backend_pid()
  FROM djasync_worker w
 WHERE w.stopped_at IS NULL AND w.last_seen >= now() - make_interval(secs => %(stale)s)
   AND w.name <> %(name)s
"""


@dataclass(frozen=True)
class Budget:
    #: What non-superusers may open: max_connections less the reserved slots.
    allowed: int
    max_connections: int
    reserved: int
    #: Client connections open on the server now (anyone's).
    in_use: int
    #: The other daemons (and flush_queue runs) registered as alive, and their connections.
    others: int
    others_need: int
    #: This daemon's connections (``concurrency + 2``).
    own_need: int
    #: The connection goes through a pooler: the daemons' connections are the pooler's.
    pooled: bool

    @property
    def need(self) -> int:
        return self.others_need + self.own_need

    @property
    def tight(self) -> bool:
        return not self.pooled and self.need > WARN_FRACTION * self.allowed


def measure(name: str, concurrency: int) -> Budget:
    """Read the budget for a daemon named ``name`` with ``concurrency`` children (one query)."""
    with connection.cursor() as cursor:
        cursor.execute(BUDGET_QUERY, {
            "in_process": IN_PROCESS_PREFIX, "per_flush": PER_FLUSH_QUEUE,
            "per_daemon": PER_DAEMON, "stale": STALE_AFTER.total_seconds(), "name": name})
        (max_connections, superuser_reserved, reserved, in_use, others, others_need,
         session_pid) = cursor.fetchone()
    key_pid = connection.connection.info.backend_pid  # a pooler answers with a key of its own
    reserved_total = int(superuser_reserved) + int(reserved)
    return Budget(int(max_connections) - reserved_total, int(max_connections), reserved_total,
                  int(in_use), int(others), int(others_need), concurrency + PER_DAEMON,
                  pooled=session_pid != key_pid)


def check_at_start(name: str, concurrency: int) -> Budget | None:
    """Log the budget at start-up: one warning line if it is tight, else a debug line. Never
    raises (a start-up must not fail over a figure); returns the budget, or None."""
    try:
        budget = measure(name, concurrency)
    except Exception as exc:
        logger.debug("cannot read the connection budget error=%s", exc)
        return None
    if budget.pooled:
        logger.info("connection budget not checked: this worker goes through a connection "
                    "pooler, whose pool sizes bound what PostgreSQL sees "
                    "(max_connections=%s)", budget.max_connections)
    elif budget.tight:
        logger.warning(
            "connection budget: the worker daemons need about %s connections (%s other "
            "daemon(s) registered as alive: %s; this one: %s = --concurrency + supervisor + "
            "LISTEN; plus one per running long job), over %.0f%% of the %s PostgreSQL allows "
            "non-superusers (max_connections=%s less %s reserved; %s in use now). New "
            "connections will be refused when it runs out: lower --concurrency, raise "
            "max_connections, or put PgBouncer in front (docs/explanation/connections.md)",
            budget.need, budget.others, budget.others_need, budget.own_need,
            WARN_FRACTION * 100, budget.allowed, budget.max_connections, budget.reserved,
            budget.in_use)
    else:
        logger.debug("connection budget need=%s allowed=%s in_use=%s daemons=%s", budget.need,
                     budget.allowed, budget.in_use, budget.others + 1)
    return budget
