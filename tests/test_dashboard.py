"""The admin dashboard: its numbers from real rows at known times, its permissions, its page,
and its charts drawn by a real headless Chromium."""

from __future__ import annotations

import datetime
import io
import os
import shutil
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.utils import timezone

import djasync
from djasync import charts, dashboard, executor
from djasync.dashboard import AliveWorker, FailingName, SlowName
from djasync.models import Attempt, Job, Outcome, Status, Worker
from tests import jobs

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/admin/djasync/job/dashboard/"
#: The end of the hour the tests look at; set again before each test (:func:`fresh_now`).
NOW = timezone.now().replace(microsecond=0)


@pytest.fixture(autouse=True)
def fresh_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """``NOW`` is the moment the test starts, not the moment this module was imported: the page
    tests ask for the hour ending at the request, and a whole test run can take minutes."""
    monkeypatch.setitem(globals(), "NOW", timezone.now().replace(microsecond=0))


def at(**delta: float) -> datetime.datetime:
    """A time before NOW: ``at(minutes=5)`` is five minutes ago."""
    return NOW - datetime.timedelta(**delta)


def job(queue: str = "default", *, name: str = "tests.jobs.add", created: datetime.datetime,
        due: datetime.datetime | None = None, status: str = Status.PENDING,
        started: datetime.datetime | None = None,
        finished: datetime.datetime | None = None) -> Job:
    return Job.objects.create(name=name, queue=queue, created_at=created, run_after=due or created,
                              status=status, started_at=started, finished_at=finished,
                              attempts=1 if started else 0)


def attempt(owner: Job, outcome: str, *, finished: datetime.datetime, seconds: float = 0.1,
            number: int = 1) -> Attempt:
    return Attempt.objects.create(job=owner, number=number, outcome=outcome, finished_at=finished,
                                  started_at=finished - datetime.timedelta(seconds=seconds))


# -- the numbers ---------------------------------------------------------------------------------


def test_the_sample_points_are_a_minute_apart_and_end_now():
    times = dashboard.sample_times(NOW)
    assert len(times) == 60 and times[-1] == NOW and times[0] == at(minutes=59)
    assert {b - a for a, b in zip(times, times[1:], strict=False)} == {
        datetime.timedelta(minutes=1)}


def test_queue_depth_counts_each_job_from_due_until_finished_at_each_point():
    job("a", created=at(hours=2))  # an old backlog job: every point
    job("a", created=at(minutes=50), status=Status.SUCCEEDED, finished=at(minutes=30))
    job("a", created=at(minutes=10, seconds=30))  # due 10.5 min ago, still pending
    job("a", created=at(minutes=5), due=NOW + datetime.timedelta(hours=1))  # scheduled: never
    # created long ago but due 20 min ago, failed 19.5 min ago: the point at -20 min only.
    job("b", created=at(hours=5), due=at(minutes=20), status=Status.FAILED,
        finished=at(minutes=19, seconds=30))
    job("b", created=at(hours=3), status=Status.SUCCEEDED, finished=at(hours=2))  # before
    job("b", created=at(minutes=30), status=Status.CANCELLED)  # no finished_at: left out
    # run early with job() (finished before due): it never waited.
    job("b", created=at(minutes=40), due=at(minutes=1), status=Status.SUCCEEDED,
        finished=at(minutes=39))
    job("c", created=at(hours=3), status=Status.SUCCEEDED, finished=at(hours=2))  # no span

    depth = dashboard.queue_depth(NOW)
    assert depth == {"a": [1] * 9 + [2] * 20 + [1] * 20 + [2] * 11,
                     "b": [0] * 39 + [1] + [0] * 20}


def test_attempts_per_minute_count_each_attempt_in_the_minute_it_finished():
    owner = job(created=at(hours=2), status=Status.SUCCEEDED, finished=at(minutes=1))
    attempt(owner, Outcome.SUCCEEDED, finished=at(minutes=59, seconds=30))  # first minute
    attempt(owner, Outcome.SUCCEEDED, finished=at(minutes=60))  # just outside the hour
    attempt(owner, Outcome.SUCCEEDED, finished=at(minutes=61))
    attempt(owner, Outcome.SUCCEEDED, finished=at(minutes=10))  # minute ending at -10 min
    attempt(owner, Outcome.ERROR, finished=at(minutes=9, seconds=59))  # the minute after
    attempt(owner, Outcome.ERROR, finished=at(minutes=9, seconds=1))
    attempt(owner, Outcome.CRASHED, finished=at(minutes=5))
    attempt(owner, Outcome.TIMED_OUT, finished=at(minutes=5))
    attempt(owner, Outcome.SUCCEEDED, finished=NOW)

    flow = dashboard.throughput(NOW)
    succeeded, failed = [0] * 60, [0] * 60
    succeeded[0], succeeded[49], succeeded[59] = 1, 1, 1
    failed[50], failed[54] = 2, 2
    assert (flow.succeeded, flow.failed) == (succeeded, failed)


