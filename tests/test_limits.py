"""Flow control: concurrency limits and rates by key, and paused queues (djasync.limits)."""

from __future__ import annotations

import datetime

import psycopg
import pytest
from django.core import checks
from django.db import connection, transaction
from django.test import override_settings

import djasync
from djasync import executor, limits, sql
from djasync.exceptions import DjasyncError, ImproperlyConfigured
from djasync.models import Job, PausedQueue, Status
from tests import jobs
from tests.conftest import conninfo
from tests.settings import DJASYNC

pytestmark = pytest.mark.django_db(transaction=True)

LIMITS = {
    "stripe": {"concurrency": 2, "rate": "100/m"},
    "tenant:*": {"concurrency": 1},
    "queue:mail": {"rate": "10/s"},
    "solo": {"concurrency": 1},
}
WITH_LIMITS = {**DJASYNC, "LIMITS": LIMITS}


@pytest.fixture
def flow_runs(transactional_db):
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {jobs.FLOW_RUNS} (key text, started "
                       "timestamptz, finished timestamptz, pid integer)")
        cursor.execute(f"TRUNCATE {jobs.FLOW_RUNS}")
    return jobs.FLOW_RUNS


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_key_matching_no_configured_limit_is_refused_at_schedule_naming_the_key():
    with pytest.raises(limits.UnknownLimit, match="'stripes'"):
        djasync.schedule(jobs.add, [1, 2], limits=["stripes"])
    with pytest.raises(limits.UnknownLimit, match="'client:7'"):
        djasync.schedule(jobs.add, [1, 2], limits=["tenant:1", "client:7"])
    assert not Job.objects.exists()


def test_limits_are_refused_when_none_are_configured():
    with pytest.raises(limits.UnknownLimit, match="configured: none"):
        djasync.schedule(jobs.add, [1, 2], limits=["stripe"])


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_job_holds_its_keys_and_its_queues_key_and_unlimited_jobs_hold_none():
    charged = djasync.schedule(jobs.add, [1, 2], limits=["stripe", "tenant:4", "stripe"])
    mail = djasync.schedule(jobs.add, [1, 2], queue="mail")
    plain = djasync.schedule(jobs.add, [1, 2])
    rows = dict(Job.objects.values_list("id", "limits"))
    assert rows == {charged.pk: ["stripe", "tenant:4"], mail.pk: ["queue:mail"],
                    plain.pk: None}
    # The rate tokens of the keys with a rate exist (made at schedule time).
    with connection.cursor() as cursor:
        cursor.execute("SELECT key, count(*) FROM djasync_ratetoken GROUP BY key ORDER BY key")
        assert cursor.fetchall() == [("queue:mail", 10), ("stripe", 100)]


@pytest.mark.parametrize("bad, message", [
    ({"x": {"concurrency": 0}}, "concurrency"),
    ({"x": {"rate": "10/d"}}, "rate"),
    ({"x": {"rate": "ten/s"}}, "rate"),
    ({"x": {}}, "concurrency"),
    ({"x": {"concurency": 2}}, "unknown"),
    ({"x*": {"concurrency": 1}}, "pattern"),
    ([("x", 1)], "must be a dict"),
])
def test_invalid_limits_are_system_check_errors(bad, message):
    with override_settings(DJASYNC={**DJASYNC, "LIMITS": bad}):
        errors = [e for e in checks.run_checks() if e.id.startswith("djasync")]
    assert [e.id for e in errors] == ["djasync.E001"]
    assert "LIMITS" in errors[0].msg and message in errors[0].msg
    with pytest.raises(ImproperlyConfigured):
        limits.parse(bad)


def test_without_limits_or_pauses_the_claim_is_the_plain_statement():
    """Jobs without limits cost nothing when no limit is configured: the claim is the plain
    statement (its one change, ``j.limits IS NULL``, is the predicate of its partial index;
    its EXPLAIN tests in test_models and test_claim_meet hold)."""
    for queues in (None, ["a"], ["a", "b"]):
        query, params = executor._claim_statement(1, queues, None, None, None)
        assert query == sql.claim(by_queue=bool(queues), by_name_prefix=False, limit=1,
                                  one_queue=queues is not None and len(queues) == 1)
        assert "paused" not in params and "djasync_claim_limited" not in query


@override_settings(DJASYNC=WITH_LIMITS)
def test_with_limits_a_claim_of_one_job_of_every_queue_is_the_lean_function_and_others_general():
    """djasync_claim_one (migration 0020) for the worker's and flush_queue's usual claim; a
    batch, a worker's --queue, a name filter and job() keep djasync_claim_limited."""
    assert executor._claim_statement(1, None, None, None, None)[0] == sql.CLAIM_ONE_LIMITED
    for limit, queues, prefix, job_id in [(2, None, None, None), (1, ["a"], None, None),
                                          (1, None, "tests.", None), (1, None, None, 7)]:
        query = executor._claim_statement(limit, queues, prefix, job_id, None)[0]
        assert query == sql.claim_limited(limit), (limit, queues, prefix, job_id)


