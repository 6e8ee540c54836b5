"""djasync.testing: run jobs inside a TestCase's own transaction, no commit needed."""

import datetime
import traceback

from django.test import TestCase

import djasync
from djasync.models import Group, Job, Status
from djasync.testing import assert_scheduled, clear_queue, run_jobs, scheduled
from tests import jobs
from tests.models import Ledger


class TestingHelpersInATestCase(TestCase):
    def test_run_jobs_runs_what_the_test_scheduled_without_a_commit(self):
        djasync.schedule(jobs.write_ledger, args=["in-test"])
        assert_scheduled(jobs.write_ledger, args=["in-test"])
        [finished] = run_jobs()
        self.assertEqual(finished.result, "in-test")
        self.assertEqual(list(Ledger.objects.values_list("key", flat=True)), ["in-test"])
        self.assertEqual(scheduled().count(), 0)

    def test_later_runs_jobs_whose_run_after_is_in_the_future(self):
        job = djasync.schedule(jobs.add, args=[1, 2], run_after=datetime.timedelta(hours=2))
        self.assertEqual(run_jobs(), [])
        self.assertEqual(run_jobs(later=datetime.timedelta(hours=1)), [])
        [finished] = run_jobs(later=datetime.timedelta(hours=3))
        self.assertEqual((finished.job_id, finished.result), (job.pk, 3))

    def test_a_job_that_fails_for_good_fails_the_test(self):
        djasync.schedule(jobs.always_raise, meta={"max_attempts": 2})
        with self.assertRaisesRegex(ValueError, "always fails"):
            run_jobs()  # the test backoff is 0: both attempts run
        job = Job.objects.get()
        self.assertEqual((job.status, job.attempt_set.count()), (Status.FAILED, 2))

    def test_assert_scheduled_says_what_is_pending_when_it_fails(self):
        djasync.schedule(jobs.add, args=[1, 2])
        with self.assertRaisesRegex(AssertionError, r"expected 1 pending job\(s\) of "
                                    r"tests.jobs.echo, found 0; pending: \['tests.jobs.add"):
            assert_scheduled(jobs.echo)
        assert_scheduled(jobs.add, count=1)
        assert_scheduled(jobs.add, args=[2, 1], count=0)

    def test_a_job_that_fails_with_retries_left_fails_the_test_with_its_own_exception(self):
        job = djasync.schedule(jobs.always_raise, meta={"backoff": 3600})
        djasync.schedule(jobs.write_ledger, args=["still-runs"])
        try:
            run_jobs()
        except ValueError as exc:
            # The original exception, with the job's own frames in its traceback.
            self.assertEqual(str(exc), "this job always fails")
            frames = traceback.extract_tb(exc.__traceback__)
            self.assertIn("always_raise", [frame.name for frame in frames])
        else:
            self.fail("run_jobs() returned although the job failed")
        job.refresh_from_db()
        self.assertEqual((job.status, job.attempt_set.count()), (Status.PENDING, 1))
        self.assertEqual(list(Ledger.objects.values_list("key", flat=True)), ["still-runs"])

    def test_raise_errors_false_returns_the_failed_attempt_quietly(self):
        djasync.schedule(jobs.always_raise, meta={"backoff": 3600})
        [finished] = run_jobs(raise_errors=False)
        self.assertEqual(finished.status, Status.PENDING)
        self.assertIsInstance(finished.exception, ValueError)

    def test_clear_queue_deletes_every_job_its_attempts_and_groups(self):
        djasync.schedule(jobs.add, args=[1, 2], group="g")
        djasync.schedule(jobs.always_raise, meta={"max_attempts": 1})
        run_jobs(raise_errors=False)
        djasync.schedule(jobs.add, args=[3, 4], run_after=datetime.timedelta(days=1))
        self.assertEqual(clear_queue(), 3)
        self.assertFalse(Job.objects.exists() or Group.objects.exists())

    def test_clear_queue_as_a_decorator_empties_the_queue_before_each_call(self):
        @clear_queue
        def count_jobs() -> int:
            return Job.objects.count()

        djasync.schedule(jobs.add, args=[1, 2])
        self.assertEqual(count_jobs(), 0)
        djasync.schedule(jobs.add, args=[1, 2])
        self.assertEqual(count_jobs(), 0)
