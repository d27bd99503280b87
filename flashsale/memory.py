"""Start-up objects out of the garbage collector's way, and collections only when
garbage can have piled up.

A gateway or worker imports some 60 MB of libraries and builds its application before
serving. CPython's full (generation 2) collections go over every tracked object each
time; with all of start-up's objects among them, one took 25-55 ms here in the middle
of a rush, stalling every request of that gateway (or every request of a drainer's
round) for as long. Frozen after start-up (gc.freeze), those objects are never scanned
again: a full collection sees only what the process made since.

The collector also ran far too often. CPython collects generation 0 when the objects it
tracks, allocated since the last collection less those freed since, pass a threshold:
700 by default. A request's objects are freed by reference counting when it is answered,
but while 200 requests wait for their answers they are all alive, so every few requests
arriving together passed 700. On 100 hot products each gateway ran about 70 collections
a second, walking the waiting requests' objects again and again: 560 ms in a 14-second
run, a tenth of the gateway's CPU, with full collections of up to 29 ms. Past
``GC_THRESHOLDS`` only what really accumulates (garbage in reference cycles, a growing
number of connections) starts a collection: none in the same run. The garbage a
collection waits for is bounded by the same figure (a few MB at most).
"""

from __future__ import annotations

import gc

# (generation 0, 1, 2): generation 0 is collected after this many tracked objects more
# than were freed; generations 1 and 2 after that many collections of the one below.
GC_THRESHOLDS = (20_000, 10, 10)


def settle() -> None:
    """Call once start-up is done: collect what start-up left over, freeze the rest into
    the permanent generation (never collected; it lives as long as the process anyway),
    and collect from then on only past ``GC_THRESHOLDS``."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
