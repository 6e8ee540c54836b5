"""Logging set-up for the daemon: one line per event, as text or as JSON."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """Format a record as one JSON object; ``extra=`` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            # RFC 3339, to the millisecond, in UTC with its offset: sortable and unambiguous
            # across hosts and daylight-saving changes.
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class TaskLifecycleFilter(logging.Filter):
    """Drop Django's own INFO lines about a Task's state (RUNNING, SUCCESSFUL).

    djasync logs one line per finished job, plain or Task, at INFO (``job succeeded``; off with
    ``DJASYNC["LOG_FINISHED_JOBS"] = False``), and a failed attempt at WARNING or ERROR. Django
    adds two INFO lines per Task; without this filter a Task would log three lines where a
    plain job logs one. Django's FAILED line (ERROR, with the traceback) is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_TASK_LOGGERS = ("django.tasks", "django_tasks")


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")
        )
    for name in ("djasync", "djasync_worker", *_TASK_LOGGERS):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, TaskLifecycleFilter)]
        if name in _TASK_LOGGERS:
            logger.addFilter(TaskLifecycleFilter())
