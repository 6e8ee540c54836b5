"""Lay out the dashboard's charts: numbers in, SVG coordinates out (the template draws them).

Django templates cannot do arithmetic, so every coordinate is computed here and the template
``admin/djasync/chart.html`` only writes elements. Nothing here touches the database.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from django.utils import timezone

from djasync.dashboard import Dashboard

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 60, 16, 12, 28
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

#: Series colours (also what the browser test looks for in the screenshot).
SUCCEEDED = "#2e7d32"
FAILED = "#c62828"
P50 = "#1565c0"
P95 = "#ef6c00"
#: One colour per queue, in order of their names; queues past the last share "other".
QUEUE_COLORS = ("#1565c0", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#558b2f", "#4e342e")
OTHER_COLOR = "#757575"


@dataclass(frozen=True)
class Line:
    name: str
    color: str
    #: SVG ``points`` of each unbroken run of values (a None breaks the line).
    polylines: list[str]
    #: Values with no neighbour, drawn as dots (a one-point polyline is invisible).
    dots: list[tuple[float, float]]


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    color: str
    label: str


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    desc: str
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str, str]]
    legend: list[tuple[str, str]]
    lines: list[Line] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    right: int = WIDTH - RIGHT
    bottom: int = HEIGHT - BOTTOM


def nice_step(target: float, *, integer: bool) -> float:
    """The smallest 1, 2 or 5 × 10^k at least ``target`` (at least 1 for counts)."""
    if target <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(target))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= target)
    return max(step, 1.0) if integer else step


def y_axis(peak: float, *, integer: bool, unit: str = "") -> tuple[float, list[float]]:
    """Return the axis maximum and its tick values (about four steps) for data up to ``peak``.

    Seconds past two minutes step in whole minutes (1, 2, 5, 10 … min), as they are labelled.
    """
    if unit == "s" and peak / 4 > 60:
        step = 60 * nice_step(peak / 4 / 60, integer=True)
    else:
        step = nice_step(peak / 4, integer=integer)
    top = step * max(1, math.ceil(peak / step - 1e-9))
    return top, [step * k for k in range(round(top / step) + 1)]


def format_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.3g} s"
    return f"{value / 60:.3g} min"


def _tick_label(value: float, unit: str) -> str:
    if unit == "s":
        return format_seconds(value) if value else "0"
    return f"{value:g}"


def _x(i: int, points: int) -> float:
    return round(LEFT + PLOT_W * i / (points - 1), 1)


def _y(value: float, top: float) -> float:
    return round(TOP + PLOT_H * (1 - value / top), 1)


def x_ticks(times: Sequence[datetime.datetime], x_of: Callable[[int], float],
            every: int = 10) -> list[tuple[float, str, str]]:
    """``(x, label, text-anchor)``: a clock-time tick every ``every`` points counted back from
    the last, which is "now" (anchored at its end so that it stays inside the chart)."""
    last = len(times) - 1
    return [(x_of(i), f"{_local(times[i]):%H:%M}", "middle")
            for i in range(last - every, -1, -every)][::-1] + [(x_of(last), "now", "end")]


def line_chart(chart_id: str, title: str, times: Sequence[datetime.datetime],
               series: Sequence[tuple[str, str, Sequence[float | None]]], *, unit: str = "",
               desc: str = "") -> Chart:
    """Lines over the sample points: ``series`` is ``(name, colour, values)``."""
    integer = unit != "s"
    peak = max((v for _, _, values in series for v in values if v is not None), default=0)
    top, ticks = y_axis(peak, integer=integer, unit=unit)
    lines = []
    for name, color, values in series:
        runs: list[list[tuple[float, float]]] = [[]]
        for i, value in enumerate(values):
            if value is None:
                runs.append([])
            else:
                runs[-1].append((_x(i, len(values)), _y(value, top)))
        lines.append(Line(
            name, color,
            polylines=[" ".join(f"{x},{y}" for x, y in run) for run in runs if len(run) > 1],
            dots=[run[0] for run in runs if len(run) == 1],
        ))
    return Chart(chart_id, title, desc,
                 y_ticks=[(_y(v, top), _tick_label(v, unit)) for v in ticks],
                 x_ticks=x_ticks(times, lambda i: _x(i, len(times))),
                 legend=[(name, color) for name, color, _ in series],
                 lines=lines)


def stacked_bar_chart(chart_id: str, title: str, times: Sequence[datetime.datetime],
                      series: Sequence[tuple[str, str, Sequence[int]]], *,
                      desc: str = "") -> Chart:
    """One bar per sample point, ``series`` stacked bottom up; the bar of point i covers the
    minute ending at it."""
    points = len(times)
    peak = max((sum(values[i] for _, _, values in series) for i in range(points)), default=0)
    top, ticks = y_axis(peak, integer=True)
    slot = PLOT_W / points
    bars = []
    for i in range(points):
        base = 0
        for name, color, values in series:
            if values[i]:
                y_top, y_base = _y(base + values[i], top), _y(base, top)
                bars.append(Bar(round(LEFT + slot * i + slot * 0.1, 1), y_top,
                                round(slot * 0.8, 1), round(y_base - y_top, 1), color,
                                f"{_local(times[i]):%H:%M}: {values[i]} {name}"))
                base += values[i]
    return Chart(chart_id, title, desc,
                 y_ticks=[(_y(v, top), _tick_label(v, "")) for v in ticks],
                 x_ticks=x_ticks(times, lambda i: round(LEFT + slot * (i + 0.5), 1)),
                 legend=[(name, color) for name, color, _ in series],
                 bars=bars)


def queue_series(depth: dict[str, list[int]]) -> list[tuple[str, str, list[int]]]:
    """One series per queue, coloured in name order; beyond the palette they add up as "other"."""
    names = sorted(depth)
    keep, rest = names[:len(QUEUE_COLORS)], names[len(QUEUE_COLORS):]
    series = [(name, color, depth[name]) for name, color in zip(keep, QUEUE_COLORS, strict=False)]
    if rest:
        other = [sum(depth[name][i] for name in rest) for i in range(len(depth[rest[0]]))]
        series.append((f"other ({len(rest)} queues)", OTHER_COLOR, other))
    return series


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def context(data: Dashboard) -> dict[str, object]:
    """What ``admin/djasync/dashboard.html`` renders: the charts and the numbers behind them."""
    times = data.times
    labels = [f"{_local(t):%H:%M}" for t in times]
    queues = queue_series(data.depth)
    flow, latency = data.throughput, data.latency
    now_depth = ", ".join(f"{name} {values[-1]}" for name, _, values in queues) or "none"
    depth_chart = line_chart(
        "djasync-depth", "Queue depth per queue", times, queues,
        desc=f"Due and unfinished jobs of each queue, sampled each minute over the last hour; "
             f"now: {now_depth}.")
    flow_chart = stacked_bar_chart(
        "djasync-throughput", "Attempts per minute", times,
        [("succeeded", SUCCEEDED, flow.succeeded), ("failed", FAILED, flow.failed)],
        desc=f"Attempts finished in each minute of the last hour: {sum(flow.succeeded)} "
             f"succeeded and {sum(flow.failed)} failed in all.")
    latency_chart = line_chart(
        "djasync-latency", "Pickup latency", times,
        [("p50", P50, latency.p50), ("p95", P95, latency.p95)], unit="s",
        desc=f"Seconds from due to started, p50 and p95 of the jobs started in each minute; "
             f"over the hour p50 {format_seconds(latency.hour_p50)}, "
             f"p95 {format_seconds(latency.hour_p95)}.")
    return {
        "data": data,
        "empty": data.empty,
        "depth_chart": depth_chart,
        "depth_queues": [name for name, _, _ in queues],
        "depth_rows": [(labels[i], [values[i] for _, _, values in queues])
                       for i in range(len(times))][::-1],
        "depth_peaks": [(name, color, values[-1], max(values)) for name, color, values in queues],
        "flow_chart": flow_chart,
        "flow_rows": [(labels[i], flow.succeeded[i], flow.failed[i])
                      for i in range(len(times))][::-1],
        "latency_chart": latency_chart,
        "latency_rows": [(labels[i], latency.started[i], _seconds(latency.p50[i]),
                          _seconds(latency.p95[i])) for i in range(len(times))][::-1],
        "latency_hour": (latency.hour_started, _seconds(latency.hour_p50),
                         _seconds(latency.hour_p95)),
        "slowest": [(s.name, s.runs, _seconds(s.avg_seconds), _seconds(s.p95_seconds),
                     _seconds(s.max_seconds)) for s in data.slowest],
        "tiles": [
            ("Due now", data.totals["depth_now"]),
            ("Succeeded, last hour", data.totals["succeeded"]),
            ("Failed attempts, last hour", data.totals["failed"]),
            ("Pickup p95, last hour", format_seconds(latency.hour_p95)),
            ("Workers alive", len(data.workers)),
        ],
    }


def _local(moment: datetime.datetime) -> datetime.datetime:
    """A sample time in the current time zone (already local when ``USE_TZ`` is off)."""
    return timezone.localtime(moment) if timezone.is_aware(moment) else moment
