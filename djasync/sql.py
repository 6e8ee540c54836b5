"""Every SQL statement on the queue's hot path, each named and explained.

They are plain SQL rather than ORM queries because each one is a single round trip that the ORM
cannot express (``FOR NO KEY UPDATE … SKIP LOCKED`` returning computed columns, an INSERT and an
UPDATE in one statement) and because they run once per job.
"""

from __future__ import annotations

from functools import cache

from djasync.conf import NOTIFY_CHANNEL
from djasync.registry import TASK_RUNNER

JOB = "djasync_job"
ATTEMPT = "djasync_attempt"


@cache
def claim(*, by_queue: bool, by_name_prefix: bool, by_id: bool = False,
          exists: bool = False, limit: int = 1, one_queue: bool = False,
          paused: bool = False) -> str:
    """Lock and read up to ``limit`` runnable jobs, best first.

    - ``FOR NO KEY UPDATE``: a plain ``FOR UPDATE`` would conflict with the ``FOR KEY SHARE`` lock
      that inserting a row with a foreign key to the job takes, so an application transaction
      referencing a job would hide it from every worker.
    - ``SKIP LOCKED``: rows locked by other workers (jobs they are running) are passed over, never
      waited on. A locked row stays ``pending``; its lock *is* the "running" mark, so a worker that
      dies releases it with its transaction.
    - Every eligibility predicate sits inside this locked select (never in an outer query), so a
      row that is locked is always a row that will run.
    - The ORDER BY matches the partial index ``djasync_job_claim`` (pending rows without
      flow-control keys only), and ``djasync_job_claim_queue`` after its queue. A job with
      keys is claimed only by :func:`claim_limited`, used when ``DJASYNC["LIMITS"]`` is set:
      with it empty, such jobs wait.
    - ``previous_attempts`` counts the attempt rows. It may miss an attempt committed by the
      transaction that held the row just before us (the statement's snapshot predates that
      commit), so the executor recounts exactly (:data:`COUNT_ATTEMPTS`) when a job is near its
      ``max_attempts``, and the finishing statements number attempts with a fresh count.

    - ``limit`` is written into the statement, not passed as a parameter: with ``LIMIT $1``
      PostgreSQL's generic plan assumes a tenth of the table, so it keeps re-planning the
      prepared statement for every call (about 0.2 ms of server CPU, twice the execution).

    - ``one_queue`` (``by_queue`` with a list of one queue, a worker's ``--queue mail``): the
      claim walks ``djasync_job_claim_queue`` (the same order, after the queue), so it passes
      over no row of another queue. Filtered through ``djasync_job_claim``, a claim for a queue
      with 5 due jobs read past every due job of the others first (300,000 in another queue:
      110 ms a claim, 0.3 ms unfiltered).
    - Several queues (``--queue mail --queue sms``): the function ``djasync_claim_queues``
      (migration 0009) looks at the first jobs of each queue through
      ``djasync_job_claim_queue``, merges them in the claim's order, and locks them in that
      order with the same predicates until ``limit`` are locked, looking further if a queue's
      first jobs are all held (300,000 due jobs in another queue: 0.4 ms a claim; 110-250 ms
      through ``djasync_job_claim``). One statement cannot do it on PostgreSQL 15 without a
      sort of the queues' whole backlog or locking rows it then does not return; the
      migration explains.

    With ``exists``, return instead whether any such job exists, locked or not (a burst worker
    uses it to tell "nothing due" from "due but held by someone right now").

    ``paused`` (a claim of every queue while some are paused, ``%(paused)s``): pass over the
    jobs of those queues. A worker serving listed queues leaves the paused ones out of its
    list instead, so its statement is the plain one. (With ``DJASYNC["LIMITS"]`` set, the
    claim is :data:`CLAIM_LIMITED` instead.)
    """
    if by_queue and not one_queue and not exists and not by_id:
        prefix = "%(name_prefix)s::text" if by_name_prefix else "NULL"
        return f"""
SELECT * FROM djasync_claim_queues(%(queues)s::text[], {int(limit)}, %(now)s::timestamptz,
                                   {prefix})
"""
    filters = [
        "j.status = 'pending'",
        # Jobs with flow-control keys are claimed by CLAIM_LIMITED only, and are not in the
        # claim indexes (this predicate is theirs). ``exists`` counts them: they are due.
        "TRUE" if exists else "j.limits IS NULL",
        # ``job()`` (by id) runs a job now even if its run_after is in the future.
        # clock_timestamp(), not now(): inside a long transaction (a TestCase) now() stands
        # still. ``%(now)s`` lets djasync.testing run jobs "later" without waiting.
        "TRUE" if by_id else "j.run_after <= coalesce(%(now)s::timestamptz, clock_timestamp())",
        # A group's final job waits until no other job of its group is pending (a function,
        # see migration 0007: an inline subquery would be set up for every claim).
        "(j.group_id IS NULL OR djasync_group_final_ready(j.id))",
    ]
    # A non-atomic job runs outside any transaction under a lease; it is free again only
    # once the lease has expired (its worker died or froze) or was released. ``job()`` too
    # must not run a job that a worker is running under a live lease.
    filters.append("(j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())")
    if by_queue and one_queue and not exists:
        # The element, not ``= ANY``: only an equality lets the index give the ORDER BY.
        filters.append("j.queue = (%(queues)s::text[])[1]")
    elif by_queue:
        filters.append("j.queue = ANY(%(queues)s)")
    if paused:
        filters.append("j.queue <> ALL(%(paused)s::text[])")
    if by_name_prefix:
        # A Task job's name is the runner's; its Task's path (its first argument) matches too.
        filters.append(f"(starts_with(j.name, %(name_prefix)s) OR (j.name = '{TASK_RUNNER}' "
                       "AND starts_with(j.args ->> 0, %(name_prefix)s)))")
    if by_id:
        filters.append("j.id = %(job_id)s")
    where = "\n   AND ".join(filters)
    if exists:
        return f"SELECT EXISTS (SELECT 1 FROM {JOB} j WHERE {where})"
    return f"""
SELECT j.id, j.name, j.args, j.kwargs, j.meta, j.queue, j.priority, j.group_id,
       (SELECT count(*) FROM {ATTEMPT} a WHERE a.job_id = j.id) AS previous_attempts,
       j.lease_expires IS NOT NULL AS lease_expired, j.run_after
  FROM {JOB} j
 WHERE {where}
 ORDER BY j.priority DESC, j.run_after, j.id
 LIMIT {int(limit)}
   FOR NO KEY UPDATE OF j SKIP LOCKED
"""


