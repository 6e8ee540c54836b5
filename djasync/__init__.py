"""djasync: a job queue for Django whose jobs live and die with database transactions.

The public API is imported lazily so that listing ``"djasync"`` in ``INSTALLED_APPS`` does not
import models before Django's app registry is ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["deschedule", "schedule", "schedule_many", "JobSpec", "pause_queue", "resume_queue"]

if TYPE_CHECKING:  # pragma: no cover
    from djasync.limits import pause_queue, resume_queue
    from djasync.scheduling import JobSpec, deschedule, schedule, schedule_many


def __getattr__(name: str) -> Any:
    if name in ("pause_queue", "resume_queue"):
        from djasync import limits

        return getattr(limits, name)
    if name in __all__:
        from djasync import scheduling

        return getattr(scheduling, name)
    raise AttributeError(f"module 'djasync' has no attribute {name!r}")
