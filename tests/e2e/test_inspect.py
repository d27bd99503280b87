"""``flashsale inspect`` against a running deployment: a queue filled while the workers
were stopped, and a dead letter until it is replayed."""

from __future__ import annotations

import asyncio
import re
import time

import pymysql
import pytest

from tests.e2e.harness import Api, ServiceInstance
from tests.services import mysql_connect_kwargs
from workers import keys
from workers.protocol import Envelope

pytestmark = pytest.mark.e2e


def inspect(instance: ServiceInstance, *args: str) -> str:
    done = instance.run_command(" ".join(["flashsale inspect", *args]), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def queue_row(output: str, product_id: int) -> list[str] | None:
    """The QUEUES table's row of ``product_id``, split into cells."""
    section = output.split("\n\n", 1)[0]
    for line in section.splitlines()[2:]:
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == str(product_id):
            return cells
    return None


async def test_inspect_shows_a_queue_filled_while_workers_were_stopped(api: Api) -> None:
    pid = (await api.create_product(stock=50))["id"]
    with api.service.paused("worker"):
        replies = await asyncio.gather(*(api.hold(pid, 1, prefer="respond-async")
                                         for _ in range(7)))
        assert all(r.status == 202 for r in replies), replies
        await asyncio.sleep(1.2)  # the oldest request is now over a second old
        output = inspect(api.service)
    row = queue_row(output, pid)
    assert row is not None, output
    # product, queued, in flight, oldest, lease, wake, ready #, state
    assert row[1:3] == ["7", "0"], row
    assert float(row[3].removesuffix(" s")) >= 1.0, row
    assert row[4] == "-" and row[-1] in ("ready", "waking"), row
    assert "READY LIST: " in output and "RQ WORKERS: 2" in output, output

    for reply in replies:  # the workers are back: the queue drains
        assert (await api.settle(reply)).status == 201
    deadline = time.monotonic() + 10
    while queue_row(inspect(api.service), pid) is not None:
        assert time.monotonic() < deadline, inspect(api.service)
        await asyncio.sleep(0.2)


async def test_inspect_lists_a_dead_letter_until_it_is_replayed(api: Api) -> None:
    pid = (await api.create_product(stock=5))["id"]
    envelope = Envelope(id=keys.new_id("job", pid), op="hold",
                        args={"product_id": pid, "qty": 2, "hold_id": keys.new_id("hold", pid)})
    connection = pymysql.connect(**mysql_connect_kwargs(api.service.env["DATABASE_URL"]))
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO dead_letters (request_id, product_id, op, envelope, error, "
                "status_code, created_at) VALUES (%s, %s, 'hold', %s, %s, 500, %s)",
                (envelope.id, pid, envelope.encode().decode(), "ValueError: simulated",
                 int(time.time() * 1000)))
            dead_id = cursor.lastrowid
    finally:
        connection.close()
    output = inspect(api.service)
    listed = [line for line in output.splitlines() if envelope.id in line]
    assert len(listed) == 1 and listed[0].split()[0] == str(dead_id), output
    assert "ValueError: simulated" in listed[0]

    assert "flashsale dead-letters --replay ID" in output
    replay = api.service.run_command(f"flashsale dead-letters --replay {dead_id}")
    assert replay.returncode == 0, replay
    await api.wait_product(pid, timeout=10, available=3)
    assert envelope.id not in inspect(api.service)
