"""gRPC protocol: stubs current, SamplingParams conversions, a real server over a real channel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.outputs import TokenLogprob
from splitserve.engine.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams
from splitserve.protocol import gen, node_pb2, node_pb2_grpc
from splitserve.protocol.messages import (
    sampling_params_from_proto,
    sampling_params_to_proto,
    token_logprob_from_proto,
    token_logprob_to_proto,
)

# ------------------------------------------------------------------ generated stubs
# protoc runs in a child process: grpc_tools' bundled protobuf crashes when imported into
# a process that already loaded torch and friends.


def stale_files(stub_dir: Path = gen.PROTO_DIR, proto_dir: Path = gen.PROTO_DIR) -> list[str]:
    code = (
        "import json, sys; from pathlib import Path; from splitserve.protocol import gen; "
        "print(json.dumps(gen.stale_files(Path(sys.argv[1]), Path(sys.argv[2]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(stub_dir), str(proto_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_stubs_are_current() -> None:
    assert stale_files() == []
    check = [sys.executable, "-m", "splitserve.protocol.gen", "--check"]
    assert subprocess.run(check, capture_output=True, check=False).returncode == 0


def test_check_detects_a_changed_proto(tmp_path: Path) -> None:
    proto = tmp_path / "node.proto"
    shutil.copyfile(gen.PROTO_DIR / "node.proto", proto)
    text = proto.read_text().replace(
        "message HealthRequest {}", "message HealthRequest {\n  bool verbose = 1;\n}"
    )
    proto.write_text(text)
    assert "node_pb2.py" in stale_files(proto_dir=tmp_path)


def test_check_detects_an_edited_stub(tmp_path: Path) -> None:
    for name in gen.GENERATED:
        shutil.copyfile(gen.PROTO_DIR / name, tmp_path / name)
    grpc_module = tmp_path / "node_pb2_grpc.py"
    grpc_module.write_text(grpc_module.read_text() + "\n# edited by hand\n")
    assert stale_files(stub_dir=tmp_path) == ["node_pb2_grpc.py"]


def test_grpc_module_imports_through_the_package() -> None:
    text = (gen.PROTO_DIR / "node_pb2_grpc.py").read_text()
    assert "from splitserve.protocol import node_pb2" in text
    assert "\nimport node_pb2" not in text


# ------------------------------------------------------------------ conversions

json_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=8))


def finite(low: float, high: float, exclude_min: bool = False) -> st.SearchStrategy[float]:
    return st.floats(low, high, exclude_min=exclude_min, allow_nan=False, allow_infinity=False)


sampling_params = st.builds(
    SamplingParams,
    n=st.integers(1, MAX_N),
    temperature=finite(0, 5),
    top_p=finite(0, 1, exclude_min=True),
    top_k=st.integers(-1, 1000),
    min_p=finite(0, 1),
    seed=st.none() | st.integers(-(2**63), 2**63 - 1),
    presence_penalty=finite(-2, 2),
    frequency_penalty=finite(-2, 2),
    repetition_penalty=finite(0.01, 10),
    stop=st.lists(st.text(min_size=1, max_size=6), max_size=3).map(tuple),
    stop_token_ids=st.lists(st.integers(0, 2**31), max_size=4).map(tuple),
    include_stop_str_in_output=st.booleans(),
    max_tokens=st.none() | st.integers(1000, 100_000),
    min_tokens=st.integers(0, 1000),
    ignore_eos=st.booleans(),
    logprobs=st.none() | st.integers(0, MAX_LOGPROBS),
    skip_special_tokens=st.booleans(),
    logit_bias=st.dictionaries(st.integers(0, 2**32 - 1), finite(-100, 100), max_size=4),
    extra=st.dictionaries(st.text(max_size=5), json_values, max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(params=sampling_params)
def test_sampling_params_round_trip(params: SamplingParams) -> None:
    msg = sampling_params_to_proto(params)
    wire = node_pb2.SamplingParams.FromString(msg.SerializeToString())
    back = sampling_params_from_proto(wire)
    assert back == params
    assert back.extra == params.extra


def test_sampling_params_optional_fields_distinguish_none_from_zero() -> None:
    params = SamplingParams(seed=0, max_tokens=None, logprobs=0)
    msg = sampling_params_to_proto(params)
    assert msg.HasField("seed") and not msg.HasField("max_tokens") and msg.HasField("logprobs")
    back = sampling_params_from_proto(msg)
    assert (back.seed, back.max_tokens, back.logprobs) == (0, None, 0)


def test_sampling_params_conversion_errors() -> None:
    with pytest.raises(ValueError, match="JSON values"):
        sampling_params_to_proto(SamplingParams(extra={"x": object()}))
    with pytest.raises(ValueError, match="n must be between"):
        sampling_params_from_proto(node_pb2.SamplingParams(n=0, top_p=1.0))


def test_token_logprob_round_trip() -> None:
    lp = TokenLogprob(token_id=42, logprob=-0.5, rank=2, top=((7, -0.25), (42, -0.5)))
    assert token_logprob_from_proto(token_logprob_to_proto(lp)) == lp


# ------------------------------------------------------------------ a real server


class _Decode(node_pb2_grpc.DecodeServicer):
    def Health(
        self, request: node_pb2.HealthRequest, context: grpc.ServicerContext
    ) -> node_pb2.HealthResponse:
        return node_pb2.HealthResponse(
            status=node_pb2.HealthResponse.SERVING, node_id="decode-test", role="decode"
        )

    def Generate(
        self, request: node_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.GenerateResponse]:
        params = sampling_params_from_proto(request.sampling_params)
        for i, token in enumerate(request.prompt_token_ids[: params.max_tokens]):
            last = i == params.max_tokens - 1
            delta = node_pb2.CompletionDelta(index=0, token_ids=[token], text=f"<{token}>")
            if last:
                delta.finish_reason = "length"
            yield node_pb2.GenerateResponse(
                request_id=request.request_id,
                deltas=[delta],
                finished=last,
                usage=node_pb2.Usage(completion_tokens=i + 1) if last else None,
            )


@pytest.fixture(scope="module")
def decode_stub() -> Iterator[node_pb2_grpc.DecodeStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    node_pb2_grpc.add_DecodeServicer_to_server(_Decode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield node_pb2_grpc.DecodeStub(channel)
    server.stop(grace=None)


def test_health_over_a_real_channel(decode_stub: node_pb2_grpc.DecodeStub) -> None:
    reply = decode_stub.Health(node_pb2.HealthRequest(), timeout=5)
    assert reply.status == node_pb2.HealthResponse.SERVING
    assert (reply.node_id, reply.role) == ("decode-test", "decode")


def test_generate_streams_until_finished(decode_stub: node_pb2_grpc.DecodeStub) -> None:
    request = node_pb2.GenerateRequest(
        request_id="r1",
        prompt_token_ids=[5, 6, 7, 8],
        sampling_params=sampling_params_to_proto(SamplingParams(max_tokens=3)),
    )
    replies = list(decode_stub.Generate(request, timeout=5))
    assert [list(r.deltas[0].token_ids) for r in replies] == [[5], [6], [7]]
    assert [r.finished for r in replies] == [False, False, True]
    assert replies[-1].deltas[0].finish_reason == "length"
    assert not replies[0].deltas[0].HasField("finish_reason")
    assert replies[-1].usage.completion_tokens == 3 and not replies[0].HasField("usage")


def test_unimplemented_rpc_reports_unimplemented(decode_stub: node_pb2_grpc.DecodeStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        decode_stub.Stats(node_pb2.StatsRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