def test_pickup_latency_is_from_due_to_started_per_minute_and_over_the_hour():
    def started_job(created, due, started, status=Status.SUCCEEDED):
        return job(created=created, due=due, started=started, status=status, finished=NOW)

    started_job(at(minutes=31), at(minutes=30, seconds=2), at(minutes=30))  # 2 s
    started_job(at(minutes=31), at(minutes=30, seconds=4), at(minutes=30, seconds=1), Status.FAILED)
    started_job(at(minutes=1), at(seconds=10), NOW)  # 10 s
    started_job(at(seconds=70), at(hours=2), at(seconds=50))  # due before created: 20 s
    started_job(at(minutes=3), at(minutes=-5), at(minutes=2))  # run early by job(): left out
    started_job(at(hours=3), at(hours=3), at(minutes=61))  # started before the hour
    job(created=at(minutes=20), due=NOW + datetime.timedelta(minutes=5),  # waiting for a retry
        started=at(minutes=15))
    job(created=at(hours=3), status=Status.SUCCEEDED, started=at(hours=2), finished=at(hours=2))

    latency = dashboard.pickup_latency(NOW)
    expected_started = [0] * 60
    expected_started[29], expected_started[59] = 2, 2
    assert latency.started == expected_started
    assert latency.p50[29] == pytest.approx(2.5) and latency.p95[29] == pytest.approx(2.95)
    assert latency.p50[59] == pytest.approx(15) and latency.p95[59] == pytest.approx(19.5)
    assert [i for i, value in enumerate(latency.p50) if value is not None] == [29, 59]
    assert latency.hour_started == 4
    assert latency.hour_p50 == pytest.approx(6.5) and latency.hour_p95 == pytest.approx(18.5)


def test_the_slowest_and_the_most_failing_function_names_of_the_hour():
    x = job(name="tests.jobs.x", created=at(hours=2), status=Status.SUCCEEDED, finished=NOW)
    y = job(name="tests.jobs.y", created=at(hours=2), status=Status.SUCCEEDED, finished=NOW)
    z = job(name="tests.jobs.z", created=at(hours=2), status=Status.FAILED, finished=NOW)
    attempt(x, Outcome.SUCCEEDED, finished=at(minutes=3), seconds=1)
    attempt(x, Outcome.SUCCEEDED, finished=at(minutes=2), seconds=3)
    attempt(x, Outcome.ERROR, finished=at(minutes=4), seconds=60)
    attempt(x, Outcome.SUCCEEDED, finished=at(hours=2), seconds=600)  # before the hour
    attempt(y, Outcome.SUCCEEDED, finished=at(minutes=1), seconds=5)
    for outcome in (Outcome.ERROR, Outcome.ERROR, Outcome.CRASHED, Outcome.TIMED_OUT):
        attempt(z, outcome, finished=at(minutes=20), seconds=2)
    attempt(z, Outcome.ERROR, finished=at(hours=3))  # before the hour

    assert dashboard.slowest_names(NOW) == [
        SlowName("tests.jobs.y", 1, pytest.approx(5), pytest.approx(5), pytest.approx(5)),
        SlowName("tests.jobs.x", 2, pytest.approx(2), pytest.approx(2.9), pytest.approx(3)),
    ]
    assert dashboard.failing_names(NOW) == [
        FailingName("tests.jobs.z", 4, 4, 2, 1, 1),
        FailingName("tests.jobs.x", 1, 3, 1, 0, 0),
    ]


def test_the_slowest_and_failing_tables_name_a_task_job_by_its_tasks_path():
    from djasync.registry import TASK_RUNNER

    ok = job(name=TASK_RUNNER, created=at(hours=2), status=Status.SUCCEEDED, finished=NOW)
    bad = job(name=TASK_RUNNER, created=at(hours=2), status=Status.FAILED, finished=NOW)
    Job.objects.filter(pk=ok.pk).update(args=["tests.tasks.add", [1, 2], {}])
    Job.objects.filter(pk=bad.pk).update(args=["tests.tasks.fail_once", ["k"], {}])
    attempt(ok, Outcome.SUCCEEDED, finished=at(minutes=3), seconds=2)
    attempt(bad, Outcome.ERROR, finished=at(minutes=3), seconds=1)
    assert [s.name for s in dashboard.slowest_names(NOW)] == ["tests.tasks.add"]
    assert [f.name for f in dashboard.failing_names(NOW)] == ["tests.tasks.fail_once"]


