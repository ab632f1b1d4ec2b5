"""The spool uploader's wait between failed attempts, and what it says while they fail.

Every enqueue notifies the spool's condition (the uploader sleeps on it while the queue is
empty). A back-off waited on that same condition ended at the next put: under a checkpoint
writing packs every few milliseconds, a queue folder that failed to read was read again (and
a traceback logged) once per put, and the delay doubled to its 30 s cap within seconds, so
that once the folder read again nothing uploaded for up to 30 s (review of 34362fd: 130 puts
in 3 s gave 130 rereads and 130 tracebacks). Here the wait runs to a deadline that only a
stop, or a caller that reached the remote (`cut_short`), ends early; and a streak of failures
is logged once, when it starts, and once when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import Enum

log = logging.getLogger("storage.backends.spooled")


class Trouble(Enum):
    """Why the uploader is not uploading (None: it is)."""

    QUEUE = "its queue folder does not read"
    """A local disk error (EIO) or no file descriptor left (EMFILE): the remote may be fine."""
    REMOTE = "the remote store is unreachable"
    """A StorageError from the remote: listings refuse at once rather than retry (R1)."""
    UPLOAD = "an upload fails"
    """Anything else on a batch: a bug, or a local copy that does not read."""


class Backoff:
    """1, 2, 4 ... `cap` seconds between failed attempts; back to `first` after a success."""

    def __init__(self, cond: threading.Condition, first: float = 1.0, cap: float = 30.0) -> None:
        self._cond = cond
        self.first, self.cap = first, cap
        self.delay = first
        self._cut = False

    def wait(self, stopping: Callable[[], bool]) -> None:
        """Wait `delay` seconds, whatever is enqueued meanwhile: until `stopping()` (checked
        at every notify) or `cut_short`. Takes the condition's lock; doubles the delay."""
        deadline = time.monotonic() + self.delay
        with self._cond:
            while not stopping() and not self._cut:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._cut = False
        self.delay = min(self.delay * 2, self.cap)

    def cut_short(self) -> None:
        """Try again now (the caller reached the remote). Called under the condition's lock;
        the caller notifies."""
        self._cut = True

    def reset(self) -> None:
        self.delay, self._cut = self.first, False


class Streak:
    """The uploader's current trouble, logged once per streak rather than once per attempt."""

    def __init__(self) -> None:
        self.trouble: Trouble | None = None

    def failed(self, trouble: Trouble, message: str, *args: object, trace: bool = False) -> None:
        """Log `message` if this starts a streak of `trouble` (with the traceback if `trace`:
        a bug's is worth one, a disk error's is not)."""
        if self.trouble is not trouble:
            log.error(message, *args, exc_info=trace)
        self.trouble = trouble

    def cleared(self, *troubles: Trouble) -> None:
        """The uploader got past `troubles` (all when none is named): say so if it was in one."""
        if self.trouble is not None and (not troubles or self.trouble in troubles):
            if self.trouble is Trouble.REMOTE:
                log.info("remote storage is back: uploading the spooled checkpoints")
            else:
                log.info("the uploader works again (%s before)", self.trouble.value)
            self.trouble = None
