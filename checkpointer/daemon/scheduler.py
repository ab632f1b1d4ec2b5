"""Per-workload checkpoint schedules on APScheduler 3.

Job defaults are chosen against APScheduler's: a run that is still going is never started
again (max_instances=1), missed runs collapse into one (coalesce), and a run late because the
host was busy still happens within a generous grace time rather than being dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from checkpointer.config import check_cron

log = logging.getLogger(__name__)


def first_run_after(
    since: datetime, every: float | None, cron: str | None, jitter: float | None = None
) -> datetime | None:
    """The latest time the first scheduled run after `since` starts (jitter included), for
    the schedule `schedule()` makes of the same options; None without a schedule. An interval
    job runs on a grid from when it was scheduled, so its first run after `since` is at most
    one interval later."""
    slack = timedelta(seconds=jitter or 0)
    if every:
        return since + timedelta(seconds=every) + slack
    if cron:
        nxt = CronTrigger.from_crontab(cron, timezone="UTC").get_next_fire_time(None, since)
        return nxt + slack if nxt is not None else None
    return None


class CheckpointScheduler:
    def __init__(
        self, run: Callable[[str], None], on_skip: Callable[[str], None] = lambda reason: None
    ) -> None:
        self._run = run
        self._on_skip = on_skip
        self._sched = BackgroundScheduler(
            timezone="UTC",
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 60},
        )
        self._sched.add_listener(self._on_event, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)

    def start(self) -> None:
        self._sched.start()

    def shutdown(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=False)

    def schedule(
        self, name: str, every: float | None, cron: str | None, jitter: float | None = None
    ) -> None:
        self.unschedule(name)
        trigger: IntervalTrigger | CronTrigger
        if every:
            trigger = IntervalTrigger(seconds=every, timezone="UTC", jitter=jitter)
        elif cron:
            check_cron(cron)
            trigger = CronTrigger.from_crontab(cron, timezone="UTC")
            trigger.jitter = jitter
        else:
            return
        self._sched.add_job(self._run, trigger, args=[name], id=name, name=f"checkpoint {name}")

    def every(self, seconds: float, job_id: str, fn: Callable[[], None]) -> None:
        """A maintenance job (garbage collection), under an id no workload can take."""
        self._sched.add_job(
            fn,
            IntervalTrigger(seconds=seconds, timezone="UTC"),
            id=f"@{job_id}",
            name=job_id,
            replace_existing=True,
        )

    def unschedule(self, name: str) -> None:
        if self._sched.get_job(name):
            self._sched.remove_job(name)

    def next_run(self, name: str) -> datetime | None:
        job = self._sched.get_job(name)
        return job.next_run_time if job else None

    def _on_event(self, event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MAX_INSTANCES:
            self._on_skip("overlap")
            log.warning("checkpoint of %s skipped: the previous one is still running", event.job_id)
        else:
            self._on_skip("missed")
            log.warning("checkpoint of %s missed its time", event.job_id)
