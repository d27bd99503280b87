"""Logging set-up: one line per event, plain or JSON (LOG_FORMAT=json), UTC timestamps.

The gateway writes a line per request, so formatting is kept cheap (the timestamp's
seconds are formatted once a second) and lines are written in batches: a line waits at
most FLUSH_SECONDS for its write, a warning or an error not at all.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import orjson

FLUSH_SECONDS = 0.25
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_seconds: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """``2026-11-24T10:00:00.123Z``"""
    global _seconds
    whole = int(created)
    if _seconds[0] != whole:
        _seconds = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_seconds[1]}.{int((created - whole) * 1000):03d}Z"


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: record.__dict__[k] for k in record.__dict__.keys() - _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": _timestamp(record.created), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage(), **_extra(record)}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (f"{_timestamp(record.created)} {record.levelname} {record.name} "
                f"{record.getMessage()}")
        extra = _extra(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each line at once but flushes the stream every FLUSH_SECONDS (or on warnings)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        threading.Thread(target=self._flusher, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(line)
            if record.levelno >= logging.WARNING:
                self.flush()
        except Exception:
            self.handleError(record)

    def _flusher(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            self.flush()


def setup(json_lines: bool, level: int = logging.INFO) -> None:
    handler = BatchingStreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
