"""The prefill node's `Abort` answers only once the request's pushes in flight drained (the
decode node frees the request's blocks on that answer), and refuses a Prefill whose Abort
reached the engine before its admission. The real PrefillService and PrefillPusher; the
engine, NIXL agent and gRPC context are doubles (one event loop, the engine's commands run
inline)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from scripted_agent import ScriptedAgent

from splitserve.engine.kv_connector import FinalBlocks
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv_transfer import PoolDescriptor
from splitserve.prefill.pusher import PrefillPusher
from splitserve.prefill.service import PrefillService
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol.messages import sampling_params_to_proto
from splitserve.protocol.tracing import NO_SPAN


class Aborted(Exception):
    pass


class Context:
    """A grpc.aio.ServicerContext double: `abort` raises with the status."""

    def time_remaining(self) -> float:
        return 30.0

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class Core:
    """The EngineCore calls the service makes, onto the pusher (its KV connector)."""

    def __init__(self, pusher: PrefillPusher) -> None:
        self.pusher = pusher
        self.running: set[str] = set()

    def add_request(self, rid: str, prompt: list[int], params: Any, target: Any) -> None:
        self.pusher.on_admission(rid, target)
        self.running.add(rid)

    def is_unfinished(self, rid: str) -> bool:
        return rid in self.running

    def abort(self, rid: str) -> None:
        if rid in self.running:
            self.running.discard(rid)
            self.pusher.on_finish(rid)


class Engine:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.grammar_ready = asyncio.Event()
        self.grammar_ready.set()
        self.grammar_error = ""

    async def compile_grammar(self, params: Any) -> None:
        await self.grammar_ready.wait()
        if self.grammar_error:
            raise ValueError(self.grammar_error)

    async def run(self, fn: Any) -> Any:
        return fn(self.core)


class Runtime:
    is_draining = False

    def __init__(self, agent: ScriptedAgent, engine: Engine) -> None:
        self.agent, self.engine = agent, engine

    def require_agent(self) -> Any:
        return self  # the agent's `connect`, below

    def connect(self, metadata: bytes, descriptor: PoolDescriptor) -> str:
        return "decode-b"


def service() -> tuple[PrefillService, ScriptedAgent, PrefillPusher, Engine]:
    agent = ScriptedAgent()
    pusher = PrefillPusher(agent)  # type: ignore[arg-type]
    engine = Engine(Core(pusher))
    runtime: Any = Runtime(agent, engine)
    return PrefillService(runtime, pusher), agent, pusher, engine


def prefill_request(rid: str) -> pb.PrefillRequest:
    pool = PoolDescriptor("decode-b", 0, 1024, 64, "DRAM", 0)
    return pb.PrefillRequest(
        request_id=rid,
        prompt_token_ids=list(range(1, 40)),
        sampling_params=sampling_params_to_proto(SamplingParams(temperature=0, max_tokens=1)),
        decode_pool_descriptor=pool.to_json().encode(),
        dst_block_ids=[10, 11, 12],
        timeout_s=30,
    )


def test_abort_answers_once_the_pushes_in_flight_drained() -> None:
    async def run() -> None:
        svc, agent, pusher, _ = service()
        context: Any = Context()
        prefill = asyncio.create_task(svc._prefill(prefill_request("r"), context, NO_SPAN))
        await asyncio.sleep(0.01)
        pusher.on_blocks_final(FinalBlocks("r", [1, 2], 0, False, None, None))
        abort = asyncio.create_task(svc.Abort(pb.AbortRequest(request_ids=["r"]), context))
        await asyncio.sleep(0.05)
        pusher.poll()
        assert not abort.done()  # the push is still in flight
        agent.finish(0, True)
        pusher.poll()  # drained: the outcome reaches the service
        assert (await asyncio.wait_for(abort, 5)).num_aborted == 1
        with pytest.raises(Aborted) as refused:
            await prefill
        assert refused.value.args[0] == grpc.StatusCode.ABORTED

    asyncio.run(run())


def test_a_prefill_whose_abort_came_first_is_refused() -> None:
    async def run() -> None:
        svc, agent, _, engine = service()
        context: Any = Context()
        engine.grammar_ready.clear()  # the Prefill waits before its admission
        prefill = asyncio.create_task(svc._prefill(prefill_request("r"), context, NO_SPAN))
        await asyncio.sleep(0.01)
        abort = asyncio.create_task(svc.Abort(pb.AbortRequest(request_ids=["r"]), context))
        await asyncio.sleep(0.01)
        engine.grammar_ready.set()
        with pytest.raises(Aborted) as refused:
            await prefill
        assert "aborted before its prefill began" in refused.value.args[1]
        assert (await asyncio.wait_for(abort, 5)).num_aborted == 0
        assert not agent.posted and not engine.core.running

    asyncio.run(run())


def test_an_early_abort_of_a_prefill_refused_for_its_grammar_is_forgotten() -> None:
    async def run() -> None:
        svc, _, _, engine = service()
        context: Any = Context()
        engine.grammar_ready.clear()
        engine.grammar_error = "not a grammar"
        prefill = asyncio.create_task(svc._prefill(prefill_request("r"), context, NO_SPAN))
        await asyncio.sleep(0.01)
        abort = asyncio.create_task(svc.Abort(pb.AbortRequest(request_ids=["r"]), context))
        await asyncio.sleep(0.01)
        engine.grammar_ready.set()
        with pytest.raises(Aborted, match="not a grammar"):
            await prefill
        assert (await asyncio.wait_for(abort, 5)).num_aborted == 0
        assert not svc._aborted_early and not svc._outcomes

    asyncio.run(run())
