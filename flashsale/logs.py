"""Logging set-up: one line per event, plain or JSON (LOG_FORMAT=json), UTC timestamps.

The gateway writes a line per request, so formatting is kept cheap (the timestamp's
seconds are formatted once a second) and lines are written in batches: a line waits at
most FLUSH_SECONDS for its write, a warning or an error not at all. The batches are the
handler's own: every process of the service runs with PYTHONUNBUFFERED=1 (so that what
else it prints is not held back), which makes ``sys.stdout`` write each line at once, a
system call per request.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any

import orjson

FLUSH_SECONDS = 0.25
# The handler's buffer, written out when full (about 600 access lines) or every
# FLUSH_SECONDS, whichever comes first.
BUFFER_BYTES = 64 * 1024
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


def buffered(stream: Any) -> Any:
    """A text stream of its own, buffered, on ``stream``'s file descriptor (left open when
    it is closed); ``stream`` itself when it has none (a test's capture) or a closed one."""
    try:
        return open(stream.fileno(), "w", buffering=BUFFER_BYTES, encoding="utf-8",
                    errors="backslashreplace", closefd=False)
    except (AttributeError, OSError, ValueError):  # no descriptor, or a closed one
        return stream  # (io.UnsupportedOperation is an OSError and a ValueError)


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Buffers the lines it writes and flushes them every FLUSH_SECONDS, or at once after
    a warning or an error."""

    def __init__(self, stream: Any) -> None:
        own = buffered(stream)
        super().__init__(own)
        self._owned = own is not stream  # the buffered stream made here, closed by close()
        self._stop = threading.Event()
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
        while not self._stop.wait(FLUSH_SECONDS):
            # A broken stream (its reader gone): the next line's write reports it.
            with contextlib.suppress(Exception):
                self.flush()

    def close(self) -> None:
        """Flush, and close the buffered stream made here (its file descriptor stays open)."""
        self._stop.set()
        with self.lock:  # type: ignore[union-attr]
            with contextlib.suppress(OSError, ValueError):  # a broken or closed stream
                self.flush()
            if self._owned:
                with contextlib.suppress(OSError, ValueError):
                    self.stream.close()
        super().close()


class AccessLog:
    """The line per HTTP request, written straight to the log stream.

    It is the same line the logging module would write for
    ``logger.info("GET /path", extra={"status": ..., "ms": ...})``, without building a
    LogRecord for every request: on a busy gateway that machinery was a tenth of the CPU.
    """

    def __init__(self, handler: logging.StreamHandler | None, json_lines: bool,  # type: ignore[type-arg]
                 name: str = "flashsale.access") -> None:
        self.handler = handler
        self.json_lines = json_lines
        self.name = name

    def __call__(self, method: str, path: str, status: int, ms: float) -> None:
        handler = self.handler
        if handler is None:
            return
        now = time.time()
        try:
            if self.json_lines:
                line = orjson.dumps({"ts": _timestamp(now), "level": "info",
                                     "logger": self.name, "msg": f"{method} {path}",
                                     "status": status, "ms": ms}).decode()
            else:
                line = (f"{_timestamp(now)} INFO {self.name} {method} {path} status={status} "
                        f"ms={ms}")
            with handler.lock:  # type: ignore[union-attr]
                handler.stream.write(line + "\n")
        except Exception:  # a log line never fails the request it describes (a broken
            # stdout): reported as the logging module reports its own failures, on stderr
            handler.handleError(logging.LogRecord(self.name, logging.INFO, __file__, 0,
                                                  "%s %s", (method, path), None))


_handler: BatchingStreamHandler | None = None
_json = False


def access_log(name: str = "flashsale.access") -> AccessLog:
    """The access log of the set-up made by ``setup`` (silent before it, or below INFO)."""
    enabled = logging.getLogger(name).isEnabledFor(logging.INFO)
    return AccessLog(_handler if enabled else None, _json, name)


def setup(json_lines: bool, level: int = logging.INFO) -> None:
    global _handler, _json
    handler = BatchingStreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    _handler, _json = handler, json_lines