def test_workers_alive_are_those_with_a_fresh_heartbeat():
    Worker.objects.create(name="w-alive", hostname="h1", pid=10, concurrency=4, queues=["mail"],
                          last_seen=at(seconds=10), running=[1, 2], jobs_done=7,
                          started_at=at(hours=1))
    Worker.objects.create(name="w-silent", hostname="h2", pid=11, concurrency=1, queues=[],
                          last_seen=at(seconds=60))
    Worker.objects.create(name="w-stopped", hostname="h3", pid=12, concurrency=1, queues=[],
                          last_seen=at(seconds=1), stopped_at=at(seconds=1))
    assert dashboard.workers_alive(NOW) == [
        AliveWorker("w-alive", "h1", 10, 4, ["mail"], 2, 7, at(hours=1), 10.0)]


def test_a_job_run_by_the_executor_shows_up_in_the_last_minute():
    ok = djasync.schedule(jobs.add, args=[1, 2], queue="mail")
    djasync.schedule(jobs.always_raise, meta={"max_attempts": 1})
    assert len(executor.run_batch(2)) == 2
    data = dashboard.collect()
    assert (data.throughput.succeeded[-1], data.throughput.failed[-1]) == (1, 1)
    assert (sum(data.throughput.succeeded), sum(data.throughput.failed)) == (1, 1)
    assert data.latency.hour_started == 2 and data.latency.hour_p95 is not None
    assert data.latency.hour_p95 >= 0
    assert [s.name for s in data.slowest] == ["tests.jobs.add"]
    assert [f.name for f in data.failing] == ["tests.jobs.always_raise"]
    assert data.depth.get("mail", [0])[-1] == 0 and not data.empty  # ran, done
    assert Job.objects.get(pk=ok.pk).status == Status.SUCCEEDED


def test_an_empty_hour_is_empty():
    job(created=at(hours=3), status=Status.SUCCEEDED, started=at(hours=2), finished=at(hours=2))
    data = dashboard.collect(NOW)
    assert data.empty and data.depth == {} and data.slowest == [] and data.failing == []


def test_every_statement_reads_the_tables_through_an_index_not_a_scan_of_the_history():
    """Fifty thousand old finished jobs and attempts: no statement scans either table."""
    with connection.cursor() as cursor:
        cursor.execute("""
            INSERT INTO djasync_job (name, args, kwargs, meta, queue, priority, run_after, status,
                                     attempts, identity, created_at, started_at, finished_at,
                                     worker, lease_owner)
            SELECT 'tests.jobs.add', '[]', '{}', '{}', 'q' || (n %% 5), 0, t, 'succeeded', 1, '',
                   t, t, t + interval '1 second', '', ''
              FROM generate_series(1, 50000) AS n,
                   LATERAL (SELECT %s::timestamptz - n * interval '10 seconds'
                                   - interval '2 hours' AS t) AS times""", [NOW])
        cursor.execute("""
            INSERT INTO djasync_attempt (job_id, number, started_at, finished_at, outcome,
                                         exception_type, exception_message, traceback, worker)
            SELECT id, 1, started_at, finished_at, 'succeeded', '', '', '', '' FROM djasync_job""")
        cursor.execute("ANALYZE djasync_job")
        cursor.execute("ANALYZE djasync_attempt")
        for name in ("QUEUE_DEPTH", "THROUGHPUT", "PICKUP_LATENCY", "SLOWEST_NAMES",
                     "FAILING_NAMES"):
            cursor.execute("EXPLAIN " + getattr(dashboard, name), dashboard._params(NOW))
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert "Seq Scan" not in plan, f"{name} scans a whole table:\n{plan}"
    assert dashboard.collect(NOW).empty


# -- the charts ----------------------------------------------------------------------------------


