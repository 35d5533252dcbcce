"""A scripted decode node: the real `Decode` gRPC service with deterministic replies, for
testing the router without an engine.

    node = ScriptedDecodeNode(tokenizer, model="tiny").start(redis_url, cluster)
    node.publish_prefix(prompt_ids)   # announce cached blocks in the prefix index
    ... router requests ...
    node.requests, node.aborted       # what the router sent
    node.stop()

It registers through `NodePublisher` like a real node (heartbeat, re-register and republish
after a Redis restart). Completion `i` of a request replays `reply` (tokenized) rotated by `i`
tokens, one token per message, `token_delay_s` apart; it honours max_tokens, stop strings,
stop_token_ids, n and logprobs (logprob -0.5 × (rank), top alternatives the next token ids).
`fail_before_first` / `fail_after_tokens` make it fail with UNAVAILABLE / INTERNAL;
`stall_after_tokens` (0: before the first) makes it go silent for `stall_s` at that point.
`finish_after_reply` makes a completion stop (finish_reason "stop", as on eos) once it has
sent the whole reply.

`python tests/scripted_decode.py --redis URL --cluster NAME --tokenizer DIR`
runs one as its own process (to freeze it with SIGSTOP in fault tests); it prints
`node <id> listening on <address>` once registered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc

from splitserve.engine.hashing import hash_blocks, seed_hash
from splitserve.engine.sampling_params import SamplingParams
from splitserve.node.publisher import NodePublisher
from splitserve.node.registry import NodeCapacity, NodeRecord, make_node_id
from splitserve.protocol import keepalive
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc as pb_grpc
from splitserve.protocol.messages import sampling_params_from_proto
from splitserve.router.tokenizer import RouterTokenizer


def _sleep_while_active(context: grpc.ServicerContext, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while context.is_active() and time.monotonic() < deadline:
        time.sleep(0.02)


DEFAULT_REPLY = " the quick brown fox jumps over the lazy dog and runs far away into the woods"


@dataclass
class _Completion:
    ids: list[int]
    num_emitted: int = 0
    text: str = ""
    finish_reason: str | None = None


class ScriptedDecodeNode(pb_grpc.DecodeServicer):
    def __init__(
        self,
        tokenizer: RouterTokenizer,
        model: str,
        reply: str = DEFAULT_REPLY,
        block_size: int = 16,
        max_model_len: int = 512,
        cached_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.reply_ids = tokenizer.encode(reply, add_special_tokens=False)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.cached_tokens = cached_tokens  # reported in usage
        self.token_delay_s = 0.0
        self.fail_before_first = False
        self.fail_after_tokens: int | None = None
        self.stall_after_tokens: int | None = None
        self.stall_s = 0.0
        self.finish_after_reply = False
        self.requests: list[pb.GenerateRequest] = []
        self.aborted: list[str] = []
        self.num_active = 0
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._publisher: NodePublisher | None = None
        self.record: NodeRecord | None = None

    def start(self, redis_url: str, cluster: str) -> ScriptedDecodeNode:
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16), options=keepalive.SERVER_OPTIONS
        )
        pb_grpc.add_DecodeServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.record = NodeRecord(
            node_id=make_node_id("decode", "127.0.0.1", port),
            role="decode",
            grpc_address=f"127.0.0.1:{port}",
            nixl_agent_name=f"scripted-{port}",
            model=self.model,
            block_size=self.block_size,
            capacity=NodeCapacity(num_kv_blocks=1024, max_num_seqs=64),
            max_model_len=self.max_model_len,
        )
        self._publisher = NodePublisher(redis_url, cluster)
        self._publisher.start(self.record, lambda: [])
        return self

    @property
    def node_id(self) -> str:
        if self.record is None:
            raise RuntimeError("ScriptedDecodeNode is not started")
        return self.record.node_id

    def publish_prefix(self, token_ids: list[int]) -> None:
        """Announce the full blocks of `token_ids` as cached here."""
        if self._publisher is None:
            raise RuntimeError("ScriptedDecodeNode is not started")
        seed = seed_hash(self.model, self.block_size)
        self._publisher.publish_events(hash_blocks(token_ids, self.block_size, seed), [])
        self._publisher.flush()

    def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.stop()
        if self._server is not None:
            self._server.stop(grace=None).wait()

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        with self._lock:
            self.requests.append(request)
        if self.fail_before_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted failure before the first token")
        params = sampling_params_from_proto(request.sampling_params)
        n_ids = len(self.reply_ids)
        completions = [
            _Completion(self.reply_ids[i % n_ids :] + self.reply_ids[: i % n_ids])
            for i in range(params.n)
        ]
        with self._lock:
            self.num_active += 1
        try:
            yield from self._steps(request, params, completions, context)
        finally:
            with self._lock:
                self.num_active -= 1

    def _steps(
        self,
        request: pb.GenerateRequest,
        params: SamplingParams,
        completions: list[_Completion],
        context: grpc.ServicerContext,
    ) -> Iterator[pb.GenerateResponse]:
        max_tokens = params.max_tokens or 64
        num_tokens = 0
        while any(c.finish_reason is None for c in completions):
            if self.stall_after_tokens == num_tokens:
                _sleep_while_active(context, self.stall_s)
            if self.fail_after_tokens is not None and num_tokens >= self.fail_after_tokens:
                context.abort(grpc.StatusCode.INTERNAL, "scripted failure mid-stream")
            deltas = [
                self._step(i, c, params, max_tokens)
                for i, c in enumerate(completions)
                if c.finish_reason is None
            ]
            num_tokens += len(deltas)
            finished = all(c.finish_reason is not None for c in completions)
            msg = pb.GenerateResponse(request_id=request.request_id, deltas=deltas)
            if finished:
                msg.finished = True
                msg.usage.CopyFrom(
                    pb.Usage(
                        prompt_tokens=len(request.prompt_token_ids),
                        cached_tokens=self.cached_tokens,
                        completion_tokens=num_tokens,
                    )
                )
            yield msg
            if not finished and self.token_delay_s:
                time.sleep(self.token_delay_s)
            if not context.is_active():
                return

    def _step(
        self, index: int, c: _Completion, params: SamplingParams, max_tokens: int
    ) -> pb.CompletionDelta:
        token = c.ids[c.num_emitted % len(c.ids)]
        c.num_emitted += 1
        emitted = [c.ids[k % len(c.ids)] for k in range(c.num_emitted)]
        full = self.tokenizer.decode(emitted)
        delta = pb.CompletionDelta(index=index, token_ids=[token])
        if params.logprobs is not None:
            top = [pb.TopLogprob(token_id=token, logprob=-0.5)]
            top += [pb.TopLogprob(token_id=token + k, logprob=-0.5 * (k + 1)) for k in range(1, 5)]
            delta.logprobs.append(
                pb.TokenLogprob(token_id=token, logprob=-0.5, rank=1, top=top[: params.logprobs])
            )
        hit = next((s for s in params.stop if s in full), None)
        if hit is not None:
            cut = full.index(hit) + (len(hit) if params.include_stop_str_in_output else 0)
            delta.text, c.text = full[len(c.text) : cut], full[:cut]
            delta.finish_reason, delta.stop_str = "stop", hit
        elif token in params.stop_token_ids:
            delta.finish_reason, delta.stop_token_id = "stop", token
        else:
            delta.text, c.text = full[len(c.text) :], full
            if c.num_emitted >= max_tokens:
                delta.finish_reason = "length"
            elif self.finish_after_reply and c.num_emitted >= len(c.ids):
                delta.finish_reason = "stop"
        if delta.HasField("finish_reason"):
            c.finish_reason = delta.finish_reason
        return delta

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        with self._lock:
            self.aborted.extend(request.request_ids)
        return pb.AbortResponse(num_aborted=len(request.request_ids))

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(
            status=pb.HealthResponse.SERVING, node_id=self.node_id, role="decode", model=self.model
        )

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return pb.StatsResponse(
            node_id=self.node_id,
            role="decode",
            num_running=self.num_active,
            kv_usage=0.1,
            prefix_cache_queries=100,
            prefix_cache_hits=25,
        )


def main() -> None:
    import argparse
    import signal
    import threading

    parser = argparse.ArgumentParser(description="a scripted decode node (for fault tests)")
    parser.add_argument("--redis", required=True, help="redis://host:port/db of the cluster")
    parser.add_argument("--cluster", required=True, help="cluster name (Redis key prefix)")
    parser.add_argument("--tokenizer", required=True, help="local tokenizer directory")
    parser.add_argument("--model", default="tiny", help="served model name")
    parser.add_argument("--token-delay-s", type=float, default=0.0, help="pause between tokens")
    args = parser.parse_args()
    node = ScriptedDecodeNode(RouterTokenizer.load(args.tokenizer), args.model)
    node.token_delay_s = args.token_delay_s
    node.start(args.redis, args.cluster)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"node {node.node_id} listening on {node.record.grpc_address}", flush=True)  # type: ignore[union-attr]
    while not stop.wait(0.5):
        pass
    node.stop()


if __name__ == "__main__":
    main()
