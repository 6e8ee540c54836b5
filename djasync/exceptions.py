"""Every error djasync raises on purpose derives from :class:`DjasyncError`."""

from django.core.exceptions import ValidationError


class DjasyncError(Exception):
    """A djasync operation could not be carried out."""


class ImproperlyConfigured(DjasyncError):
    """The DJASYNC setting is invalid."""


class ForbiddenFunction(DjasyncError):
    """The function is not in an allowed module, so djasync will not import or run it."""


class FunctionNotFound(DjasyncError):
    """The dotted name is in an allowed module but does not resolve to a callable."""


class WorkerLost(DjasyncError):
    """The worker process running the job died (killed, crashed, out of memory)."""


class JobTimedOut(DjasyncError):
    """The job ran past its timeout and its worker process was stopped."""


class GroupRuleBroken(DjasyncError, ValidationError):
    """A group rule refused the change.

    Also a Django ``ValidationError``: ``schedule()``, ``save()`` and ``full_clean()`` (the admin,
    forms) refuse the same things with the same exception.
    """

    def __str__(self) -> str:  # the message, not ValidationError's list of messages
        return str(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class GroupClosed(GroupRuleBroken):
    """The group has started running (a job of it finished), so it takes no new jobs."""


class GroupInUse(GroupRuleBroken):
    """Another generation of this group reference still has unfinished jobs."""


class UniqueJobNotVisible(DjasyncError):
    """A pending job holds this unique key, but it committed after this transaction's snapshot
    (REPEATABLE READ or SERIALIZABLE), so it cannot be read here: retry the transaction."""
