"""Cron expressions, checked the way the scheduler reads them (APScheduler, UTC)."""

from __future__ import annotations

from datetime import UTC, datetime

from checkpointer.errors import ConfigError


def check_cron(expr: str) -> None:
    """Raise ConfigError unless `expr` is a 5-field crontab line that fires at some time."""
    from apscheduler.triggers.cron import CronTrigger  # 40 ms: only for a config with cron

    try:
        trigger = CronTrigger.from_crontab(expr, timezone="UTC")
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"bad cron expression {expr!r}: {e} (use 5 fields: m h dom mon dow)"
        ) from e
    if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
        raise ConfigError(f"cron expression {expr!r} never fires (a day that no month has?)")
