"""How the daemon logs: text lines, or one JSON object a line (`daemon --log-format json`)
for a log shipper; APScheduler's own INFO lines (every job run) are left out."""

from __future__ import annotations

import json
import logging


def setup_logging(fmt: str) -> None:
    if fmt == "json":

        class _Json(logging.Formatter):
            def format(self, r: logging.LogRecord) -> str:
                return json.dumps(
                    {
                        "time": self.formatTime(r),
                        "level": r.levelname,
                        "logger": r.name,
                        "message": r.getMessage(),
                    }
                )

        handler = logging.StreamHandler()
        handler.setFormatter(_Json())
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    else:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
