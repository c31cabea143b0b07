"""The daemon's log: one JSON object per line on stderr, and a rate limit for warnings
that a client can cause by the hundred."""

from __future__ import annotations

import json
import sys
import time

LOG_EVERY = 10.0  # a repeated warning is logged at most this often (with a count)


def log(event: str, level: str = "info", **fields: object) -> None:
    """Structured log: one JSON object per line on stderr."""
    rec = {"ts": round(time.time(), 3), "level": level, "event": event, **fields}
    try:
        sys.stderr.write(json.dumps(rec, default=str) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class Repeats:
    """log(), at most once per LOG_EVERY seconds for the same event, with the number of
    occurrences not logged in between."""

    def __init__(self) -> None:
        self._last: dict[str, list] = {}  # event -> [last logged at, suppressed]

    def __call__(self, event: str, level: str = "warning", **fields: object) -> None:
        now = time.monotonic()
        last = self._last.get(event)
        if last is not None and now - last[0] < LOG_EVERY:
            last[1] += 1
            return
        suppressed = last[1] if last is not None else 0
        self._last[event] = [now, 0]
        log(event, level=level, **fields, **({"repeated": suppressed} if suppressed else {}))