#: Whether a row's locker (``xmax``) is a transaction in progress, i.e. a worker (or another
#: session) holds the row now: every transaction and subtransaction in progress with an id holds
#: a lock on that id, listed in ``pg_locks``. A read, never a lock: a probe that share-locked
#: the row, even for an instant, made a worker's claim at that instant pass the job over until
#: its next poll (5 s by default). A row locked by two transactions at once (a multixact) is not
#: matched. Used by ``health.RUNNING`` and the Tasks backend's ``get_result()``.
LOCKER_IN_PROGRESS = ("xmax IN (SELECT transactionid FROM pg_locks "
                      "WHERE locktype = 'transactionid' AND granted)")


@cache
def claim_limited(limit: int) -> str:
    """The claim when flow-control limits are configured: ``djasync_claim_limited``
    (migrations 0010, 0013-0018) takes the jobs with keys that rank before the jobs without
    keys that would fill the rest of the batch (a job without keys that another worker runs
    does not count), each only if a slot (and a rate token) of each of its keys is free, then the
    others; paused queues are passed over (``job()``, by id, runs a job of a paused queue).
    ``limit`` is written into the statement, as in :func:`claim`. ``%(channel)s``: NOTIFY at
    COMMIT if the claim took slots; NULL for a worker, which sends :data:`WAKE_WAITERS`
    before its COMMIT instead (a NOTIFY only when a claim waits on those slots)."""
    return f"""
SELECT * FROM djasync_claim_limited(%(queues)s::text[], {int(limit)}, %(now)s::timestamptz,
                                    %(name_prefix)s::text, %(job_id)s::bigint,
                                    %(cfg_keys)s::text[], %(cfg_concurrency)s::integer[],
                                    %(cfg_rate)s::integer[], %(cfg_per)s::float8[],
                                    %(channel)s::text)
"""


