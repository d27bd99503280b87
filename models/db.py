"""The deferred database: each process initialises it from DATABASE_URL at start."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import peewee
import pymysql
from playhouse.db_url import connect, parse
from playhouse.shortcuts import ReconnectMixin
from pymysql.constants import CLIENT

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
        # Several statements per round trip (execute_batch); every statement the service
        # sends has its values as parameters, escaped by PyMySQL, never spliced in.
        database = MySQL(params.pop("database"), charset="utf8mb4", connect_timeout=5,
                         read_timeout=30, write_timeout=30,
                         client_flag=CLIENT.MULTI_STATEMENTS, **params)
    else:
        raise SystemExit(f"DATABASE_URL must be mysql://... or sqlite:///..., got {scheme!r}")
    db.initialize(database)
    return database


def atomic():
    """One write transaction; on SQLite it takes the write lock up front."""
    if is_sqlite():
        return db.obj.atomic("IMMEDIATE")
    return db.atomic()


Statement = tuple[str, Sequence[Any]]
# What turns a driver's error into peewee's in execute_sql, for the statements after a
# batch's first (the driver raises their errors as it reaches them).
_AS_PEEWEE_ERRORS: Any = vars(peewee)["__exception_wrapper__"]


def execute_batch(statements: Sequence[Statement]) -> list[list[tuple[Any, ...]]]:
    """Run ``statements`` in order and return the rows of each: on MySQL in one round
    trip (a multi-statement; the server stops at the first that fails, whose error is
    raised here), on SQLite one by one. Errors are peewee's, as from ``execute_sql``."""
    if not statements:
        return []
    if is_sqlite() or len(statements) == 1:
        return [list(db.execute_sql(sql, params).fetchall()) for sql, params in statements]
    cursor = db.execute_sql(";\n".join(sql for sql, _ in statements),
                            [value for _, params in statements for value in params])
    rows = [list(cursor.fetchall())]
    with _AS_PEEWEE_ERRORS:
        for _ in statements[1:]:
            cursor.nextset()
            rows.append(list(cursor.fetchall()))
    return rows