@override_settings(DJASYNC=WITH_LIMITS)
def test_jobs_waiting_on_a_full_key_are_not_even_read_by_a_claim_of_other_jobs():
    djasync.schedule_many([djasync.JobSpec(jobs.add, [n, n], priority=5, limits=["solo"])
                           for n in range(2000)])
    plain = djasync.schedule(jobs.add, [1, 1])
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE djasync_job")
        with transaction.atomic():
            for statement in sql.CLAIM_PLAN:
                cursor.execute(statement)
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql.claim(
                by_queue=False, by_name_prefix=False), {"now": None})
            plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "Index Scan using djasync_job_claim on" in plan, plan
    assert "Rows Removed by Filter" not in plan.split("SubPlan")[0], plan
    holder = psycopg.connect(**conninfo())
    try:
        holder.execute("SELECT pg_advisory_lock(hashtext('djasync.limit:solo'), 0)")
        with transaction.atomic():
            assert [job.id for job in executor.claim(1)] == [plain.pk]
    finally:
        holder.close()


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_full_key_is_passed_over_and_other_jobs_run(other_connection):
    first = djasync.schedule(jobs.add, [1, 1], limits=["tenant:1"])
    second = djasync.schedule(jobs.add, [2, 2], limits=["tenant:1"])
    other_tenant = djasync.schedule(jobs.add, [3, 3], limits=["tenant:2"])
    plain = djasync.schedule(jobs.add, [4, 4])
    # Another session claims the first job and keeps its transaction open: tenant:1 is full.
    holder = psycopg.connect(**conninfo())
    try:
        rows = holder.execute(sql.claim_limited(1), _params()).fetchall()
        assert [row[0] for row in rows] == [first.pk]
        with transaction.atomic():
            claimed = executor.claim(5)
        assert [job.id for job in claimed] == [other_tenant.pk, plain.pk]
        holder.rollback()  # the holder's session gives tenant:1 back with its transaction
        with transaction.atomic():
            claimed = executor.claim(5)
        assert [job.id for job in claimed] == [first.pk, other_tenant.pk, plain.pk]
    finally:
        holder.close()
    assert second.pk not in [job.id for job in claimed]  # one slot, first in line took it


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_batch_takes_one_slot_per_job_of_a_key():
    for n in range(4):
        djasync.schedule(jobs.add, [n, n], limits=["stripe"])
    with transaction.atomic():
        claimed = executor.claim(4)
        assert len(claimed) == 2  # concurrency 2: re-entrant advisory locks are not reused
        with connection.cursor() as cursor:
            # Slots are two-int4 advisory locks (objsubid 2) whose first key is the key's
            # hash, as is each claimed row's mark (migration 0019: its first key mixes the
            # job's id with hashtext('djasync.job')); the claim that found stripe full also
            # marked this session as waiting on it (one int8 key, objsubid 1).
            cursor.execute(
                "SELECT objsubid, mode, CASE WHEN objsubid = 1 THEN 'waiting' "
                "       WHEN classid = (hashtext('djasync.limit:stripe')::bigint "
                "                       + 4294967296) %% 4294967296 THEN 'slot' "
                "       WHEN classid = (hashtext('djasync.job')::bigint + 4294967296) "
                "                      %% 4294967296 AND objid = ANY(%s) THEN 'mark' END, "
                "       count(*) FROM pg_locks "
                "WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                "GROUP BY 1, 2, 3 ORDER BY 1, 3", [[job.id for job in claimed]])
            assert cursor.fetchall() == [(1, "ShareLock", "waiting", 1),
                                         (2, "ExclusiveLock", "mark", 2),
                                         (2, "ExclusiveLock", "slot", 2)]


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_claimed_job_with_keys_comes_with_its_own_attempts_counted():
    # Migration 0016 counts them once the row is locked, in a statement of its own.
    from django.utils import timezone

    from djasync.models import Attempt

    tried = djasync.schedule(jobs.add, [1, 1], limits=["tenant:1"])
    fresh = djasync.schedule(jobs.add, [2, 2], limits=["tenant:2"], priority=-1)
    now = timezone.now()
    Attempt.objects.bulk_create(
        Attempt(job_id=tried.pk, number=n, started_at=now, finished_at=now, outcome="failed")
        for n in (1, 2))
    with transaction.atomic():
        claimed = executor.claim(2)
    assert [(job.id, job.previous_attempts) for job in claimed] == [(tried.pk, 2), (fresh.pk, 0)]


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_crashed_sessions_slot_is_free_as_soon_as_postgresql_ends_the_session():
    crashed = djasync.schedule(jobs.add, [1, 1], limits=["solo"])
    djasync.schedule(jobs.add, [2, 2], limits=["solo"])
    holder = psycopg.connect(**conninfo())
    pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert len(holder.execute(sql.claim_limited(1), _params()).fetchall()) == 1
    with transaction.atomic():
        assert executor.claim(1) == []  # solo is full
    with psycopg.connect(**conninfo(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])  # waits for its end
    holder.close()
    with transaction.atomic():
        # Its job is free again (its transaction rolled back), and so is the slot.
        assert [job.id for job in executor.claim(1)] == [crashed.pk]


@override_settings(DJASYNC=WITH_LIMITS)
def test_job_call_takes_a_slot_and_says_so_when_the_key_is_full():
    blocked = djasync.schedule(jobs.add, [2, 2], limits=["solo"])
    assert blocked() == 4
    job = djasync.schedule(jobs.add, [3, 3], limits=["solo"])
    holder = psycopg.connect(**conninfo())
    try:
        djasync.schedule(jobs.add, [1, 1], limits=["solo"])
        holder.execute("SELECT pg_advisory_lock(hashtext('djasync.limit:solo'), 0)")
        with pytest.raises(DjasyncError, match="limits"):
            job()
        # Given back now: close() does not wait for the server to end the session, so the
        # lock could outlive it for a moment (this test failed about 1 run in 20 so).
        holder.execute("SELECT pg_advisory_unlock(hashtext('djasync.limit:solo'), 0)")
    finally:
        holder.close()
    assert job() == 6


def test_a_paused_queue_is_not_claimed_until_resumed():
    mail = djasync.schedule(jobs.add, [1, 1], queue="mail")
    other = djasync.schedule(jobs.add, [2, 2])
    assert djasync.pause_queue("mail") is True
    assert djasync.pause_queue("mail") is False  # already paused
    for queues in (None, ["mail"], ["mail", "default"]):
        with transaction.atomic():
            assert mail.pk not in [j.id for j in executor.claim(5, queues=queues)]
    executor.drain()
    assert Job.objects.get(pk=other.pk).status == Status.SUCCEEDED
    assert Job.objects.get(pk=mail.pk).status == Status.PENDING
    assert list(PausedQueue.objects.values_list("queue", flat=True)) == ["mail"]
    assert djasync.resume_queue("mail") is True
    executor.drain()
    assert Job.objects.get(pk=mail.pk).status == Status.SUCCEEDED


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_paused_queue_is_not_claimed_with_limits_configured():
    mail = djasync.schedule(jobs.add, [1, 1], queue="mail")
    limited = djasync.schedule(jobs.add, [1, 1], queue="mail", limits=["stripe"])
    djasync.pause_queue("mail")
    assert executor.drain() == []
    djasync.resume_queue("mail")
    assert {f.job_id for f in executor.drain()} == {mail.pk, limited.pk}


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_rate_lets_n_jobs_start_per_window_and_no_more():
    for n in range(15):
        djasync.schedule(jobs.add, [n, n], queue="mail")  # queue:mail is 10/s
    first = executor.drain()
    assert len(first) == 10
    assert executor.drain() == []  # the next ones wait for the window to pass
    with connection.cursor() as cursor:  # as if a second had passed
        cursor.execute("UPDATE djasync_ratetoken SET used_at = used_at - interval '1 second'")
    assert len(executor.drain()) == 5


@override_settings(DJASYNC=WITH_LIMITS)
def test_usage_reports_running_waiting_and_rate_used():
    djasync.schedule(jobs.add, [1, 1], limits=["tenant:1"])
    djasync.schedule(jobs.add, [1, 1], limits=["tenant:1"])
    djasync.schedule(jobs.add, [1, 1], limits=["stripe"])
    holder = psycopg.connect(**conninfo())
    try:
        assert len(holder.execute(sql.claim_limited(2), _params()).fetchall()) == 2
        usage = {row["key"]: row for row in limits.usage()}
        holder.commit()  # the token taken counts once the claim has committed
        after = {row["key"]: row for row in limits.usage()}
    finally:
        holder.close()
    assert usage["tenant:*"]["running"] == 1 and usage["tenant:*"]["waiting"] == 2
    assert usage["stripe"]["running"] == 1 and usage["stripe"]["rate_used"] == 0
    assert usage["queue:mail"]["running"] == 0
    assert after["stripe"]["running"] == 0 and after["stripe"]["rate_used"] == 1


def _params(**extra):
    with override_settings(DJASYNC=WITH_LIMITS):
        params = {"queues": None, "now": None, "name_prefix": None, "job_id": None,
                  "channel": "djasync", **limits.config_params()}
    params.update(extra)
    return params


@override_settings(DJASYNC=WITH_LIMITS, TASKS={"default": {
    "BACKEND": "djasync.backends.DjasyncBackend", "QUEUES": ["default", "emails"],
    "OPTIONS": {"MAX_ATTEMPTS": 3, "LIMITS": {"tests.tasks.add": ["stripe"]}},
}})
def test_tasks_get_their_limits_from_the_backend_options_by_task_path():
    from tests import tasks

    added = tasks.add.enqueue(1, 2)
    written = tasks.write_ledger.enqueue("k")
    rows = dict(Job.objects.values_list("id", "limits"))
    assert rows == {int(added.id): ["stripe"], int(written.id): None}
    assert Job.objects.get(pk=added.id).meta == {"max_attempts": 3}


def test_a_task_limit_key_matching_no_configured_limit_is_a_check_error():
    from djasync.backends import DjasyncBackend

    backend = DjasyncBackend("x", {"OPTIONS": {"LIMITS": {"tests.tasks.add": ["nope"]}}})
    assert [e.id for e in backend.check()] == ["djasync.E104"]
    from django.core.exceptions import ImproperlyConfigured as DjangoImproperlyConfigured

    with pytest.raises(DjangoImproperlyConfigured, match="LIMITS"):
        DjasyncBackend("x", {"OPTIONS": {"LIMITS": ["stripe"]}})


CHARGE_KEYS = ["stripe", "tenant:{tenant_id}", "region:{region}"]


@override_settings(DJASYNC={**DJASYNC, "LIMITS": {**LIMITS, "region:*": {"concurrency": 5}}},
                   TASKS={"default": {"BACKEND": "djasync.backends.DjasyncBackend",
                                      "OPTIONS": {"LIMITS": {"tests.tasks.charge": CHARGE_KEYS}}}})
def test_a_tasks_limit_keys_are_formatted_from_each_calls_arguments():
    from tests import tasks

    by_position = tasks.charge.enqueue(1, 7)
    by_name = tasks.charge.enqueue(order_id=2, tenant_id="acme", region="us")
    in_extra = tasks.charge.using(priority=1).enqueue(3, 7, "eu", note="x")
    rows = dict(Job.objects.values_list("id", "limits"))
    assert rows == {int(by_position.id): ["stripe", "tenant:7", "region:eu"],
                    int(by_name.id): ["stripe", "tenant:acme", "region:us"],
                    int(in_extra.id): ["stripe", "tenant:7", "region:eu"]}


@override_settings(DJASYNC=WITH_LIMITS, TASKS={"default": {
    "BACKEND": "djasync.backends.DjasyncBackend",
    "OPTIONS": {"LIMITS": {"tests.tasks.charge": ["tenant:{tenant_id}", "shop:{note}"]}}}})
def test_a_tasks_limit_keys_are_refused_at_enqueue_when_the_call_cannot_make_them():
    from tests import tasks

    with pytest.raises(TypeError, match="do not fit its signature"):
        tasks.charge.enqueue(1)  # no tenant_id
    with pytest.raises(TypeError, match="'shop:{note}' needs the argument 'note'"):
        tasks.charge.enqueue(1, 7)
    with pytest.raises(TypeError, match="needs 'tenant_id' to be a str or an int, not None"):
        tasks.charge.enqueue(1, None, note="x")
    with pytest.raises(limits.UnknownLimit, match="'shop:x'"):  # no entry "shop:*"
        tasks.charge.enqueue(1, 7, note="x")
    assert not Job.objects.exists()


@pytest.mark.parametrize("key, code, message", [
    ("tenant:{a!r}", "djasync.E105", "no index, attribute, conversion or format"),
    ("tenant:{0}", "djasync.E105", "argument's name"),
    ("tenant:{a", "djasync.E105", "not a valid template"),
    ("tenant:{tenant}", "djasync.E105", "names tenant, which tests.tasks.add does not take"),
    ("{a}", "djasync.E104", "under a pattern"),
    ("shop:{a}", "djasync.E104", "under a pattern"),
])
def test_a_bad_task_limit_key_template_is_a_check_error(key, code, message):
    from djasync.backends import DjasyncBackend

    with override_settings(DJASYNC=WITH_LIMITS):
        # tests.tasks.add takes (a, b) and no **kwargs: a field must be a or b.
        backend = DjasyncBackend("x", {"OPTIONS": {"LIMITS": {"tests.tasks.add": [key]}}})
        errors = backend.check()
    assert [e.id for e in errors] == [code]
    assert message in errors[0].msg


def test_a_task_limit_key_template_of_a_task_that_does_not_import_is_a_check_error():
    from djasync.backends import DjasyncBackend

    with override_settings(DJASYNC=WITH_LIMITS):
        backend = DjasyncBackend("x", {"OPTIONS": {"LIMITS": {"tests.tasks.nope": ["tenant:{a}"]}}})
        assert [e.id for e in backend.check()] == ["djasync.E105"]


def test_queue_health_shows_paused_queues_and_limits(capsys):
    from django.core.management import call_command

    call_command("pause_queue", "mail")
    with override_settings(DJASYNC=WITH_LIMITS):
        djasync.schedule(jobs.add, [1, 1], limits=["tenant:3"])
        call_command("queue_health")
    out = capsys.readouterr().out
    assert "queue mail paused" in out
    assert "paused queues: mail" in out
    assert "limit tenant:*: running 0/1, waiting 1" in out
    assert "limit stripe: running 0/2, waiting 0, rate used 0 of 100/m" in out
    call_command("resume_queue", "mail")
    assert "queue mail resumed" in capsys.readouterr().out
    assert not PausedQueue.objects.exists()


def test_the_dashboard_and_the_metrics_show_paused_queues_and_limits(admin_client):
    djasync.pause_queue("mail")
    with override_settings(DJASYNC=WITH_LIMITS):
        djasync.schedule(jobs.add, [1, 1], limits=["tenant:3"])
        page = admin_client.get("/admin/djasync/job/dashboard/").content.decode()
    assert "Paused queues (no new claims): mail" in page
    assert '<th scope="row">tenant:*</th><td>0</td><td>1</td><td>1</td>' in page


def test_the_metrics_show_paused_queues_and_limit_use():
    pytest.importorskip("prometheus_client")
    from djasync_worker import metrics

    djasync.pause_queue("mail")
    with override_settings(DJASYNC=WITH_LIMITS):
        djasync.schedule(jobs.add, [1, 1], limits=["stripe"])
        families = {f.name: f for f in metrics._flow_control()}
    samples = {(name, tuple(s.labels.values())): s.value
               for name, f in families.items() for s in f.samples}
    assert samples[("djasync_queue_paused", ("mail",))] == 1
    assert samples[("djasync_limit_waiting_jobs", ("stripe",))] == 1
    assert samples[("djasync_limit_running_jobs", ("stripe",))] == 0
    assert samples[("djasync_limit_rate_used", ("stripe",))] == 0


def test_periodic_jobs_hold_their_limits_and_unknown_keys_are_check_errors():
    from django.utils import timezone

    from djasync import conf, periodic

    entry = {"cron": "* * * * *", "function": "tests.jobs.add", "args": [1, 2],
             "limits": ["stripe"]}
    with override_settings(DJASYNC={**WITH_LIMITS, "PERIODIC": [entry]}):
        assert [e.id for e in checks.run_checks() if e.id.startswith("djasync")] == []
        (parsed,) = conf.get().PERIODIC
        assert periodic.enqueue_slot(parsed, timezone.now().replace(second=0, microsecond=0))
    assert list(Job.objects.values_list("limits", flat=True)) == [["stripe"]]
    with override_settings(DJASYNC={**DJASYNC, "PERIODIC": [entry]}):
        errors = [e for e in checks.run_checks() if e.id.startswith("djasync")]
    assert [e.id for e in errors] == ["djasync.E005"] and "'stripe'" in errors[0].msg


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_groups_final_job_with_limits_waits_for_its_group_and_for_its_key():
    from djasync.scheduling import create_group

    group = create_group("g")
    members = [djasync.schedule(jobs.add, [n, n], group=group, limits=["tenant:9"])
               for n in range(2)]
    final = group.on_completion(djasync.schedule(jobs.add, [9, 9], limits=["tenant:9"]))
    ran = [f.job_id for f in executor.drain()]
    assert ran == [members[0].pk, members[1].pk, final.pk]


@override_settings(DJASYNC=WITH_LIMITS)
def test_jobs_of_free_keys_behind_a_deep_backlog_of_a_full_key_are_still_claimed():
    """Past 200 jobs it cannot take, the claim looks at each key's first jobs instead of
    reading on through the full key's backlog; it still takes the best jobs it can."""
    djasync.schedule_many([djasync.JobSpec(jobs.add, [n, n], priority=5, limits=["solo"])
                           for n in range(500)])
    tenant = djasync.schedule(jobs.add, [1, 1], priority=1, limits=["tenant:1"])
    stripe = [djasync.schedule(jobs.add, [n, n], priority=2, limits=["stripe"]).pk
              for n in range(3)]
    plain = djasync.schedule(jobs.add, [2, 2])
    holder = psycopg.connect(**conninfo())
    try:
        holder.execute("SELECT pg_advisory_lock(hashtext('djasync.limit:solo'), 0)")
        with transaction.atomic():
            claimed = [job.id for job in executor.claim(5)]
        # stripe allows 2 at once; then tenant:1, then the job without keys.
        assert claimed == [*stripe[:2], tenant.pk, plain.pk]
        with transaction.atomic():
            assert [job.id for job in executor.claim(1)] == stripe[:1]
    finally:
        holder.close()


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_job_with_keys_is_claimed_while_a_better_ranked_job_without_keys_runs_elsewhere():
    # Found reading the claim; the model-based test's long form finds it too (within two
    # rounds against migration 0010's claim). The walk of the jobs with keys stopped at the
    # best job without keys even while another worker ran it, so a worker with nothing else to
    # do left the job with keys waiting for that run to end.
    running = djasync.schedule(jobs.add, [1, 1])
    keyed = djasync.schedule(jobs.add, [2, 2], limits=["tenant:1"])
    later = djasync.schedule(jobs.add, [3, 3])
    holder = psycopg.connect(**conninfo())
    other = psycopg.connect(**conninfo())
    try:
        # Another session runs the job without keys (its claiming transaction stays open).
        rows = holder.execute(sql.claim_limited(1), _params()).fetchall()
        assert [row[0] for row in rows] == [running.pk]
        with transaction.atomic():
            assert [job.id for job in executor.claim(1)] == [keyed.pk]
            # The claim's probe of the jobs without keys gave their row locks back.
            rows = other.execute(sql.claim_limited(1), _params()).fetchall()
            assert [row[0] for row in rows] == [later.pk]
    finally:
        holder.close()
        other.close()


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_batch_takes_the_best_jobs_with_and_without_keys_in_claim_order():
    first = djasync.schedule(jobs.add, [1, 1])
    keyed = djasync.schedule(jobs.add, [2, 2], limits=["tenant:1"])
    djasync.schedule(jobs.add, [3, 3], limits=["tenant:2"])
    djasync.schedule(jobs.add, [4, 4])
    with transaction.atomic():
        assert sorted(job.id for job in executor.claim(2)) == [first.pk, keyed.pk]


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_job_with_concurrency_keys_is_locked_by_the_claiming_transaction_itself():
    # Not by a subtransaction: its row's locker is the transaction's own id (a subtransaction
    # would get an id of its own, and cost the finish a lock held by another id).
    job = djasync.schedule(jobs.add, [1, 1], limits=["tenant:1"])
    with psycopg.connect(**conninfo()) as claimer:
        assert [row[0] for row in claimer.execute(sql.claim_limited(1), _params())] == [job.pk]
        locker, own = claimer.execute(
            "SELECT xmax::text, (pg_current_xact_id()::text::bigint %% 4294967296)::text "
            "FROM djasync_job WHERE id = %s", [job.pk]).fetchone()
        assert locker == own


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_workers_commit_that_gives_a_slot_back_notifies_only_when_a_claim_waits_on_it():
    for n in range(3):
        djasync.schedule(jobs.add, [n, n], limits=["solo"])
    worker = _params(channel=None)  # a worker's claim: it sends WAKE_WAITERS before COMMIT
    with psycopg.connect(**conninfo(), autocommit=True) as listener, \
            psycopg.connect(**conninfo()) as first, psycopg.connect(**conninfo()) as other:
        listener.execute("LISTEN djasync")
        # Nobody waits: the commit that gives solo's slot back sends nothing.
        assert len(first.execute(sql.claim_limited(1), worker).fetchall()) == 1
        assert first.execute(sql.WAKE_WAITERS).fetchone() == (False,)
        first.commit()
        assert list(listener.notifies(timeout=0.2)) == []
        # Another worker's claim finds solo full and waits on it: the next commit that gives
        # the slot back wakes it (delivered at that COMMIT).
        assert len(first.execute(sql.claim_limited(1), worker).fetchall()) == 1
        assert other.execute(sql.claim_limited(1), worker).fetchall() == []
        other.commit()
        assert first.execute(sql.WAKE_WAITERS).fetchone() == (True,)
        assert list(listener.notifies(timeout=0.2)) == []  # not before the COMMIT
        first.commit()
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["*"]
        # Woken, the waiting worker takes the job; it waits no more, and the next commit
        # is silent again.
        assert len(other.execute(sql.claim_limited(1), worker).fetchall()) == 1
        assert other.execute(sql.WAKE_WAITERS).fetchone() == (False,)
        other.commit()


@override_settings(DJASYNC=WITH_LIMITS)
def test_after_a_whole_rollback_the_jobs_keys_wake_their_waiters_outside_any_transaction():
    """A worker's transaction that rolled back whole lost the claim's note of its slots'
    entries; ``sql.wake_waiters_of`` finds them from the jobs' keys (a key, or its pattern)
    and notifies only if a session waits on one of them."""
    held = djasync.schedule(jobs.add, [1, 1], limits=["solo"]).pk
    tenant = djasync.schedule(jobs.add, [2, 2], limits=["tenant:3"]).pk
    djasync.schedule(jobs.add, [3, 3], limits=["solo"])
    djasync.schedule(jobs.add, [4, 4], limits=["tenant:3"], priority=-1)
    worker = _params(channel=None)
    with psycopg.connect(**conninfo(), autocommit=True) as listener, \
            psycopg.connect(**conninfo()) as first, psycopg.connect(**conninfo()) as other, \
            psycopg.connect(**conninfo(), autocommit=True) as after:
        listener.execute("LISTEN djasync")
        # Nobody waits: silent.
        assert after.execute(sql.wake_waiters_of([held, tenant])).fetchone() == (False,)
        assert after.execute(sql.wake_waiters_of([])).fetchone() == (False,)
        assert list(listener.notifies(timeout=0.2)) == []
        # The first claim takes solo's and tenant:3's slots; another finds both full and
        # waits on their entries (solo, tenant:*). The first transaction rolls back whole.
        assert {row[0] for row in first.execute(sql.claim_limited(2), worker)} == {
            held, tenant}
        assert other.execute(sql.claim_limited(2), worker).fetchall() == []
        other.commit()
        first.rollback()
        assert list(listener.notifies(timeout=0.2)) == []  # a rollback notifies no one
        assert after.execute(sql.wake_waiters_of([tenant])).fetchone() == (True,)  # tenant:*
        assert after.execute(sql.wake_waiters_of([held])).fetchone() == (True,)  # solo
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=2)] == ["*", "*"]


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_chained_claim_rolled_back_unstarted_wakes_the_workers_waiting_on_its_slots():
    """The worker's finish message also claims its next batch; when the worker then stops
    (``on_batch`` says no), that claim is rolled back, and the slots it took wake who waits
    on them, in the same message as the ROLLBACK."""
    ids = [djasync.schedule(jobs.add, [n, n], limits=["solo"]).pk for n in range(2)]
    worker = _params(channel=None)
    with psycopg.connect(**conninfo(), autocommit=True) as listener, \
            psycopg.connect(**conninfo()) as other:
        listener.execute("LISTEN djasync")

        def on_batch(batch):
            # The next job is claimed already (its slot of solo taken): another worker's
            # claim finds solo full and waits on it.
            assert other.execute(sql.claim_limited(1), worker).fetchall() == []
            other.commit()
            return False

        executor.run_batches(1, on_batch)
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["*"]
        # The job rolled back is still there to claim, by the worker woken.
        assert [row[0] for row in other.execute(sql.claim_limited(1), worker)] == [ids[1]]
        other.rollback()
    assert Job.objects.get(pk=ids[0]).status == Status.SUCCEEDED


