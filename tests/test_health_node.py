"""grpc.health.v1 on a real decode node process (real Redis registration, real gRPC), as
`grpc_health_probe` and Kubernetes gRPC probes see it: SERVING once it serves,
NOT_SERVING for the whole drain after SIGTERM, while the node still answers. The node logs
JSON lines (--log-format json), so the same cluster shows a request's log line carrying its
request id, node id and role."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.engine.sampling_params import SamplingParams
from splitserve.launch.local_cluster import ClusterConfig, LocalCluster, NodeProcess
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc
from splitserve.protocol.messages import sampling_params_to_proto

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRAIN_S = 4.0
NODE_ARGS = (
    "--dtype",
    "float32",
    "--num-blocks",
    "160",
    "--max-num-batched-tokens",
    "64",
    "--drain-timeout-s",
    str(DRAIN_S),
    "--log-format",
    "json",
)


@pytest.fixture(scope="module")
def decode(tiny_llama) -> Iterator[NodeProcess]:
    config = ClusterConfig(
        model=str(tiny_llama), num_prefill=0, router_port=None, node_args=NODE_ARGS
    )
    with LocalCluster(config) as cluster:
        yield cluster.decode[0]


def check(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def generate(channel: grpc.Channel, rid: str, max_tokens: int, **fields: object) -> Iterator[int]:
    """Decode.Generate's tokens, as they stream."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    request = pb.GenerateRequest(
        request_id=rid,
        prompt_token_ids=[5 + i % 50 for i in range(40)],
        sampling_params=sampling_params_to_proto(params),
        **fields,  # type: ignore[arg-type]
    )
    for message in node_pb2_grpc.DecodeStub(channel).Generate(request, timeout=120):
        for delta in message.deltas:
            yield from delta.token_ids


def json_lines(node: NodeProcess) -> list[dict]:
    out = []
    for line in list(node.process.lines):
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_request_log_line_names_request_node_and_role(decode: NodeProcess) -> None:
    """A remote prefill towards a node that is not there falls back to a local prefill and
    says so in a WARNING line of the request."""
    nowhere = pb.NodeEndpoint(node_id="prefill-nowhere", grpc_address="127.0.0.1:1")
    with grpc.insecure_channel(decode.address) as channel:
        assert len(list(generate(channel, "req-json-1", 4, prefill_node=nowhere))) == 4
    # The node's output reaches `lines` through a reader thread, which may lag on a busy
    # machine: wait until the request's line has been read.
    _wait_for(lambda: any(x.get("request_id") == "req-json-1" for x in json_lines(decode)), 10)
    lines = json_lines(decode)
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    assert all(x["role"] == "decode" for x in lines)
    serving = next(i for i, x in enumerate(lines) if "serving on" in x["message"])
    assert all(x["node_id"] == decode.node_id for x in lines[serving:])
    mine = [x for x in lines if x.get("request_id") == "req-json-1"]
    assert mine and mine[0]["level"] == "WARNING", lines


def test_health_is_not_serving_while_the_node_drains(decode: NodeProcess) -> None:
    channel = grpc.insecure_channel(decode.address)
    assert check(channel, "") == SERVING and check(channel, "splitserve.Decode") == SERVING
    with pytest.raises(grpc.RpcError) as info:
        check(channel, "splitserve.Prefill")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    watched: list[int] = []
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    watcher = threading.Thread(target=lambda: watched.extend(r.status for r in _until_error(watch)))
    watcher.start()
    tokens: list[int] = []
    stream = generate(channel, "req-long", 1900)  # outlasts the drain (context 2048)
    tokens.append(next(stream))  # running: the drain has a request to wait for
    reader = threading.Thread(target=lambda: tokens.extend(_until_error(stream)))
    reader.start()
    decode.process.signal(signal.SIGTERM)
    draining_seen = _wait_for(lambda: check(channel, "") == NOT_SERVING, DRAIN_S)
    health = node_pb2_grpc.DecodeStub(channel).Health(pb.HealthRequest(), timeout=5)
    assert draining_seen and check(channel, "splitserve.Decode") == NOT_SERVING
    assert health.status == pb.HealthResponse.DRAINING and decode.process.is_alive()
    assert _wait_for(lambda: not decode.process.is_alive(), DRAIN_S + 20)
    reader.join(10)
    watcher.join(10)
    channel.close()
    assert decode.process.returncode == 0
    assert watched[:2] == [SERVING, NOT_SERVING], watched
    assert len(tokens) > 1


def _until_error(stream: Iterator) -> Iterator:
    try:
        yield from stream
    except grpc.RpcError:
        return


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
