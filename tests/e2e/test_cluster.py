"""The data plane on a Redis Cluster: a hot product's slot moves to another node in the
middle of a load (and 500 other slots are resharded with ``redis-cli --cluster
reshard``), and nothing is lost, oversold or answered 5xx.

Runs in every pass of the e2e tier: it starts its own private 3-primary cluster (the
whole tier can also run on one: FLASHSALE_E2E_CLUSTER=1, see conftest.py).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pymysql
import pytest
from redis.cluster import RedisCluster

from tests import services
from tests.e2e.harness import Api, Reply, ServiceFactory, ServiceInstance
from tests.private_servers import PrivateRedisCluster
from tests.services import require_mysql, require_redis
from workers import keys

pytestmark = pytest.mark.e2e

STOCK = 600
CLIENTS = 60
LOAD_SECONDS = 8.0
MOVES = 3  # the hot product's slot moves this many times during the load


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedisCluster]:
    with PrivateRedisCluster(tmp_path_factory.mktemp("moving-cluster")) as started:
        yield started


@pytest.fixture(scope="module")
def clustered(cluster: PrivateRedisCluster, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[ServiceInstance]:
    factory = ServiceFactory(mysql_url=require_mysql(), redis_url=require_redis(),
                             log_root=Path(tmp_path_factory.mktemp("cluster-services")),
                             cluster_url=cluster.url)
    try:
        yield factory.get("cluster-moves")
    finally:
        factory.close()


def granted_in_database(instance: ServiceInstance, product_id: int) -> dict[str, int]:
    connection = pymysql.connect(**services.mysql_connect_kwargs(instance.env["DATABASE_URL"]))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT id, qty FROM holds WHERE product_id = %s", (product_id,))
            return {hold_id: qty for hold_id, qty in cursor.fetchall()}
    finally:
        connection.close()


async def test_a_hot_products_slot_moves_mid_load_and_nothing_is_lost(
    http: aiohttp.ClientSession, clustered: ServiceInstance, cluster: PrivateRedisCluster
) -> None:
    api = Api(http, clustered)
    pid = (await api.create_product(stock=STOCK))["id"]
    assert (await api.product(pid))["available"] == STOCK
    data = RedisCluster.from_url(cluster.url)
    product_key = clustered.key(keys.product(pid))
    assert data.exists(product_key) == 1  # the product's data lives on the cluster
    slot = data.keyslot(product_key)

    replies: list[tuple[int, Reply]] = []
    stop = time.monotonic() + LOAD_SECONDS

    async def client(n: int) -> None:
        rng = random.Random(n)
        while time.monotonic() < stop:
            qty = rng.randint(1, 3)
            replies.append((qty, await api.hold(pid, qty, prefer="wait=30")))

    async def move() -> list[int]:
        owners = []
        for n in range(MOVES):
            await asyncio.sleep(LOAD_SECONDS / (MOVES + 1))
            current = cluster.node_of_slot(slot)
            target = next(p for p in cluster.ports if p != current)
            if n == 1:  # and a bulk reshard of other slots, as an operator would run it
                others = next(p for p in cluster.ports if p not in (current, target))
                await asyncio.to_thread(cluster.reshard, others, target, 500)
            await asyncio.to_thread(cluster.move_slot, slot, target)
            owners.append(cluster.node_of_slot(slot))
        return owners

    *_, owners = await asyncio.gather(*[client(n) for n in range(CLIENTS)], move())

    assert len(owners) == MOVES and all(a != b for a, b in itertools.pairwise(owners))
    settled = [(qty, await api.settle(reply)) for qty, reply in replies]
    statuses = [reply.status for _, reply in settled]
    assert all(status in (201, 409) for status in statuses), sorted(set(statuses))
    told = {reply.body["hold_id"]: qty for qty, reply in settled if reply.status == 201}
    stored = granted_in_database(clustered, pid)
    assert set(told) <= set(stored), set(told) - set(stored)  # every 201 was committed
    assert stored == {h: q for h, q in stored.items() if h in told}  # and nothing else
    held = sum(told.values())
    assert held <= STOCK  # nothing oversold
    product = await api.wait_product(pid, available=STOCK - held)
    assert product["stock"] == STOCK
    assert sum(1 for s in statuses if s == 409) > 0  # the load did sell out