def _unlocked(ids):
    """The ids among ``ids`` that no transaction holds (a fresh session's SKIP LOCKED look)."""
    with psycopg.connect(**conninfo()) as look:
        return sorted(row[0] for row in look.execute(
            "SELECT id FROM djasync_job WHERE id = ANY(%s) FOR NO KEY UPDATE SKIP LOCKED",
            [list(ids)]))


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_claim_passes_over_jobs_others_run_and_locks_only_the_job_it_takes():
    # Jobs that other workers run (their rows locked) are passed over; the jobs after the one
    # taken stay unlocked, free for other workers (and so after a claim that committed).
    ids = [djasync.schedule(jobs.add, [n, n], limits=[f"tenant:{n}"]).pk for n in range(6)]
    with psycopg.connect(**conninfo()) as runner, psycopg.connect(**conninfo()) as claimer:
        runner.execute("SELECT id FROM djasync_job WHERE id = ANY(%s) FOR NO KEY UPDATE",
                       [ids[:3]])
        for _ in range(2):
            assert [row[0] for row in claimer.execute(sql.claim_limited(1), _params())] == [
                ids[3]]
            assert _unlocked(ids) == ids[4:]
            claimer.rollback()
        # A batch, once the other worker's jobs are done.
        runner.rollback()
        more = djasync.schedule(jobs.add, [9, 9], limits=["tenant:0"]).pk
        assert [row[0] for row in claimer.execute(sql.claim_limited(3), _params())] == ids[:3]
        assert _unlocked([*ids, more]) == [*ids[3:], more]
        claimer.rollback()