#: The claim of one job with ``DJASYNC["LIMITS"]`` set, for a worker or ``flush_queue`` serving
#: every queue (no ``--queue``, no name filter): ``djasync_claim_one`` (migration 0020) settles
#: the usual job with a key (one key, limited in concurrency only) at a fraction of
#: :func:`claim_limited`'s cost, and leaves everything else to ``djasync_claim_limited``.
CLAIM_ONE_LIMITED = """
SELECT * FROM djasync_claim_one(%(now)s::timestamptz, %(cfg_keys)s::text[],
                                %(cfg_concurrency)s::integer[], %(cfg_rate)s::integer[],
                                %(cfg_per)s::float8[], %(channel)s::text)
"""

#: Sent by a worker before each COMMIT when limits are configured (with the finish's plan
#: setting, :data:`FINISH_PLAN_WAKING`, when jobs succeeded): if its transaction claimed jobs
#: holding concurrency slots (given back by that COMMIT), notify the workers when one of them
#: waits on a key of those slots' entries (migration 0015). Sent unnamed, as COMMIT is: it
#: follows the jobs' own code (see ``wire.Statements.plain``).
WAKE_WAITERS = f"SELECT djasync_wake_waiters('{NOTIFY_CHANNEL}')"


def wake_waiters_of(job_ids: list[int]) -> str:
    """After a worker's transaction that claimed ``job_ids`` rolled back whole (its COMMIT
    failed, the worker stopped mid-batch, a serialization failure, an unwanted chained claim):
    the statement (run outside any transaction) that notifies the workers if a session waits
    on an entry of those jobs' keys, as :data:`WAKE_WAITERS` does before a COMMIT. The
    rollback lost the claim's note of the entries (``djasync.gave_back`` is local to the
    transaction), so they are read from the jobs' keys: each key and its pattern (``name:*``),
    an entry that no one waits on being passed over. No lock of the entries is needed: the
    slots are free already, so a claim that marks its session waiting after this look sees
    them free. Ids inlined (integers): the statement is sent unnamed and unprepared, as it
    follows the jobs' own code (see ``wire.Statements.plain``)."""
    ids = ",".join(str(int(job_id)) for job_id in job_ids)
    return f"""
SELECT djasync_wake_waiters('{NOTIFY_CHANNEL}')
  FROM (SELECT set_config('djasync.gave_back', coalesce(string_agg(e.entry, chr(31)), ''),
                           true) AS entries
          FROM (SELECT DISTINCT unnest(ARRAY[k.key, split_part(k.key, ':', 1) || ':*']) AS entry
                  FROM djasync_job j, jsonb_array_elements_text(j.limits) AS k(key)
                 WHERE j.id = ANY(ARRAY[{ids}]::bigint[]) AND j.limits IS NOT NULL) e) noted
 WHERE noted.entries IS NOT NULL
"""


