"""Validate the values ``schedule()`` stores, so that a bad value fails where it is written."""

from __future__ import annotations

import datetime
import json
import math
import re
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone

QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
#: A JSON ``\u0000`` escape (a NUL character), not the six characters ``\\u0000``.
JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

#: The keys ``meta`` may carry, with what each controls.
META_KEYS = {
    "max_attempts": "attempts before the job is marked failed (integer >= 1)",
    "timeout": "seconds the job may run (positive number)",
    "atomic": "run inside the claiming transaction (True, the default) or outside it under a "
              "renewed lease (False: for long jobs; database effects become at-least-once)",
    "backoff": "seconds before each retry, instead of DJASYNC['BACKOFF']: a number, or "
               "{'base': seconds, 'factor': >= 1 (default 2), 'max': seconds}",
}

#: The longest wait before a retry that ``meta["backoff"]`` may ask for (30 days).
BACKOFF_MAX_SECONDS = 30 * 86400
#: The keys of an exponential ``meta["backoff"]``, with their defaults.
BACKOFF_DEFAULTS = {"factor": 2.0, "max": float(BACKOFF_MAX_SECONDS)}

PRIORITY_MIN, PRIORITY_MAX = -100, 100
#: The most attempts a job may be given (``meta["max_attempts"]``; ``retry_now`` stops here).
MAX_ATTEMPTS_LIMIT = 1000


def check_queue_name(queue: Any) -> str:
    if not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue):
        raise ValueError(
            f"queue name {queue!r} is invalid: use 1-100 characters from letters, digits and "
            "'_.:-', starting with a letter or digit"
        )
    return queue


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an integer, not {type(priority).__name__}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(f"priority {priority} is outside {PRIORITY_MIN}..{PRIORITY_MAX}")
    return priority


def check_meta(meta: Any) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, not {type(meta).__name__}")
    unknown = sorted(str(k) for k in set(meta) - set(META_KEYS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in META_KEYS.items())
        raise ValueError(f"unknown meta key(s) {', '.join(unknown)}; known keys are {known}")
    if "max_attempts" in meta:
        value = meta["max_attempts"]
        if (isinstance(value, bool) or not isinstance(value, int)
                or not 1 <= value <= MAX_ATTEMPTS_LIMIT):
            raise ValueError(f"meta['max_attempts'] must be an integer 1..{MAX_ATTEMPTS_LIMIT}, "
                             f"not {value!r}")
    if "timeout" in meta:
        value = meta["timeout"]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value <= 0
            or value > 7 * 86400  # before isfinite(), which overflows on a huge int
            or not math.isfinite(value)
        ):
            raise ValueError(
                f"meta['timeout'] must be a number of seconds in (0, 604800], not {value!r}"
            )
    if "atomic" in meta and not isinstance(meta["atomic"], bool):
        raise ValueError(f"meta['atomic'] must be True or False, not {meta['atomic']!r}")
    if "backoff" in meta:
        check_backoff(meta["backoff"])
    return dict(meta)


def _is_seconds(value: Any, low: float, high: float) -> bool:
    return (not isinstance(value, bool) and isinstance(value, int | float)
            and math.isfinite(value) and low <= value <= high)


def check_backoff(backoff: Any) -> Any:
    """Refuse a ``meta["backoff"]`` that is not one of its two JSON shapes.

    A number is the same wait before every retry; ``{"base": b, "factor": f, "max": m}`` waits
    ``b·f^(n-1)`` seconds, at most ``m``, before retry ``n``. A backoff *function* is the
    ``DJASYNC["BACKOFF"]`` setting: a job row is JSON, and a worker imports only job functions.
    """
    if _is_seconds(backoff, 0, BACKOFF_MAX_SECONDS):
        return backoff
    keys = {"base", *BACKOFF_DEFAULTS}
    if isinstance(backoff, dict) and "base" in backoff and set(backoff) <= keys:
        bounds = {"base": (0, BACKOFF_MAX_SECONDS), "factor": (1, 100),
                  "max": (0, BACKOFF_MAX_SECONDS)}
        for key, value in backoff.items():
            low, high = bounds[key]
            if not _is_seconds(value, low, high):
                raise ValueError(f"meta['backoff'][{key!r}] must be a number in [{low}, {high}], "
                                 f"not {value!r}")
        return backoff
    hint = (" (a backoff function belongs in the DJASYNC['BACKOFF'] setting)"
            if isinstance(backoff, str) or callable(backoff) else "")
    raise ValueError(
        f"meta['backoff'] must be a number of seconds in [0, {BACKOFF_MAX_SECONDS}] or a dict "
        f"{{'base': seconds, 'factor': number >= 1, 'max': seconds}} ('factor' and 'max' "
        f"optional), not {backoff!r}{hint}"
    )


def backoff_seconds(backoff: Any, attempt: int) -> float:
    """Return the seconds before retry ``attempt`` (1 after the first failure) that a checked
    ``meta["backoff"]`` asks for."""
    if not isinstance(backoff, dict):
        return float(backoff)
    base = float(backoff["base"])
    factor = float(backoff.get("factor", BACKOFF_DEFAULTS["factor"]))
    cap = float(backoff.get("max", BACKOFF_DEFAULTS["max"]))
    if base == 0:
        return 0.0
    try:
        delay = base * factor ** (attempt - 1)
    except OverflowError:
        delay = math.inf
    return min(delay, cap)


def to_json(value: Any, what: str) -> Any:
    """Return ``value`` as it will be stored (JSON types only), or raise ``TypeError`` naming it."""
    try:
        text = json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} cannot be stored as JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to store") from None
    if JSON_NUL.search(text):
        raise ValueError(f"{what} contains a NUL character, which PostgreSQL cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} contains a lone surrogate, which is not valid text") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to store") from None


def check_args(args: Any) -> list[Any]:
    if args is None:
        return []
    if isinstance(args, str | bytes | dict) or not isinstance(args, list | tuple):
        raise TypeError(f"args must be a list or tuple, not {type(args).__name__}")
    return [to_json(arg, f"args[{i}] ({type(arg).__name__})") for i, arg in enumerate(args)]


def check_kwargs(kwargs: Any) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise TypeError(f"kwargs key {key!r} is not a valid Python identifier")
    return {k: to_json(v, f"kwargs[{k!r}] ({type(v).__name__})") for k, v in kwargs.items()}


def check_run_after(run_after: Any) -> datetime.datetime:
    """Return when the job may run: ``None`` is now; a timedelta is relative to now."""
    now = timezone.now()
    if run_after is None:
        return now
    if isinstance(run_after, datetime.timedelta):
        try:
            return now + run_after
        except OverflowError:
            raise ValueError(f"run_after {run_after} is too far in the future") from None
    if isinstance(run_after, datetime.datetime):
        if timezone.is_naive(run_after):
            from django.conf import settings

            if settings.USE_TZ:
                raise ValueError(
                    "run_after is a naive datetime while USE_TZ is on; pass an aware datetime "
                    "(django.utils.timezone.now() + ...) or a timedelta"
                )
            return run_after
        # Stored as UTC: PostgreSQL cannot take every offset Python can (over 15:59 hours, or
        # with seconds), and the instant is all that matters.
        try:
            return run_after.astimezone(datetime.UTC)
        except OverflowError:
            raise ValueError(f"run_after {run_after} is out of range") from None
    raise TypeError(
        f"run_after must be an aware datetime, a timedelta or None, not {type(run_after).__name__}"
    )