def test_axis_steps_are_round_and_counts_never_get_fractional_ticks():
    assert charts.y_axis(0, integer=True) == (1, [0, 1])
    assert charts.y_axis(1, integer=True) == (1, [0, 1])
    assert charts.y_axis(37, integer=True) == (40, [0, 10, 20, 30, 40])
    assert charts.y_axis(19.5, integer=False) == (20, [0, 5, 10, 15, 20])
    assert charts.y_axis(340, integer=False, unit="s") == (360, [0, 120, 240, 360])  # minutes
    top, ticks = charts.y_axis(0.3, integer=False)
    assert top == pytest.approx(0.3) and ticks == pytest.approx([0, 0.1, 0.2, 0.3])


def test_a_line_breaks_where_a_value_is_missing_and_a_lone_value_is_a_dot():
    times = dashboard.sample_times(NOW)
    values = [None] * 60
    values[10], values[11], values[30] = 1.0, 2.0, 2.0
    chart = charts.line_chart("c", "t", times, [("p50", charts.P50, values)], unit="s")
    [line] = chart.lines
    x10, x11, x30 = (round(charts.LEFT + charts.PLOT_W * i / 59, 1) for i in (10, 11, 30))
    top, bottom = float(charts.TOP), float(charts.TOP + charts.PLOT_H)
    middle = round((top + bottom) / 2, 1)
    assert line.polylines == [f"{x10},{middle} {x11},{top}"]
    assert line.dots == [(x30, top)]
    labels = [label for _, label, _ in chart.x_ticks]
    assert labels[-1] == "now" and labels[-2] == f"{timezone.localtime(at(minutes=10)):%H:%M}"


def test_more_queues_than_colours_share_one_other_series():
    depth = {f"q{i}": [i] * 60 for i in range(9)}
    series = charts.queue_series(depth)
    assert [name for name, _, _ in series] == [f"q{i}" for i in range(7)] + ["other (2 queues)"]
    assert series[-1][2] == [7 + 8] * 60


# -- the page ------------------------------------------------------------------------------------


def staff_client(*codenames: str) -> Client:
    user = User.objects.create_user(f"staff-{'-'.join(codenames) or 'none'}", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="djasync",
                                                        codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def test_anonymous_users_are_sent_to_the_login_page():
    response = Client().get(URL)
    assert response.status_code == 302
    assert response["Location"] == f"/admin/login/?next={URL}"


def test_staff_without_the_view_permission_on_jobs_is_refused():
    assert staff_client("view_group").get(URL).status_code == 403
    assert staff_client().get(URL).status_code == 403


def test_staff_who_may_view_jobs_see_the_charts_and_their_numbers():
    # Picked up 3 s after due, failed once, then succeeded in 7.25 s.
    owner = job("mail", name="tests.jobs.slow", created=at(minutes=40), due=at(minutes=40),
                started=at(minutes=39, seconds=57), status=Status.SUCCEEDED,
                finished=at(minutes=39, seconds=49))
    attempt(owner, Outcome.ERROR, finished=at(minutes=39, seconds=58), seconds=1)
    attempt(owner, Outcome.SUCCEEDED, finished=at(minutes=39, seconds=49), seconds=7.25,
            number=2)
    job("mail", created=at(minutes=50), status=Status.SUCCEEDED, finished=at(minutes=30))
    job("mail", created=at(minutes=5))  # mail: 2 due at -40 min (the peak), 1 now
    Worker.objects.create(name="w-on-host", hostname="host", pid=1, concurrency=2, queues=[])

    for client in (staff_client("view_job"), staff_client("change_job")):
        response = client.get(URL)
        assert response.status_code == 200
        html = response.content.decode()
        for chart_id in ("djasync-depth", "djasync-throughput", "djasync-latency"):
            assert f'<svg id="{chart_id}"' in html
            assert f'<title id="{chart_id}-title">' in html
        assert "<polyline" in html and f'fill="{charts.SUCCEEDED}"' in html
        assert f'fill="{charts.FAILED}"' in html
        assert '<th scope="row">mail</th><td>1</td><td>2</td>' in html  # depth now, peak
        assert "tests.jobs.slow" in html
        assert "<td>1</td><td>7.250</td><td>7.250</td><td>7.250</td>" in html  # slowest row
        assert "<td>1</td><td>2</td><td>1</td><td>0</td><td>0</td>" in html  # failing row
        assert '<tr id="djasync-latency-hour"><td>1</td><td>3.000</td><td>3.000</td></tr>' in html
        assert "w-on-host" in html and "No jobs in the last hour" not in html


def test_an_empty_hour_says_so_instead_of_drawing_empty_charts():
    html = staff_client("view_job").get(URL).content.decode()
    assert "No jobs in the last hour" in html
    assert "<svg id=" not in html and "<polyline" not in html
    assert "No worker is alive" in html


def test_the_job_list_and_the_app_index_link_to_the_dashboard():
    client = staff_client("view_job")
    for page in ("/admin/djasync/job/", "/admin/djasync/"):
        html = client.get(page).content.decode()
        assert f'href="{URL}" id="djasync-dashboard-link"' in html, page
    assert 'id="djasync-dashboard-link"' not in staff_client("view_group").get(
        "/admin/djasync/").content.decode()


# -- in a real browser ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: Set to a path (``docs/dashboard.png``) to keep the browser test's screenshot there.
SCREENSHOT_TO = os.environ.get("DJASYNC_DASHBOARD_SCREENSHOT")


def browser_missing() -> str:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return (f"{path} not found: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver) to run the browser test")
    try:
        import PIL  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install -e . --group dev)"
    return ""