#: Sent around every claim, and before every finish. The claim must walk ``djasync_job_claim``
#: in index order and count attempts through their ``job_id`` index; the finish counts them
#: the same way. PostgreSQL plans both from the tables' statistics, and those are often wrong
#: for a queue: on a table never analyzed (a new queue, a burst right after a TRUNCATE) the
#: planner sorted the whole backlog for each claim (2.8 ms instead of 0.03 ms at 10,000 jobs);
#: on an attempt table analyzed while nearly empty (a new install, after pruning) it scanned
#: every attempt for each count, so a drain slowed down as it went (2,000 instead of 7,000 jobs/s
#: over 10,000 jobs). Neither plan is ever right for these statements, so sorting and
#: sequential scans are turned off for them (``SET LOCAL``: this transaction only; the claim
#: sets them back before the job runs; the finish is followed by COMMIT).
CLAIM_PLAN = ("SET LOCAL enable_sort = off", "SET LOCAL enable_seqscan = off")
CLAIM_PLAN_DONE = ("SET LOCAL enable_sort TO DEFAULT", "SET LOCAL enable_seqscan TO DEFAULT")
FINISH_PLAN = ("SET LOCAL enable_seqscan = off",)
#: The same with :data:`WAKE_WAITERS` (limits configured), in one statement, prepared (it comes
#: before the finish statement, itself prepared: a job that dropped the session's prepared
#: statements makes either fail, and its success is recorded as a failed attempt either way).
#: A transaction that took no slot (no job with a key) skips the function's call.
FINISH_PLAN_WAKING = ("SELECT set_config('enable_seqscan', 'off', true), "
                      "CASE WHEN current_setting('djasync.gave_back', true) <> '' "
                      f"THEN djasync_wake_waiters('{NOTIFY_CHANNEL}') END",)

#: Extra seconds a job's transaction may sit idle beyond its timeout before PostgreSQL ends it.
IDLE_MARGIN_SECONDS = 10


def timeout_params(timeout: float | None) -> dict[str, str]:
    """The parameters of ``SET_TIMEOUTS`` for a job ``timeout``: ``statement_timeout`` and the
    idle-in-transaction timeout, in milliseconds (0: none)."""
    if timeout is None:
        return {"statement": "0", "idle": "0"}
    return {"statement": str(max(1, int(timeout * 1000))),
            "idle": str(int((timeout + IDLE_MARGIN_SECONDS) * 1000))}


#: Bound the job's statements, and the time its transaction may sit idle (a frozen worker).
#: ``SET LOCAL`` (``set_config(…, true)``) ends with the transaction: nothing is left on the
#: session, which behind a pooler in transaction mode (PgBouncer) is shared with other clients.
SET_TIMEOUTS = """
SELECT set_config('statement_timeout', %(statement)s, true),
       set_config('idle_in_transaction_session_timeout', %(idle)s, true)
"""

#: The start of each of the worker's transactions, in one statement (no extra round trip, one
#: statement fewer than the two of ``CLAIM_PLAN``): the claim's plan settings and the default
#: job timeouts (``SET_TIMEOUTS``), all ``SET LOCAL``. The timeouts bound the claim and the
#: finish as well as the job; a job with a ``timeout`` of its own sets it after the claim.
CLAIM_SETTINGS = """
SELECT set_config('enable_sort', 'off', true), set_config('enable_seqscan', 'off', true),
       set_config('statement_timeout', %(statement)s, true),
       set_config('idle_in_transaction_session_timeout', %(idle)s, true)
"""

#: On a worker's connection straight to PostgreSQL, make the default job timeouts the
#: session's own as well (for the statements long jobs run outside our transactions). The
#: ``WHERE`` is the guard: it holds only if the server session is the one the connection was
#: opened with (``pid``: the backend key the connection was given). Behind a pooler it is the
#: pooler's key, so nothing is set on a session that other clients share (no row returned).
SET_SESSION_TIMEOUTS_IF_DIRECT = """
SELECT set_config('statement_timeout', %(statement)s, false),
       set_config('idle_in_transaction_session_timeout', %(idle)s, false)
 WHERE pg_backend_pid() = %(pid)s
"""

