"""Start-up objects out of the garbage collector's way.

A gateway or worker imports some 60 MB of libraries and builds its application before
serving. CPython's full (generation 2) collections go over every tracked object each
time; with all of start-up's objects among them, one took 25-55 ms here in the middle
of a rush, stalling every request of that gateway (or every request of a drainer's
round) for as long. Frozen after start-up (gc.freeze), those objects are never scanned
again: a full collection sees only what the process made since.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Call once start-up is done: collect what start-up left over, then freeze the
    rest into the permanent generation (never collected; it lives as long as the
    process anyway)."""
    gc.collect()
    gc.freeze()