#: How long after :func:`a_busy_hour` the page may ask for its hour and still see every series
#: well above zero over most of the hour (see the test below).
LATE_BY_AT_MOST = datetime.timedelta(seconds=30)


def a_busy_hour(now: datetime.datetime) -> None:
    """Three queues, a few hundred jobs over the hour, some failing, and a worker.

    Every default and mail job waits longer than ``LATE_BY_AT_MOST``, and each minute has one
    of each, so the sample points (a minute apart, ending whenever the page asks) always find
    a backlog in both; reports have a burst half an hour ago. A job that would not have finished
    by ``now`` is still pending.
    """
    rows, attempts = [], []
    for minute in range(65):  # from a little before the hour, so that it starts busy
        for k in range(3 + (minute * 7) % 11):
            queue = ("default", "mail", "reports")[k % 3]
            name = ("shop.jobs.write_receipt", "shop.jobs.send_mail",
                    "shop.jobs.monthly_report")[k % 3]
            due = now - datetime.timedelta(minutes=minute, seconds=k)
            wait = 0.05 + ((minute * 13 + k * 5) % 17) / 10
            if queue == "default":  # a steady small backlog: each job waits 40 s to 1.6 min
                wait += 40 + (minute % 12) * 5
            elif queue == "mail":  # a steady larger one: 2.5 to 4 min
                wait += 150 + (minute % 7) * 15
            elif abs(30 - minute) < 15:  # reports: a burst half an hour ago
                wait += (15 - abs(30 - minute)) * 25
            started = due + datetime.timedelta(seconds=wait)
            failed = (k + minute) % 9 == 0
            finished = started + datetime.timedelta(seconds=0.2 + (k % 3) * 1.5)
            if finished > now or (minute < 2 and k > 4):
                rows.append(Job(name=name, queue=queue, created_at=due, run_after=due))
                continue
            rows.append(Job(name=name, queue=queue, created_at=due, run_after=due,
                            status=Status.FAILED if failed else Status.SUCCEEDED,
                            started_at=started, finished_at=finished, attempts=1))
            attempts.append((len(rows) - 1, started, finished,
                             Outcome.ERROR if failed else Outcome.SUCCEEDED))
    saved = Job.objects.bulk_create(rows)
    Attempt.objects.bulk_create(Attempt(job=saved[i], number=1, started_at=s, finished_at=f,
                                        outcome=o) for i, s, f, o in attempts)
    Worker.objects.create(name="web-1:4711", hostname="web-1", pid=4711, concurrency=4,
                          queues=["default", "mail", "reports"], last_seen=now, jobs_done=312)


@pytest.mark.parametrize("late", [datetime.timedelta(0), datetime.timedelta(seconds=0.5),
                                  datetime.timedelta(seconds=1), datetime.timedelta(seconds=7),
                                  datetime.timedelta(seconds=19.9), LATE_BY_AT_MOST])
def test_the_busy_hour_has_every_series_well_above_zero_whenever_the_page_asks(late):
    """What the browser test draws: whatever second the page's hour ends at (up to
    ``LATE_BY_AT_MOST`` after the data was made), no series is flat on zero."""
    a_busy_hour(NOW)
    data = dashboard.collect(NOW + late)
    assert sorted(data.depth) == ["default", "mail", "reports"]
    assert min(data.depth["default"]) >= 1 and sum(data.depth["default"]) >= 100
    assert min(data.depth["mail"]) >= 2 and sum(data.depth["mail"]) >= 200
    assert sum(1 for n in data.depth["reports"] if n >= 2) >= 20
    assert max(data.depth["reports"]) >= 10
    assert sum(1 for n in data.throughput.succeeded if n) >= 50
    assert sum(1 for n in data.throughput.failed if n) >= 20
    for series in (data.latency.p50, data.latency.p95):
        assert sum(1 for v in series if v is not None and v >= 10) >= 45