#: The session's timeouts, read before ``job()`` runs inside a caller's transaction so that
#: they can be put back afterwards (``SET LOCAL`` outlives a released savepoint).
READ_TIMEOUTS = """
SELECT current_setting('statement_timeout'),
       current_setting('idle_in_transaction_session_timeout')
"""

#: Attempts so far, seen by a fresh snapshot (READ COMMITTED: each statement takes one).
COUNT_ATTEMPTS = f"SELECT count(*) FROM {ATTEMPT} WHERE job_id = %s"
#: The ids of the job's attempts a snapshot sees (the recount above READ COMMITTED counts the
#: union of two snapshots' ids: see ``executor._recount``).
ATTEMPT_IDS = f"SELECT id FROM {ATTEMPT} WHERE job_id = %s"

#: After a job's whole transaction rolled back (a failed attempt run without a savepoint),
#: take the row again to record the failure; skip it if another worker holds it already.
RELOCK = f"""
SELECT 1 FROM {JOB} WHERE id = %s AND status = 'pending' FOR NO KEY UPDATE SKIP LOCKED
"""

#: Mark a job succeeded and record its attempt, numbered by a fresh count, in one statement.
#: The attempt row is made from the updated job row: a job that deleted its own row gets none.
FINISH_SUCCESS = f"""
WITH job AS (
    UPDATE {JOB}
       SET status = 'succeeded', result = %(result)s::jsonb,
           attempts = (SELECT count(*) + 1 FROM {ATTEMPT} WHERE job_id = %(job_id)s),
           started_at = %(started_at)s, finished_at = clock_timestamp(), worker = %(worker)s
     WHERE id = %(job_id)s
 RETURNING id, attempts, started_at, finished_at, worker
)
INSERT INTO {ATTEMPT}
    (job_id, number, started_at, finished_at, outcome,
     exception_type, exception_message, traceback, worker)
SELECT id, attempts, started_at, finished_at, 'succeeded', '', '', '', worker FROM job
RETURNING number
"""

#: The same for the jobs of a batch, in one statement at the end of the batch (arrays in, one
#: element per job). Each job's own start and end times are kept.
FINISH_SUCCESS_MANY = f"""
WITH r AS (
    SELECT * FROM unnest(%(job_id)s::int8[], %(started_at)s::timestamptz[],
                         %(finished_at)s::timestamptz[], %(result)s::text[], %(worker)s::text[])
           AS r(job_id, started_at, finished_at, result, worker)
),
job AS (
    UPDATE {JOB} j
       SET status = 'succeeded', result = r.result::jsonb,
           attempts = (SELECT count(*) + 1 FROM {ATTEMPT} a WHERE a.job_id = r.job_id),
           started_at = r.started_at, finished_at = r.finished_at, worker = r.worker
      FROM r
     WHERE j.id = r.job_id
 RETURNING j.id, j.attempts, j.started_at, j.finished_at, j.worker
)
INSERT INTO {ATTEMPT}
    (job_id, number, started_at, finished_at, outcome,
     exception_type, exception_message, traceback, worker)
SELECT id, attempts, started_at, finished_at, 'succeeded', '', '', '', worker FROM job
RETURNING job_id, number
"""

#: Record a failed attempt and the job's new state (retry later, or failed) in one statement.
FINISH_FAILURE = f"""
WITH attempt AS (
    INSERT INTO {ATTEMPT}
        (job_id, number, started_at, finished_at, outcome,
         exception_type, exception_message, traceback, worker)
    VALUES (%(job_id)s, %(number)s, %(started_at)s, clock_timestamp(), %(outcome)s,
            %(exception_type)s, %(exception_message)s, %(traceback)s, %(worker)s)
)
UPDATE {JOB}
   SET status = %(status)s,
       run_after = coalesce(%(run_after)s, run_after),
       attempts = %(number)s,
       started_at = %(started_at)s,
       finished_at = CASE WHEN %(status)s = 'pending' THEN NULL ELSE clock_timestamp() END,
       worker = %(worker)s
 WHERE id = %(job_id)s
"""

