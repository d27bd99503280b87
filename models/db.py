"""The deferred database: each process initialises it from DATABASE_URL at start."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import peewee
import pymysql
from playhouse.db_url import connect

db = peewee.DatabaseProxy()

# A violated CHECK constraint is an integrity error, like a duplicate key: MariaDB
# (4025) and MySQL 8 (3819) report it with codes PyMySQL would map to OperationalError.
for _code in (3819, 4025):
    pymysql.err.error_map[_code] = pymysql.err.IntegrityError


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
    elif scheme in ("mysql", "mysql+pool"):
        # A pool checks connections out per use and pings them, so a restarted server
        # costs a reconnect instead of an error.
        url = "mysql+pool" + database_url[len(scheme):]
        database = connect(url, charset="utf8mb4", max_connections=32, stale_timeout=300,
                           timeout=10, connect_timeout=5, read_timeout=30, write_timeout=30)
    else:
        raise SystemExit(f"DATABASE_URL must be mysql://... or sqlite:///..., got {scheme!r}")
    db.initialize(database)
    return database


def atomic():
    """One write transaction; on SQLite it takes the write lock up front."""
    if is_sqlite():
        return db.obj.atomic("IMMEDIATE")
    return db.atomic()
