"""A transaction's BEGIN and COMMIT ride on its first and last statements (models.MySQL,
execute_batch(commit=True)), on MariaDB: two round trips for a drainer's round, and
nothing lost or run outside the transaction when a statement fails, when a statement
follows the COMMIT, or when the server closed the connection while it sat idle."""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator
from typing import Any

import peewee
import pymysql
import pytest

from models import atomic, db, execute_batch
from tests.integration.batches import POLICY, hold
from tests.services import mysql_connect_kwargs
from workers.apply import apply_batches

pytestmark = pytest.mark.integration


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL of every round trip PyMySQL makes (one COM_QUERY each), in order."""
    queries: list[str] = []
    original = pymysql.connections.Connection._execute_command

    def counting(self: Any, command: int, sql: Any) -> Any:
        queries.append(sql.decode(errors="replace") if isinstance(sql, bytes) else str(sql))
        return original(self, command, sql)

    monkeypatch.setattr(pymysql.connections.Connection, "_execute_command", counting)
    return queries


@pytest.fixture
def other(mysql_db: str) -> Iterator[pymysql.connections.Connection]:
    """A second connection, to see what is committed (autocommit: each read is fresh)."""
    conn = pymysql.connect(**mysql_connect_kwargs(mysql_db))
    yield conn
    conn.close()


def _stock(conn: pymysql.connections.Connection, pid: int) -> tuple[int, int]:
    with conn.cursor() as cursor:
        cursor.execute("SELECT stock, reserved FROM products WHERE id = %s", [pid])
        return cursor.fetchone()


def test_a_round_of_several_products_is_two_round_trips(
        new_product: Callable[..., int], sent: list[str],
        other: pymysql.connections.Connection) -> None:
    pids = [new_product(stock=10) for _ in range(3)]
    db.execute_sql("SELECT 1")  # the connection is open and idle
    sent.clear()

    outcomes = apply_batches({pid: [hold(pid, 2), hold(pid, 3)] for pid in pids}, POLICY)

    assert all(r.status == 201 for o in outcomes.values() for r in o.results.values())
    assert len(sent) == 2, sent
    assert sent[0].startswith("BEGIN;\n") and "FOR UPDATE" in sent[0]
    assert sent[1].startswith("UPDATE ") and sent[1].endswith(";\nCOMMIT")
    assert [_stock(other, pid) for pid in pids] == [(10, 5)] * 3  # committed


def test_a_failing_write_stops_before_the_commit_and_nothing_stays(
        new_product: Callable[..., int], other: pymysql.connections.Connection) -> None:
    pid = new_product(stock=5)

    with pytest.raises(peewee.IntegrityError), atomic():  # reserved <= stock (CHECK)
        execute_batch([("UPDATE products SET stock = 6 WHERE id = %s", [pid])])
        execute_batch([("UPDATE products SET stock = 7 WHERE id = %s", [pid]),
                       ("UPDATE products SET reserved = 9 WHERE id = %s", [pid])],
                      commit=True)

    assert _stock(other, pid) == (5, 0)
    with atomic():  # the connection and its transactions go on as before
        execute_batch([("UPDATE products SET stock = 8 WHERE id = %s", [pid])], commit=True)
    assert _stock(other, pid) == (8, 0)


def test_a_statement_after_the_commit_raises_instead_of_running_alone(
        new_product: Callable[..., int], other: pymysql.connections.Connection) -> None:
    pid = new_product(stock=5)

    with pytest.raises(peewee.ProgrammingError, match="after its transaction's COMMIT"), \
            atomic():
        execute_batch([("UPDATE products SET stock = 6 WHERE id = %s", [pid])], commit=True)
        db.execute_sql("UPDATE products SET stock = 7 WHERE id = %s", [pid])

    assert _stock(other, pid) == (6, 0)  # the transaction committed; the stray did not run
    assert db.execute_sql("SELECT 1").fetchall() == ((1,),)


def test_inside_a_savepoint_the_commit_waits_for_the_outer_transaction(
        new_product: Callable[..., int], other: pymysql.connections.Connection) -> None:
    pid = new_product(stock=5)

    with atomic():
        with atomic():
            execute_batch([("UPDATE products SET stock = 6 WHERE id = %s", [pid])],
                          commit=True)
        assert _stock(other, pid) == (5, 0)  # not committed yet
        db.execute_sql("UPDATE products SET stock = stock + 1 WHERE id = %s", [pid])

    assert _stock(other, pid) == (7, 0)


def test_an_empty_transaction_sends_nothing(mysql_db: str, sent: list[str]) -> None:
    db.execute_sql("SELECT 1")
    sent.clear()

    with atomic():
        pass

    assert sent == []


def test_a_connection_closed_while_idle_is_opened_again_for_the_next_transaction(
        new_product: Callable[..., int], sent: list[str],
        other: pymysql.connections.Connection) -> None:
    """What the server does on a restart or after ``wait_timeout``: the idle connection's
    socket holds the end, so BEGIN goes alone and ReconnectMixin reconnects for it."""
    pid = new_product(stock=10)
    mine = db.execute_sql("SELECT CONNECTION_ID()").fetchone()[0]
    with other.cursor() as cursor:
        cursor.execute(f"KILL CONNECTION {int(mine)}")
    sock = db.connection()._sock
    deadline = time.monotonic() + 5
    while not select.select([sock], [], [], 0.05)[0] and time.monotonic() < deadline:
        pass  # until the kill reaches the socket
    sent.clear()

    outcomes = apply_batches({pid: [hold(pid, 4)]}, POLICY)

    assert [r.status for r in outcomes[pid].results.values()] == [201]
    # BEGIN alone on the dead connection, then on a new one (after PyMySQL's SET NAMES)
    assert sent[0] == "BEGIN" and sent.count("BEGIN") == 2, sent
    assert db.execute_sql("SELECT CONNECTION_ID()").fetchone()[0] != mine
    assert _stock(other, pid) == (10, 4)


def test_closing_inside_a_transaction_is_refused_and_its_begin_still_goes_first(
        new_product: Callable[..., int], sent: list[str],
        other: pymysql.connections.Connection) -> None:
    pid = new_product(stock=5)
    db.execute_sql("SELECT 1")
    sent.clear()

    with atomic():
        with pytest.raises(peewee.OperationalError, match="transaction is open"):
            db.close()
        db.execute_sql("UPDATE products SET stock = 6 WHERE id = %s", [pid])
        assert _stock(other, pid) == (5, 0)  # inside the transaction, not autocommitted

    assert sent[0].startswith("BEGIN;\n")
    assert _stock(other, pid) == (6, 0)