#: Written by whoever saw a job's process die (the supervisor), outside any job transaction.
#: It inserts an attempt row only: the job row may already be locked by the worker that
#: re-claimed it, and the next claim counts this row in ``previous_attempts``.
#: Normally only for a pending job (a finished one was finished by the very run that died just
#: after its commit); ``late`` (the dead run's session had ended before this is written, so the
#: job may have run again and finished meanwhile) records it whatever the job's status: attempt
#: rows are append-only, and this run did happen.
#: ``holder`` (the dead process's worker name; '' to skip this) tells whether the dead run
#: still had the job when it died, or had committed its own outcome (a failure rescheduled
#: the job: pending again) just before: a long job's run still had it if it still holds the
#: lease (its outcome and the lease's release commit together); an atomic job's run, if the
#: row is locked (by the dead run's transaction, which our copy of its socket keeps alive;
#: after that run committed it is free, unless another worker holds it already). Without
#: this, a process killed between its COMMIT and telling the supervisor was charged a
#: phantom crash. Once the session has ended (``late``) an atomic run cannot be told apart.
RECORD_LOST_ATTEMPT = f"""
INSERT INTO {ATTEMPT}
    (job_id, number, started_at, finished_at, outcome,
     exception_type, exception_message, traceback, worker)
SELECT j.id, (SELECT count(*) + 1 FROM {ATTEMPT} a WHERE a.job_id = j.id),
       %(started_at)s, clock_timestamp(), %(outcome)s, %(exception_type)s,
       %(exception_message)s, '', %(worker)s
  FROM {JOB} j
 WHERE j.id = %(job_id)s AND (j.status = 'pending' OR %(late)s)
   AND (%(holder)s = '' OR CASE
        WHEN j.meta -> 'atomic' = 'false'::jsonb
        THEN starts_with(j.lease_owner, %(holder)s || '/')
        ELSE %(late)s OR NOT EXISTS (
            SELECT 1 FROM {JOB} k WHERE k.id = j.id FOR NO KEY UPDATE SKIP LOCKED)
        END)
RETURNING id
"""

#: Note that a lost attempt was counted late (see :data:`attempts.LATE_NOTE`).
MARK_LOST_ATTEMPT_LATE = (
    f"UPDATE {ATTEMPT} SET exception_message = exception_message || %s WHERE id = %s"
)

#: Fail a job that may not run again, without inventing an attempt (nothing ran).
FAIL_WITHOUT_ATTEMPT = (
    f"UPDATE {JOB} SET status = 'failed', finished_at = clock_timestamp() WHERE id = %s"
)

