"""Redis restarted in the middle of a rush: nothing acknowledged is lost, nothing oversold.

The instance gets a Redis server of its own, with an append-only file as the README asks
for production, so the test can restart it without disturbing anything else.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis

from tests.e2e.harness import Api, Reply, ServiceFactory, ServiceInstance, free_port

pytestmark = pytest.mark.e2e

STOCK = 600
CLIENTS = 60
RESTART_AFTER = 150  # answers received before Redis goes down
WAIT = "wait=10"


class PrivateRedis:
    """A redis-server on a free port with AOF (fsync always), restartable in place."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is not on PATH"
        self.process = subprocess.Popen(
            [server, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping():
                    return
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: Redis flushes its AOF and exits
            self.process.wait(10)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def restart_service(
    service_factory: ServiceFactory, private_redis: PrivateRedis
) -> Iterator[ServiceInstance]:
    instance = service_factory.get("redis-restart", REDIS_URL=private_redis.url)
    yield instance
    service_factory.discard(instance)


async def test_redis_restart_mid_load_loses_nothing(
    http: aiohttp.ClientSession, restart_service: ServiceInstance, private_redis: PrivateRedis
) -> None:
    api = Api(http, restart_service)
    pid = (await api.create_product(stock=STOCK))["id"]
    replies: list[Reply] = []
    time_to_restart = asyncio.Event()

    async def client() -> None:
        while True:
            reply = await api.hold(pid, 1, prefer=WAIT)
            replies.append(reply)
            if len(replies) >= RESTART_AFTER:
                time_to_restart.set()
            if reply.status == 409:
                return

    async def operator() -> None:
        await asyncio.wait_for(time_to_restart.wait(), timeout=60)
        await asyncio.to_thread(private_redis.stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(private_redis.start)

    await asyncio.gather(operator(), *(client() for _ in range(CLIENTS)))

    statuses = sorted({r.status for r in replies})
    assert all(s in (201, 202, 409) for s in statuses), (
        f"unexpected statuses {statuses}: {[r for r in replies if r.status >= 500][:3]}")
    settled = [await api.settle(r, timeout=60) for r in replies]
    granted = [r.body["hold_id"] for r in settled if r.status == 201]
    assert len(granted) == len(set(granted)), "a hold id was granted twice"
    if len(granted) != STOCK:
        outcomes = Counter((r.status, r.from_job) for r in settled)
        product = await api.get(f"/api/products/{pid}")
        pytest.fail(f"{len(granted)} granted of {STOCK} in stock; outcomes (status, via job): "
                    f"{dict(outcomes)}; product now {product.body}")
    for hold_id in granted:
        reply = await api.get(f"/api/holds/{hold_id}")
        assert reply.status == 200, f"acknowledged hold {hold_id} is missing: {reply}"
    await api.wait_product(pid, stock=STOCK, available=0)
