"""The deferred database: each process initialises it from DATABASE_URL at start."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import peewee
import pymysql
from playhouse.db_url import connect, parse
from playhouse.shortcuts import ReconnectMixin

db = peewee.DatabaseProxy()
LOOPBACK = ("127.0.0.1", "localhost", "::1")

# A violated CHECK constraint is an integrity error, like a duplicate key: MariaDB
# (4025) and MySQL 8 (3819) report it with codes PyMySQL would map to OperationalError.
for _code in (3819, 4025):
    pymysql.err.error_map[_code] = pymysql.err.IntegrityError


class MySQL(ReconnectMixin, peewee.MySQLDatabase):  # type: ignore[misc]
    """One long-lived connection per thread, opened again if the server dropped it.

    Reconnecting happens only outside a transaction; a transaction that loses its
    connection fails, and its batch is applied again by the next drainer.
    """


def is_sqlite() -> bool:
    return isinstance(db.obj, peewee.SqliteDatabase)


def initialize(database_url: str) -> peewee.Database:
    """Bind the proxy to the database named by ``database_url`` (MySQL or SQLite)."""
    scheme = urlparse(database_url).scheme
    if scheme.startswith("sqlite"):
        path = database_url.split(":///", 1)[1] if ":///" in database_url else ""
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        database = connect(
            database_url,
            pragmas={"journal_mode": "wal", "busy_timeout": 10000, "foreign_keys": 1,
                     "synchronous": "normal"},
            timeout=10,
        )
    elif scheme == "mysql":
        params = parse(database_url)
        if params.get("host") in LOOPBACK and not any(k.startswith("ssl") for k in params):
            params["ssl_disabled"] = True  # TLS to this very machine only costs a handshake
        database = MySQL(params.pop("database"), charset="utf8mb4", connect_timeout=5,
                         read_timeout=30, write_timeout=30, **params)
    else:
        raise SystemExit(f"DATABASE_URL must be mysql://... or sqlite:///..., got {scheme!r}")
    db.initialize(database)
    return database


def atomic():
    """One write transaction; on SQLite it takes the write lock up front."""
    if is_sqlite():
        return db.obj.atomic("IMMEDIATE")
    return db.atomic()
