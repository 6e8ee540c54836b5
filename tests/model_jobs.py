"""The job function of the model-based test (tests/test_model_based.py), and what it reports.

Every job of the model calls :func:`step`. What it does is decided by its kwargs (fail its first
``fail_times`` attempts) and by instructions the test leaves in this module for a job id
(cancel or deschedule another job from inside the job; block, on the background thread, until
the test lets it go). Each call is logged in :data:`INVOCATIONS`, in this process and outside
any transaction, so the test knows every run that happened, even one whose writes rolled back.

A run's database effect is one ``Ledger`` row ``e<job id>`` written on the job's own
connection: in the job's transaction for an atomic job, committed at once for a long one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from django.db import connection

from djasync.executor import current_job
from tests.models import Ledger

#: The name of the thread that runs the test's background batches.
BACKGROUND = "model-background"


@dataclass
class Invocation:
    """One call of :func:`step`."""

    job_id: int
    attempt: int
    thread: str
    backend_pid: int
    in_transaction: bool
    #: The effect row was written (committed already if ``in_transaction`` is false).
    wrote: bool = False
    ended: bool = False
    #: The jobs it cancelled or descheduled (their rows locked by its transaction until it ends).
    cancelled: list[int] = field(default_factory=list)


@dataclass
class Gate:
    """Holds the first job the background thread runs, until the test opens it."""

    armed: bool = False
    reached: threading.Event = field(default_factory=threading.Event)
    opened: threading.Event = field(default_factory=threading.Event)
    invocation: Invocation | None = None


INVOCATIONS: list[Invocation] = []
#: job id -> [("cancel" | "deschedule", target job id, target token, target kwargs)]
ACTIONS: dict[int, list[tuple[str, int, str, dict]]] = {}
GATE = Gate()


def reset() -> None:
    INVOCATIONS.clear()
    ACTIONS.clear()
    global GATE
    GATE.opened.set()  # a run still held from an earlier example must not hang
    GATE = Gate()


def step(token, fail_times=0):
    """One model job: act as told, fail the first ``fail_times`` attempts, write the effect."""
    import djasync
    from djasync.scheduling import cancel

    running = current_job()
    assert running is not None
    connection.ensure_connection()
    invocation = Invocation(running.id, running.attempt, threading.current_thread().name,
                            connection.connection.info.backend_pid, connection.in_atomic_block)
    INVOCATIONS.append(invocation)
    try:
        for action, target, target_token, target_kwargs in ACTIONS.pop(running.id, []):
            if action == "cancel":
                count = cancel([target])
            else:
                count = djasync.deschedule(step, [target_token], target_kwargs)
            if count:  # committed with the job's own writes (or at once, for a long job)
                invocation.cancelled.append(target)
                Ledger.objects.create(key=f"cancel:{target}", note=f"by {running.id}")
        if running.attempt <= fail_times:
            if connection.in_atomic_block:  # a write that must roll back with the attempt
                Ledger.objects.create(key=f"e{running.id}", note=f"failing {running.attempt}")
            raise RuntimeError(f"attempt {running.attempt} of {fail_times} failing ones")
        Ledger.objects.create(key=f"e{running.id}", note=str(running.attempt))
        invocation.wrote = True
        gate = GATE
        if threading.current_thread().name == BACKGROUND and gate.armed:
            gate.armed = False
            gate.invocation = invocation
            gate.reached.set()
            gate.opened.wait(120)
        return token
    finally:
        invocation.ended = True


# -- The same job as Django Tasks, enqueued through djasync's backend ------------------------
# Their flow-control keys come from the backend's OPTIONS["LIMITS"] (the model test sets
# TASK_LIMITS there), templates filled from each call's ``tenant``.

from tests.tasks import task  # noqa: E402  (after step: the Tasks call it)


@task
def step_task(token, tenant, fail_times=0):
    """:func:`step` as a Task; its key is ``tenant:{tenant}``."""
    return step(token, fail_times)


@task
def paired_step_task(token, tenant, fail_times=0):
    """:func:`step` as a Task; its keys are ``pair`` and ``tenant:{tenant}``."""
    return step(token, fail_times)


#: The backend's OPTIONS["LIMITS"] for the Tasks above.
TASK_LIMITS = {
    "tests.model_jobs.step_task": ["tenant:{tenant}"],
    "tests.model_jobs.paired_step_task": ["pair", "tenant:{tenant}"],
}
