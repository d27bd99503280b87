"""The deferred database: each process initialises it from DATABASE_URL at start."""

from __future__ import annotations

import os
import select
import threading
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

Statement = tuple[str, Sequence[Any]]
# What turns a driver's error into peewee's in execute_sql, for the statements after a
# batch's first (the driver raises their errors as it reaches them).
_AS_PEEWEE_ERRORS: Any = vars(peewee)["__exception_wrapper__"]


class MySQL(ReconnectMixin, peewee.MySQLDatabase):  # type: ignore[misc]
    """One long-lived connection per thread, opened again if the server dropped it.

    Reconnecting happens only outside a transaction; a transaction that loses its
    connection fails, and its batch is applied again by the next drainer.

    A transaction costs no round trip of its own: its BEGIN goes to the server with its
    first statement, and ``execute_batch(..., commit=True)`` sends its COMMIT after its
    last statements. A connection the server closed while it sat idle (a restart,
    ``wait_timeout``) has its end-of-file or error waiting on the socket: then BEGIN is
    sent alone, and ReconnectMixin opens a new connection for it, as before.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred = _Deferred()

    def begin(self, isolation_level: str | None = None) -> None:
        if isolation_level is None and self._idle_and_open():
            self._deferred.begin = True  # sent with the first statement
            return
        self._deferred.begin = False
        super().begin(isolation_level)

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        deferred = self._deferred
        if deferred.committed:
            raise peewee.ProgrammingError(  # a bug: never retried as transient
                "a statement after its transaction's COMMIT was sent: it would run outside "
                "the transaction")
        if not deferred.begin:
            return super().execute_sql(sql, params)
        deferred.begin = False
        cursor = super().execute_sql("BEGIN;\n" + sql, params)
        with _AS_PEEWEE_ERRORS:
            cursor.nextset()  # past BEGIN's answer, to the statement's
        return cursor

    def commit(self) -> None:
        deferred = self._deferred
        if deferred.committed or deferred.begin:  # sent already, or nothing ever ran
            deferred.committed = deferred.begin = False
            return
        super().commit()

    def rollback(self) -> None:
        deferred = self._deferred
        if deferred.committed or deferred.begin:  # nothing is open on the server
            deferred.committed = deferred.begin = False
            return
        super().rollback()

    def savepoint(self) -> Any:
        return _Savepoint(self)

    def outermost(self) -> bool:
        """Whether a COMMIT sent now would end this thread's atomic() block: inside one,
        and not inside a savepoint of it."""
        return self.in_transaction() and not self._deferred.savepoints

    def committed_early(self) -> None:
        """The block's COMMIT went with its last statements: it sends nothing more."""
        self._deferred.committed = True

    def close(self) -> bool:
        closed = bool(super().close())  # (refused inside a transaction: nothing is reset)
        self._deferred.committed = self._deferred.begin = False
        self._deferred.savepoints = 0
        return closed

    def _idle_and_open(self) -> bool:
        """Whether the connection is open and nothing arrived on it since its last
        answer: neither an end-of-file nor an error the server sent before closing."""
        if self.is_closed():
            return False
        sock = getattr(self._state.conn, "_sock", None)
        if sock is None:
            return False
        poller = select.poll()
        try:
            poller.register(sock, select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False


class _Deferred(threading.local):
    """This thread's transaction state that the server has not been told yet."""

    begin = False  # a BEGIN to send with the next statement
    committed = False  # COMMIT went with the last batch; the transaction is over
    savepoints = 0  # open inside the transaction (atomic() blocks nested in it)


class _Savepoint(peewee._savepoint):  # type: ignore[misc]
    """peewee's savepoint (a nested atomic() block), counted: a COMMIT sent from inside
    one would end the whole transaction."""

    def __enter__(self) -> Any:
        entered = super().__enter__()
        self.db._deferred.savepoints += 1
        return entered

    def __exit__(self, *exc: Any) -> Any:
        self.db._deferred.savepoints -= 1
        return super().__exit__(*exc)


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
    """One write transaction (a savepoint inside one); on SQLite it takes the write lock
    up front. The database's own atomic(), not the proxy's, so that MySQL counts its
    savepoints (see execute_batch's ``commit``)."""
    if is_sqlite():
        return db.obj.atomic("IMMEDIATE")
    return db.obj.atomic()


def execute_batch(statements: Sequence[Statement], *,
                  commit: bool = False) -> list[list[tuple[Any, ...]]]:
    """Run ``statements`` in order and return the rows of each: on MySQL in one round
    trip (a multi-statement; the server stops at the first that fails, whose error is
    raised here), on SQLite one by one. Errors are peewee's, as from ``execute_sql``.

    ``commit``: they are the last statements of the enclosing ``atomic()`` block, whose
    COMMIT goes with them (MySQL; it runs only if they all succeeded). The block then
    sends nothing more: a statement after it raises instead of running outside the
    transaction. Inside a nested block (a savepoint), and on SQLite, the outermost block
    commits as usual.
    """
    if not statements:
        return []
    mysql = db.obj if commit and isinstance(db.obj, MySQL) and db.obj.outermost() else None
    if mysql is not None:
        statements = [*statements, ("COMMIT", ())]
    if is_sqlite() or len(statements) == 1:
        return [list(db.execute_sql(sql, params).fetchall()) for sql, params in statements]
    cursor = db.execute_sql(";\n".join(sql for sql, _ in statements),
                            [value for _, params in statements for value in params])
    rows = [list(cursor.fetchall())]
    with _AS_PEEWEE_ERRORS:
        for _ in statements[1:]:
            cursor.nextset()
            rows.append(list(cursor.fetchall()))
    if mysql is not None:
        mysql.committed_early()
        rows.pop()  # COMMIT's
    return rows