def pixels(image) -> list[tuple[int, int, int]]:
    data = image.convert("RGB").tobytes()
    return [tuple(data[i:i + 3]) for i in range(0, len(data), 3)]


def drawn_above_zero(chart, color: str, tolerance: int = 40) -> tuple[int, int]:
    """Pixels of a chart's screenshot within ``tolerance`` (per channel) of the hex ``color``
    inside the plot and clear of its zero line, and how many pixel columns they fill."""
    target = tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
    scale = chart.width / charts.WIDTH
    left, right = int(charts.LEFT * scale), int((charts.LEFT + charts.PLOT_W) * scale)
    top, zero = int(charts.TOP * scale), int((charts.TOP + charts.PLOT_H) * scale)
    image = chart.load()
    count, columns = 0, set()
    for x in range(left, right):
        for y in range(top, zero - 5):  # a line on zero (2 px wide) is not drawn above it
            if all(abs(a - b) <= tolerance for a, b in zip(image[x, y], target, strict=True)):
                count += 1
                columns.add(x)
    return count, len(columns)


@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "browser present")
def test_the_charts_render_in_headless_chromium(live_server, tmp_path: Path):
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    User.objects.create_user("viewer", password="secret-password", is_staff=True
                             ).user_permissions.set(Permission.objects.filter(codename="view_job"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--hide-scrollbars", "--force-color-profile=srgb",
                     "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        # Made once the browser is up: the page's hour ends at its request, a moment later.
        made = timezone.now()
        a_busy_hour(made)
        wait = WebDriverWait(driver, 20)
        driver.get(f"{live_server.url}/admin/login/?next={URL}")
        driver.find_element(By.NAME, "username").send_keys("viewer")
        driver.find_element(By.NAME, "password").send_keys("secret-password")
        driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        wait.until(lambda d: d.find_elements(By.ID, "djasync-depth"))
        late = timezone.now() - made
        assert late <= LATE_BY_AT_MOST, f"the page came {late} after its data was made"
        assert driver.title.startswith("Queue dashboard")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, height + 100)
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete")

        boxes = {}
        for chart_id in ("djasync-depth", "djasync-throughput", "djasync-latency"):
            svg = driver.find_element(By.ID, chart_id)
            boxes[chart_id] = svg.rect
            assert svg.rect["width"] > 300 and svg.rect["height"] > 80, (chart_id, svg.rect)
            # every drawn mark has a real size in the browser's layout
            sizes = driver.execute_script(
                "return Array.from(arguments[0].querySelectorAll('polyline, rect.djasync-bar'))"
                ".map(e => { const b = e.getBBox(); return [b.width, b.height]; })", svg)
            assert sizes and all(w > 0 and (h > 0 or w > 50) for w, h in sizes), chart_id
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()

    shot = tmp_path / "dashboard.png"
    shot.write_bytes(png)
    if SCREENSHOT_TO:
        Path(SCREENSHOT_TO).write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")

    def region(chart_id: str):
        box = boxes[chart_id]
        return image.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]),
                           int(box["y"] + box["height"])))

    expected = {
        "djasync-depth": charts.QUEUE_COLORS[:3],
        "djasync-throughput": (charts.SUCCEEDED, charts.FAILED),
        "djasync-latency": (charts.P50, charts.P95),
    }
    for chart_id, colors in expected.items():
        crop = region(chart_id)
        plot_width = charts.PLOT_W * crop.width / charts.WIDTH
        for color in colors:
            # every series is drawn clearly, off zero, over a good part of the hour
            count, columns = drawn_above_zero(crop, color)
            assert count > 300 and columns > plot_width * 0.3, (chart_id, color, count, columns,
                                                                 shot)
        background = crop.getpixel((2, 2))
        inked = sum(1 for pixel in pixels(crop) if pixel != background)
        assert inked > crop.width * crop.height * 0.03, (chart_id, inked, shot)


def test_the_dashboard_renders_when_use_tz_is_off(settings):
    settings.USE_TZ = False
    settings.TIME_ZONE = "Europe/Berlin"
    djasync.schedule(jobs.add, args=[1, 2])
    executor.run_batch()
    response = staff_client("view_job").get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert '<svg id="djasync-throughput"' in html and "tests.jobs.add" in html
