"""Value types shared by config models.

Every duration is finite and > 0; these bound it further where it ends in a limit of its own.
"""

import os
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator

from checkpointer.config.durations import DAY, parse_bytes, parse_duration


def _at_most(max_seconds: float) -> BeforeValidator:
    return BeforeValidator(lambda v: parse_duration(v, max_seconds))


Duration = Annotated[float, BeforeValidator(parse_duration)]
# A timeout of a child process: subprocess waits with select.poll, whose timeout is a C int of
# milliseconds (OverflowError past 2**31 ms, about 24.8 days, on every run). No CRIU dump or
# restore needs more than a day: a tree that large has to be split anyway.
Timeout = Annotated[float, _at_most(DAY)]
# Intervals of scheduled jobs and delays of the restore policy: APScheduler adds them to
# datetimes (OverflowError past year 9999: `every: 1000000w` registered, then the daemon failed
# at every start), threading.Timer waits them. Nothing useful is scheduled beyond a year.
MAX_INTERVAL = 366 * DAY
Interval = Annotated[float, _at_most(MAX_INTERVAL)]
ByteSize = Annotated[int, BeforeValidator(parse_bytes)]


def _file_name(v: object) -> object:
    """What no file name can hold (os calls fail on it with "embedded null byte", far from
    the key that said it); the type errors are pydantic's."""
    if isinstance(v, str):
        if "\0" in v:
            raise ValueError("a file name cannot hold a NUL byte")
        try:
            os.fsencode(v)
        except UnicodeEncodeError:
            raise ValueError("a lone surrogate is not a character of a file name") from None
    return v


FilePath = Annotated[Path, BeforeValidator(_file_name)]
