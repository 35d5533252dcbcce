"""launch/gc_heap.py: a started node and router keep their start-up heap out of garbage
collection, so a full collection no longer walks it."""

from __future__ import annotations

import gc
import re
from contextlib import ExitStack
from pathlib import Path

from splitserve.launch.gc_heap import freeze_startup_heap
from splitserve.launch.processes import ManagedProcess
from splitserve.launch.redis_server import RedisServer

_FROZEN = re.compile(r"start-up heap frozen: (\d+) objects")


def test_freezing_takes_every_live_object_out_of_collection() -> None:
    assert gc.get_freeze_count() == 0
    before = len(gc.get_objects())
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= before // 2
        assert len(gc.get_objects()) < before // 10  # what a full collection still walks
    finally:
        gc.unfreeze()


def frozen_count(process: ManagedProcess) -> int:
    counts = [int(m.group(1)) for line in process.lines if (m := _FROZEN.search(line))]
    assert len(counts) == 1, f"{process.name} froze its heap {len(counts)} times"
    return counts[0]


def test_a_started_node_and_router_froze_their_start_up_heap(tiny_llama: Path) -> None:
    with ExitStack() as stack:
        redis = RedisServer()
        redis.start()
        stack.callback(redis.stop)
        node = ManagedProcess.splitserve(
            "decode", "decode", "--model", str(tiny_llama), "--redis", redis.url,
            "--device", "cpu",
        ).start()  # fmt: skip
        stack.callback(node.stop)
        router = ManagedProcess.splitserve(
            "router", "router", "--redis", redis.url, "--port", "0", "--model", str(tiny_llama),
        ).start()  # fmt: skip
        stack.callback(router.stop)
        # torch, the model and gRPC in the node; FastAPI, the tokenizer and gRPC in the router.
        assert frozen_count(node) > 100_000
        assert frozen_count(router) > 20_000
