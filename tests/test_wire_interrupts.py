"""Ctrl-C at any point of one of djasync.wire's exchanges leaves the connection as psycopg
leaves it after a Ctrl-C: open, idle, usable by Django, with djasync's statements working.

A Ctrl-C reaches Python code only between two calls into libpq, so the tests raise
KeyboardInterrupt just before or just after each such call of a real exchange with the real
server (the wrapper below forwards every call to the real libpq connection)."""

import psycopg
import pytest
from django.db import NotSupportedError, connection

import djasync
from djasync import executor, wire
from djasync.models import Job, Outcome
from tests import jobs
from tests.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)


class Interrupting:
    """The libpq connection as Statements sees it, with a KeyboardInterrupt landing once,
    right before or right after the ``call``-th call of ``method``."""

    def __init__(self, real, method, when, call=1):
        self._real, self._method, self._when, self._left = real, method, when, call

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name != self._method or not self._left:
            return attr

        def interrupted(*args, **kwargs):
            self._left -= 1
            if self._left:
                return attr(*args, **kwargs)
            if self._when == "before":
                raise KeyboardInterrupt
            attr(*args, **kwargs)
            raise KeyboardInterrupt

        return interrupted


def usable():
    raw = connection.connection
    return (not raw.closed, raw.info.transaction_status.name, Ledger.objects.count())


@pytest.mark.parametrize("method, when, call", [
    ("enter_pipeline_mode", "before", 1),
    ("enter_pipeline_mode", "after", 1),
    ("send_query_prepared", "after", 1),
    ("send_query_prepared", "after", 2),
    ("pipeline_sync", "after", 1),
    ("flush", "after", 1),
    ("get_result", "after", 1),   # the first statement's result
    ("get_result", "after", 4),   # the Sync's (each statement: its result, then None)
    ("exit_pipeline_mode", "before", 1),
])
def test_ctrl_c_anywhere_in_an_exchange_leaves_the_connection_usable(method, when, call):
    statements = wire.statements()
    commands = [statements.command("SELECT 1"), statements.command("SELECT 2")]
    statements.pgconn = Interrupting(statements.pgconn, method, when, call)
    try:
        with pytest.raises(KeyboardInterrupt):
            statements.send(commands)
    finally:
        statements.pgconn = statements.raw.pgconn
    assert usable() == (True, "IDLE", 0)
    assert [statements.rows(r) for r in statements.send(commands)] == [[(1,)], [(2,)]]


@pytest.mark.parametrize("claim", [False, True])
def test_ctrl_c_once_a_statement_is_prepared_does_not_break_its_later_uses(monkeypatch, claim):
    """The Parse went through, but the name was not recorded: the connection's prepared names
    are asked again, instead of preparing again ("already exists") at every later use."""
    djasync.schedule(jobs.write_ledger, args=["k"])
    connection.close()  # a new session: nothing prepared
    real_exchange, real_result = wire.Statements._exchange, wire.Statements._result
    state = {"preparing": False, "left": 1}

    def exchange(self, commands, prepare=None):
        state["preparing"] = prepare is not None and (
            not claim or b"SKIP LOCKED" in commands[0][1])
        try:
            return real_exchange(self, commands, prepare)
        finally:
            state["preparing"] = False

    def result(self):
        found = real_result(self)
        if state["preparing"] and state["left"]:
            state["left"] = 0
            raise KeyboardInterrupt
        return found

    monkeypatch.setattr(wire.Statements, "_exchange", exchange)
    monkeypatch.setattr(wire.Statements, "_result", result)
    with pytest.raises(KeyboardInterrupt):
        executor.drain() if claim else djasync.schedule(jobs.add, args=[1, 2])
    monkeypatch.undo()
    assert not connection.connection.closed
    djasync.schedule(jobs.add, args=[3, 4])
    assert sorted(f.outcome for f in executor.drain()) == [Outcome.SUCCEEDED] * 2
    assert list(Ledger.objects.values_list("key", flat=True)) == ["k"]


def test_inside_psycopgs_own_pipeline_schedule_is_refused_and_the_pipeline_goes_on():
    connection.ensure_connection()
    raw = connection.connection
    with raw.pipeline():
        cursor = raw.execute("SELECT 41")
        with pytest.raises(NotSupportedError, match="psycopg pipeline"):
            djasync.schedule(jobs.add, args=[1, 2])
        assert cursor.fetchone() == (41,)
    assert raw.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF
    assert Job.objects.count() == 0
    djasync.schedule(jobs.add, args=[1, 2])
    assert Job.objects.count() == 1


def test_a_second_ctrl_c_during_the_recovery_closes_the_connection_and_django_knows(
        monkeypatch):
    """The second Ctrl-C lands while the cancelled exchange is being read: the connection is
    closed (as psycopg gives up too), and Django is told, so that the end of the request
    replaces it, as after any lost connection."""
    Ledger.objects.count()
    statements = wire.statements()
    command = statements.command("SELECT pg_sleep(0.3)")
    real_next = wire.Statements._next
    calls = []

    def next_(self):
        calls.append(1)
        if len(calls) in (1, 2):  # first: the exchange's wait; second: the recovery's
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(wire.Statements, "_next", next_)
    with pytest.raises(KeyboardInterrupt):
        statements.send([command])
    monkeypatch.undo()
    assert connection.connection.closed and connection.errors_occurred
    connection.close_if_unusable_or_obsolete()  # what Django does at the end of a request
    djasync.schedule(jobs.add, args=[1, 2])
    assert Job.objects.count() == 1
