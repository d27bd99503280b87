"""The log handler batches its lines itself, whatever the stream it is given does."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator

import pytest

from flashsale import logs


@pytest.fixture
def handlers() -> Iterator[list[logs.BatchingStreamHandler]]:
    """Handlers a test made, closed after it (their flusher threads stop)."""
    made: list[logs.BatchingStreamHandler] = []
    yield made
    for handler in made:
        handler.close()


@pytest.fixture
def pipe(handlers: list[logs.BatchingStreamHandler]
         ) -> Iterator[tuple[io.TextIOWrapper, int]]:
    """A stream as stdout is under PYTHONUNBUFFERED=1 (every write goes straight to its
    file descriptor, here a pipe), and the pipe's end to read what reached it."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    stream = io.TextIOWrapper(io.FileIO(write_fd, "w"), write_through=True)
    yield stream, read_fd
    for handler in handlers:  # before the descriptor they write to is closed
        handler.close()
    handlers.clear()
    stream.close()
    os.close(read_fd)


def written(read_fd: int) -> str:
    try:
        return os.read(read_fd, 1 << 20).decode()
    except BlockingIOError:
        return ""


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("flashsale.test", level, __file__, 1, message, None, None)


def made(handlers: list[logs.BatchingStreamHandler], stream: object,
         formatter: logging.Formatter) -> logs.BatchingStreamHandler:
    handler = logs.BatchingStreamHandler(stream)
    handler.setFormatter(formatter)
    handlers.append(handler)
    return handler


def test_info_lines_wait_for_the_flush(pipe: tuple[io.TextIOWrapper, int],
                                       handlers: list[logs.BatchingStreamHandler]) -> None:
    stream, read_fd = pipe
    handler = made(handlers, stream, logs.PlainFormatter())
    access = logs.AccessLog(handler, json_lines=False)
    with handler.lock:  # type: ignore[union-attr]  # (the flusher thread waits)
        for n in range(100):
            handler.emit(record(logging.INFO, f"line {n}"))
            access("GET", f"/api/products/{n}", 200, 0.5)
        assert written(read_fd) == ""  # not a write per line
    handler.flush()
    lines = written(read_fd).splitlines()
    assert len(lines) == 200
    assert lines[0].endswith("INFO flashsale.test line 0")
    assert lines[1].endswith("INFO flashsale.access GET /api/products/0 status=200 ms=0.5")
    assert lines[-1].endswith("GET /api/products/99 status=200 ms=0.5")


def test_a_warning_is_written_at_once_after_the_lines_before_it(
        pipe: tuple[io.TextIOWrapper, int], handlers: list[logs.BatchingStreamHandler]) -> None:
    stream, read_fd = pipe
    handler = made(handlers, stream, logs.JsonFormatter())
    handler.emit(record(logging.INFO, "before"))
    handler.emit(record(logging.WARNING, "trouble"))
    lines = written(read_fd).splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["before", "trouble"]


def test_text_that_is_not_utf8_is_escaped_not_lost(
        pipe: tuple[io.TextIOWrapper, int], handlers: list[logs.BatchingStreamHandler]) -> None:
    stream, read_fd = pipe
    handler = made(handlers, stream, logs.PlainFormatter())
    handler.emit(record(logging.WARNING, "caf\udce9 \u00e9"))  # a lone surrogate
    assert written(read_fd).endswith("caf\\udce9 \u00e9\n")


def test_a_stream_without_a_file_descriptor_is_used_as_it_is(
        handlers: list[logs.BatchingStreamHandler]) -> None:
    stream = io.StringIO()
    handler = made(handlers, stream, logs.PlainFormatter())
    handler.emit(record(logging.ERROR, "seen"))
    assert handler.stream is stream
    assert stream.getvalue().endswith("ERROR flashsale.test seen\n")


def test_a_closed_file_descriptor_leaves_the_stream_as_it_is(
        handlers: list[logs.BatchingStreamHandler]) -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.close(write_fd)

    class Closed(io.StringIO):
        def fileno(self) -> int:
            return write_fd  # closed above

    stream = Closed()
    handler = made(handlers, stream, logs.PlainFormatter())
    assert handler.stream is stream


def test_closing_flushes_and_leaves_the_descriptor_open(
        pipe: tuple[io.TextIOWrapper, int], handlers: list[logs.BatchingStreamHandler]) -> None:
    stream, read_fd = pipe
    handler = made(handlers, stream, logs.PlainFormatter())
    handler.emit(record(logging.INFO, "last words"))
    handler.close()
    assert written(read_fd).endswith("INFO flashsale.test last words\n")
    stream.write("still open\n")  # the descriptor it shared with stdout
    assert written(read_fd) == "still open\n"


def test_a_broken_stream_does_not_stop_the_flusher(
        handlers: list[logs.BatchingStreamHandler]) -> None:
    class Broken(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            Broken.flushes += 1
            raise BrokenPipeError("the reader is gone")

    made(handlers, Broken(), logs.PlainFormatter())
    deadline = time.monotonic() + 10
    while Broken.flushes < 3 and time.monotonic() < deadline:  # the flusher goes on
        time.sleep(0.05)
    assert Broken.flushes >= 3


def test_an_access_line_that_cannot_be_written_does_not_fail_its_request(
        handlers: list[logs.BatchingStreamHandler], capsys: pytest.CaptureFixture[str]) -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError("the reader is gone")

    for json_lines in (False, True):
        access = logs.AccessLog(made(handlers, Broken(), logs.PlainFormatter()), json_lines)
        access("GET", "/api/products/1", 200, 0.5)  # does not raise
    assert capsys.readouterr().err.count("BrokenPipeError: the reader is gone") == 2
