"""Fixtures of the integration tier: a fresh MariaDB database per module, Redis db 7.

The e2e tier uses Redis databases 8..15, so db 7 is ours alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pymysql
import pytest
import redis

import models
from flashsale.clock import now_ms
from models import Product
from models.migrate import migrate
from models.tables import TABLES
from tests.random_refs import random_database_name, random_product_name
from tests.services import (
    mysql_connect_kwargs,
    require_mysql,
    require_redis,
    with_database,
    with_redis_db,
)

REDIS_DB = 7


def _admin(server_url: str) -> pymysql.connections.Connection:
    kwargs = mysql_connect_kwargs(server_url)
    kwargs.pop("database", None)
    return pymysql.connect(**kwargs)


@pytest.fixture(scope="module")
def mysql_db() -> Iterator[str]:
    """A migrated database of its own for the test module, bound to ``models.db``."""
    server = require_mysql()
    name = random_database_name("fs_it")
    admin = _admin(server)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        url = with_database(server, name)
        models.initialize(url)
        # The MySQL migration sets table options on the shared model classes; put them
        # back so a later SQLite test in this process gets a plain CREATE TABLE.
        saved = {model: model._meta.table_settings for model in TABLES}
        try:
            migrate()
        finally:
            for model, settings in saved.items():
                model._meta.table_settings = settings
        yield url
    finally:
        if models.db.obj is not None:
            models.db.close()
            if hasattr(models.db.obj, "close_all"):  # the pooled MySQL database
                models.db.obj.close_all()
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return with_redis_db(require_redis(), REDIS_DB)


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[redis.Redis]:
    """A connection to the integration Redis database, flushed before and after the test."""
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    yield conn
    conn.flushdb()
    conn.close()


@pytest.fixture
def new_product(mysql_db: str) -> Callable[..., int]:
    """Creates a product row of its own; returns its id."""
    def create(stock: int, reserved: int = 0, price_cents: int = 1999) -> int:
        return Product.create(name=random_product_name(), price_cents=price_cents,
                              currency="USD", stock=stock, reserved=reserved,
                              created_at=now_ms()).id
    return create
