"""The prefill node's pusher posts no push past the Prefill RPC's deadline (the decode node
may have given the blocks to another request by then), and an aborted request finishes
only once its pushes in flight drained (the prefill node's Abort answers then)."""

from __future__ import annotations

import time

from scripted_agent import ScriptedAgent

from splitserve.engine.kv_connector import FinalBlocks
from splitserve.kv_transfer import PeerName
from splitserve.prefill.pusher import PrefillPusher, PushOutcome, PushTarget


def admitted(deadline: float | None) -> tuple[ScriptedAgent, PrefillPusher, list[PushOutcome]]:
    """A pusher with request "r" admitted: 4 destination blocks, none cached there."""
    agent = ScriptedAgent()
    pusher = PrefillPusher(agent)  # type: ignore[arg-type]
    outcomes: list[PushOutcome] = []
    dst = list(range(10, 14))
    pusher.on_admission(
        "r", PushTarget(PeerName("decode-b"), dst, 0, outcomes.append, deadline=deadline)
    )
    return agent, pusher, outcomes


def test_no_push_is_posted_past_the_rpc_deadline() -> None:
    agent, pusher, outcomes = admitted(deadline=time.monotonic() + 0.05)
    pusher.on_blocks_final(FinalBlocks("r", [1, 2], 0, False, None, None))
    assert len(agent.posted) == 1
    time.sleep(0.1)  # the decode node's call ended; it may reuse the blocks
    pusher.on_blocks_final(FinalBlocks("r", [3, 4], 2, True, 5, None))
    assert len(agent.posted) == 1
    events = pusher.poll()
    assert not events.released and not outcomes  # the first push is still in flight
    agent.finish(0, True)
    events = pusher.poll()
    assert events.to_abort == ["r"] and events.released == ["r"]
    assert len(outcomes) == 1 and not outcomes[0].ok
    assert "deadline" in (outcomes[0].error or "")


def test_an_aborted_request_finishes_once_its_pushes_drained() -> None:
    agent, pusher, outcomes = admitted(deadline=None)
    pusher.on_blocks_final(FinalBlocks("r", [1, 2], 0, False, None, None))
    assert pusher.abort("r")
    pusher.on_blocks_final(FinalBlocks("r", [3, 4], 2, True, 5, None))
    assert len(agent.posted) == 1  # nothing more after the abort
    assert not pusher.poll().released and not outcomes
    agent.finish(0, True)
    assert pusher.poll().released == ["r"]
    assert [o.error for o in outcomes] == ["aborted"]