#: Take a non-atomic job's lease just before it starts, in a short transaction of its own,
#: only if the job may still start: pending (not cancelled, not finished by someone else),
#: not leased by another live owner, not locked (another worker has it in its claim), not
#: rescheduled since our claim read it (``run_after`` unchanged: a run elsewhere that failed
#: moved it), and, for a group's final job, its group still complete. The claim that found
#: the job took no lease: a lease taken at claim time would run out while the job waits its
#: turn behind its batch-mates (only the running job's lease is renewed). Returns whether a
#: previous holder's lease had run out (its attempt is lost) and the attempts so far.
TAKE_LEASE = f"""
WITH free AS (
    SELECT j.id, j.lease_expires IS NOT NULL AS lease_expired,
           (SELECT count(*) FROM {ATTEMPT} a WHERE a.job_id = j.id) AS previous_attempts
      FROM {JOB} j
     WHERE j.id = %(job_id)s AND j.status = 'pending' AND j.run_after = %(run_after)s
       AND (j.lease_expires IS NULL OR j.lease_expires < clock_timestamp())
       AND (j.group_id IS NULL OR djasync_group_final_ready(j.id))
       FOR NO KEY UPDATE OF j SKIP LOCKED
)
UPDATE {JOB} j SET lease_owner = %(owner)s,
       lease_expires = clock_timestamp() + make_interval(secs => %(seconds)s)
  FROM free
 WHERE j.id = free.id
RETURNING free.lease_expired, free.previous_attempts, j.limits
"""
RENEW_LEASE = f"""
UPDATE {JOB} SET lease_expires = clock_timestamp() + make_interval(secs => %(seconds)s)
 WHERE id = %(job_id)s AND lease_owner = %(owner)s AND status = 'pending'
"""
#: Lock a non-atomic job to finish it, only if we still hold its lease (the fence).
LOCK_IF_LEASED = f"""
SELECT 1 FROM {JOB} WHERE id = %(job_id)s AND lease_owner = %(owner)s AND status = 'pending'
   FOR NO KEY UPDATE
"""
RELEASE_LEASE = f"UPDATE {JOB} SET lease_owner = '', lease_expires = NULL WHERE id = %s"
#: Give back a lease taken for a job that then did not start (the worker is stopping).
GIVE_BACK_LEASE = f"""
UPDATE {JOB} SET lease_owner = '', lease_expires = NULL
 WHERE id = %(job_id)s AND lease_owner = %(owner)s AND status = 'pending'
"""
#: The leases a dead process held (owner ``<worker>/<token>``), locked to be freed by whoever
#: saw it die (the supervisor, or a sweep of dead ``flush_queue`` runs).
LEASES_OF = f"""
SELECT id FROM {JOB}
 WHERE status = 'pending' AND starts_with(lease_owner, %s || '/')
   FOR NO KEY UPDATE SKIP LOCKED
"""
RELEASE_LEASES = f"UPDATE {JOB} SET lease_owner = '', lease_expires = NULL WHERE id = ANY(%s)"

#: Insert many jobs in one statement (arrays in, ids out in the order given) and wake the
#: workers of each queue in it. One prepared statement whatever the number of jobs; the NOTIFY
#: is sent in the caller's transaction, so PostgreSQL delivers it at commit.
INSERT_JOBS = f"""
WITH j AS (
    INSERT INTO {JOB} (name, args, kwargs, meta, queue, priority, run_after, status, attempts,
                       identity, group_id, created_at, worker, lease_owner, limits)
    SELECT r.name, r.args::jsonb, r.kwargs::jsonb, r.meta::jsonb, r.queue, r.priority,
           r.run_after, 'pending', 0, r.identity, r.group_id, %(now)s, '', '', r.limits::jsonb
      FROM unnest(%(name)s::text[], %(args)s::text[], %(kwargs)s::text[], %(meta)s::text[],
                  %(queue)s::text[], %(priority)s::int2[], %(run_after)s::timestamptz[],
                  %(identity)s::text[], %(group_id)s::int8[], %(limits)s::text[])
           WITH ORDINALITY AS r(name, args, kwargs, meta, queue, priority, run_after, identity,
                                group_id, limits, n)
     ORDER BY r.n
    RETURNING id, queue
)
SELECT id FROM j
 WHERE (SELECT count(pg_notify(%(channel)s, q.queue)) FROM (SELECT DISTINCT queue FROM j) q) >= 0
 ORDER BY id
"""

#: Ids for jobs written with COPY (``schedule_many`` of many jobs), in increasing order.
NEXT_JOB_IDS = f"""
SELECT nextval(pg_get_serial_sequence('{JOB}', 'id')) FROM generate_series(1, %s)
"""

#: Wake the workers of these queues, one notification each (delivered at commit).
NOTIFY_QUEUES = "SELECT pg_notify(%(channel)s, q) FROM unnest(%(queues)s::text[]) AS q"

#: Wake listening workers; sent inside the scheduling transaction, so delivered at its commit.
NOTIFY = "SELECT pg_notify(%(channel)s, %(queue)s)"
