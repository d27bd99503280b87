"""flashsale.memory: start-up frozen, and collections only when something piles up."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from flashsale import memory


class Node:
    def __init__(self) -> None:
        self.other: Any = None


@pytest.fixture
def settled() -> Iterator[None]:
    """settle() in this process, undone afterwards for the other tests."""
    thresholds = gc.get_threshold()
    memory.settle()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations of the automatic collections made while the test runs."""
    seen: list[int] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


def test_settle_freezes_start_up_and_raises_the_thresholds(settled: None) -> None:
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == memory.GC_THRESHOLDS


def test_requests_alive_together_start_no_collection(settled: None,
                                                      collections: list[int]) -> None:
    # Like what 200 waiting requests hold (dicts, lists, objects), freed by
    # reference counting once answered: at the default threshold (700) this alone
    # started several collections.
    for _ in range(20):
        waiting = [{"request": [Node(), Node()], "headers": {}} for _ in range(1000)]
        del waiting
    assert collections == []


def test_garbage_in_cycles_is_still_collected(settled: None, collections: list[int]) -> None:
    first = Node()
    first.other = Node()
    first.other.other = first  # a cycle: reference counting alone never frees it
    alive = weakref.ref(first)
    del first
    for _ in range(memory.GC_THRESHOLDS[0]):  # more cycles than the threshold
        node = Node()
        node.other = Node()
        node.other.other = node
    del node
    assert collections, "no automatic collection past the threshold"
    assert alive() is None
