"""A node process's garbage-collection pauses (node/gc_pauses.py): every collection
counted by generation with its time, as the Stats extra map carries them."""

from __future__ import annotations

import gc

from splitserve.node.gc_pauses import GcPauses
from splitserve.protocol.messages import labelled_values


def test_every_collection_counts_in_its_generation_until_closed() -> None:
    pauses = GcPauses(keep_each=True)
    try:
        before = pauses.totals()
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        totals = pauses.totals()
    finally:
        pauses.close()
    num = labelled_values(totals, "gc_collections_")
    seconds = labelled_values(totals, "gc_pause_s_")
    assert set(num) == set(seconds) == {"0", "1", "2"}
    assert num["0"] - labelled_values(before, "gc_collections_")["0"] >= 1
    assert num["2"] == 2 and seconds["2"] > 0
    assert [g for g, _ in pauses.pauses].count(2) == 2
    gc.collect(2)  # closed: no longer counted
    assert pauses.totals() == totals
