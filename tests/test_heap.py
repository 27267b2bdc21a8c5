"""What the bridge made while starting is frozen once it serves, so that the garbage
collector's full collections, which stall the event loop, walk only what came after."""

from __future__ import annotations

import gc

from bridge.runtime.app import settle_heap


def test_settling_the_heap_leaves_full_collections_only_what_came_after() -> None:
    made_while_starting = [[n] for n in range(50_000)]  # long-lived and tracked
    gc.collect()
    walked_before = len(gc.get_objects(generation=2))
    try:
        frozen = settle_heap()
        walked_after = len(gc.get_objects(generation=2))
        made_after = [[n] for n in range(1_000)]
        gc.collect()
        walked_later = len(gc.get_objects(generation=2))
    finally:
        gc.unfreeze()
    assert walked_before > len(made_while_starting)
    assert frozen >= len(made_while_starting)  # (other threads may free a few meanwhile)
    assert walked_after < 1_000  # the 50,000 lists and the rest are frozen, not walked
    assert walked_later >= walked_after + len(made_after)  # what came after still is
    assert all(gc.is_tracked(x) for x in made_while_starting[:10])