@override_settings(DJASYNC=WITH_LIMITS)
def test_a_batch_passes_over_a_job_whose_key_its_own_earlier_job_filled_and_leaves_it_unlocked():
    a = djasync.schedule(jobs.add, [1, 1], limits=["tenant:1"]).pk
    b = djasync.schedule(jobs.add, [2, 2], limits=["tenant:1"]).pk
    c = djasync.schedule(jobs.add, [3, 3], limits=["tenant:2"]).pk
    rated = djasync.schedule(jobs.add, [4, 4], limits=["stripe"]).pk
    d = djasync.schedule(jobs.add, [5, 5], limits=["tenant:3"]).pk
    with psycopg.connect(**conninfo()) as claimer:
        # tenant:1 has one slot: the batch's first job takes it, the second waits; the job
        # with a rate is tried on its own, in its place in the claim order.
        assert [row[0] for row in claimer.execute(sql.claim_limited(4), _params())] == [
            a, c, rated, d]
        assert _unlocked([a, b, c, rated, d]) == [b]
        claimer.rollback()


def _wait_until_blocked(watcher, pid, timeout=10.0):
    """Wait until the session ``pid`` waits on a lock (a condition, with a timeout)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if watcher.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity "
                           "WHERE pid = %s", [pid]).fetchone() == (True,):
            return
        time.sleep(0.01)
    raise AssertionError(f"session {pid} did not wait on a lock within {timeout} s")


@pytest.mark.parametrize("keys", [["tenant:7"], ["solo", "tenant:7"]])
@pytest.mark.parametrize("who", ["worker", "job() or flush_queue"])
@override_settings(DJASYNC=WITH_LIMITS)
def test_a_slot_taken_between_a_claims_look_and_its_take_strands_nothing_and_wakes_at_commit(
        keys, who):
    """The race in the claim of a job with concurrency keys: its slots are seen free, its row
    is locked, and another worker takes the last key's slot before this claim does. A job of
    one key stays locked until the claiming transaction ends (no subtransaction can give it
    back), and other workers pass it over meanwhile; a job of several keys must not keep the
    slots of its other keys. Either way the other worker may commit before anyone waits on the
    key, so the claiming transaction's COMMIT must wake the workers. The claim is held between
    its row lock and its take by a lock on the attempts table (it counts the job's attempts in
    between)."""
    import threading

    job = djasync.schedule(jobs.add, [1, 1], limits=keys).pk
    raced = keys[-1]
    params = _params(channel=None) if who == "worker" else _params()
    slot = "SELECT pg_try_advisory_lock(hashtext('djasync.limit:' || %s), 0)"
    with psycopg.connect(**conninfo(), autocommit=True) as listener, \
            psycopg.connect(**conninfo()) as gate, psycopg.connect(**conninfo()) as claimer, \
            psycopg.connect(**conninfo()) as racer, \
            psycopg.connect(**conninfo(), autocommit=True) as look:
        listener.execute("LISTEN djasync")
        gate.execute("LOCK TABLE djasync_attempt IN ACCESS EXCLUSIVE MODE")
        claimed = []
        thread = threading.Thread(target=lambda: claimed.extend(
            claimer.execute(sql.claim_limited(1), params).fetchall()))
        thread.start()
        _wait_until_blocked(look, claimer.info.backend_pid)
        # Another worker starts a job of the raced key: it holds the key's one slot.
        racer.execute("SELECT pg_advisory_xact_lock(hashtext('djasync.limit:' || %s), 0)",
                      [raced])
        gate.rollback()
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert claimed == []
        # The claimer's transaction goes on (it may run other jobs). It holds the row of a job
        # of one key (locked before the take); a job of several keys is tried in a
        # subtransaction, which gave back its row and the slots of its other keys.
        assert _unlocked([job]) == ([] if len(keys) == 1 else [job])
        for key in keys[:-1]:
            assert look.execute(slot, [key]).fetchone() == (True,), f"{key}'s slot is held"
            look.execute("SELECT pg_advisory_unlock_all()")
        racer.rollback()  # the other worker's job ends: its slot is free
        assert list(listener.notifies(timeout=0.2)) == []
        if who == "worker":
            assert claimer.execute(sql.WAKE_WAITERS).fetchone() == (True,)
            assert list(listener.notifies(timeout=0.2)) == []  # not before the COMMIT
        claimer.commit()
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["*"]
        # Woken, a worker takes the job.
        assert [row[0] for row in claimer.execute(sql.claim_limited(1), params)] == [job]
        claimer.rollback()


MIXED_LIMITS = {"duo": {"concurrency": 2}, "solo": {"concurrency": 1},
                "tenant:*": {"concurrency": 1}, "stripe": {"concurrency": 2, "rate": "100/m"},
                "burst": {"rate": "50/s"}}
MIXED_KEYS = [None, None, None, ["duo"], ["duo"], ["solo"], ["tenant:1"], ["tenant:2"],
              ["stripe"], ["burst"], ["duo", "solo"], ["gone"]]


def _claim_of_one(claimer, statement, params):
    """The job ``statement`` claims in a new transaction of ``claimer`` (rolled back after),
    whether djasync_claim_limited ran in it, and the locks of rows and slots it then held.
    Each claim starts as a new session would: waiting on no key."""
    claimer.execute("SELECT djasync_stop_waiting('{}')")
    claimer.commit()
    calls = ("SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions "
             "WHERE funcname = 'djasync_claim_limited'")
    claimer.execute("SELECT set_config('enable_sort', 'off', true), "
                    "set_config('enable_seqscan', 'off', true), "
                    "set_config('track_functions', 'pl', true)")
    (before,) = claimer.execute(calls).fetchone()  # (the backend's counts since it last
    claimed = [row[0] for row in claimer.execute(statement, params).fetchall()]  # reported)
    (after,) = claimer.execute(calls).fetchone()
    slots, rows = claimer.execute(
        "SELECT (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND granted "
        "           AND locktype = 'advisory' AND objsubid = 2), "
        "       (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND granted "
        "           AND locktype = 'transactionid')").fetchone()
    general = after - before
    claimer.rollback()
    assert len(claimed) <= 1
    return (claimed[0] if claimed else None), general > 0, (slots, rows)


@override_settings(DJASYNC={**DJASYNC, "LIMITS": MIXED_LIMITS})
def test_the_claim_of_one_job_takes_what_the_general_claim_takes_in_random_queues():
    """djasync_claim_one (the claim of one job with limits, migration 0020) settles the usual
    job itself and leaves the rest to djasync_claim_limited. Over random queues - jobs with and
    without keys, several keys, rates, a key no longer configured, priorities, jobs not yet
    due, a paused queue, rows held by an application's lock and by another worker's claims
    (marked, 0019), slots held - it claims the job the general function claims, and when it
    settles alone it holds exactly that job's row, its mark and its slot."""
    import random

    from djasync.models import PausedQueue

    params = {"queues": None, "now": None, "name_prefix": None, "job_id": None,
              "channel": None, **limits.config_params()}
    settled = fell_back = 0
    with psycopg.connect(**conninfo()) as claimer, psycopg.connect(**conninfo()) as holder:
        for seed in range(150):
            rng = random.Random(seed)
            Job.objects.all().delete()
            PausedQueue.objects.all().delete()
            specs = [djasync.JobSpec(
                jobs.add, [n, n], priority=rng.choice([0, 0, 1, 2]),
                queue=rng.choice(["default", "default", "other"]),
                run_after=None if rng.random() < 0.85 else datetime.timedelta(hours=1),
                limits=rng.choice(MIXED_KEYS[:-1])) for n in range(rng.randint(1, 14))]
            ids = [job.pk for job in djasync.schedule_many(specs)]
            if rng.random() < 0.2:  # a key configured when the job was queued, not now
                Job.objects.filter(pk=rng.choice(ids)).update(limits=["gone"])
            if rng.random() < 0.2:
                djasync.pause_queue("other")
            running = rng.sample(ids, rng.randint(0, min(3, len(ids))))
            holder.execute("SELECT id FROM djasync_job WHERE id = ANY(%s) FOR NO KEY UPDATE",
                           [running])
            for _ in range(rng.randint(0, 2)):  # another worker's claims: rows marked
                running += [row[0] for row in holder.execute(sql.claim_limited(1), params)]
            for key in rng.sample(["duo", "solo", "tenant:1", "tenant:2", "stripe"],
                                  rng.randint(0, 2)):
                holder.execute("SELECT pg_try_advisory_xact_lock("
                               "hashtext('djasync.limit:' || %s), %s)", [key, rng.randint(0, 1)])
            by_general, _, _ = _claim_of_one(claimer, sql.claim_limited(1), params)
            by_one, general_ran, held = _claim_of_one(claimer, sql.CLAIM_ONE_LIMITED, params)
            holder.rollback()
            context = f"seed {seed}: jobs {list(zip(ids, specs, strict=True))}, running {running}"
            assert by_one == by_general, context
            if general_ran:
                fell_back += 1
            else:
                settled += 1
                # Alone: the claimed row and its mark and slot, or (no job with keys due) the
                # plain claim's row; nothing else.
                assert held in ((2, 1), (0, 1), (0, 0)), (held, context)
    # Both halves were exercised (a share that a change in the random queues may move).
    assert settled >= 25 and fell_back >= 25, (settled, fell_back)
