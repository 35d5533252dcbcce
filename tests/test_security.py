"""Transport security end to end: one `splitserve up --tls self-signed` cluster (tiny model,
CPU; real redis-server, gRPC over mTLS with a cluster token, NIXL, HTTPS with the official
openai client; the tests marked slow share it), plus fast tests of the pieces
(TransportSecurity, generated certificates, router HTTPS with client certificates, the KV
compatibility hash)."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import torch

from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv_transfer import (
    IncompatiblePeer,
    KvCompat,
    PoolDescriptor,
    TransferAgent,
    TransferConfig,
)
from splitserve.launch.certs import ClusterCredentials, write_self_signed
from splitserve.launch.processes import ManagedProcess
from splitserve.node.registry import NodeRecord, NodeRegistry, redis_client
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc
from splitserve.protocol.messages import labelled_values, sampling_params_to_proto
from splitserve.protocol.security import (
    TransportSecurity,
    add_port,
    open_channel,
    read_token_file,
    server_interceptors,
)

API_KEY = "test-api-key"
UP_READY = re.compile(r"^reply: ")  # after --demo's answer: the demo works under TLS
NODE_READY = re.compile(r"node (\S+) listening on (\S+)")
NODE_ARGS = ("--num-blocks", "64", "--max-num-batched-tokens", "256")
PROTECTED = (
    ("GET", "/v1/models", None),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "x"}]},
    ),
    ("POST", "/v1/completions", {"model": "m", "prompt": "x"}),
    ("POST", "/tokenize", {"model": "m", "prompt": "x"}),
    ("POST", "/detokenize", {"model": "m", "tokens": [1, 2]}),
    ("GET", "/metrics", None),  # protected: the cluster runs with --protect-metrics
)


class Cluster:
    def __init__(self, process: ManagedProcess, tls: ClusterCredentials) -> None:
        self.process = process
        self.tls = tls
        printed = "\n".join(process.lines)
        redis_url, url = (
            re.search(r"Redis (redis://\S+)", printed),
            re.search(r"API: (\S+)/v1", printed),
        )
        if redis_url is None or url is None:
            raise RuntimeError(f"`up` printed no Redis URL or API address:\n{process.tail()}")
        self.redis_url, self.url = redis_url.group(1), url.group(1)

    @property
    def verify(self) -> ssl.SSLContext:
        """Trusts the cluster's CA (what `up` printed the curl --cacert for)."""
        return ssl.create_default_context(cafile=str(self.tls.ca_certs))

    def nodes(self, role: str) -> list[NodeRecord]:
        return NodeRegistry(redis_client(self.redis_url)).list_live_nodes(role)  # type: ignore[arg-type]

    def security(self, token: str | None = None, with_cert: bool = True) -> TransportSecurity:
        """A client's credentials: the cluster's own, or with another token / no cert."""
        tls = self.tls
        return TransportSecurity(
            ca_certs=str(tls.ca_certs),
            certfile=str(tls.client_cert) if with_cert else "",
            keyfile=str(tls.client_key) if with_cert else "",
            token=read_token_file(str(tls.token_file)) if token is None else token,
        )


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    tls_dir = tmp_path_factory.mktemp("tls")
    args = ["up", "--model", str(tiny_llama), "--cpu", "--port", "0", "--tls", "self-signed"]
    args += ["--tls-dir", str(tls_dir), "--api-key", API_KEY, "--no-restart", "--demo"]
    args += ["--disagg-min-tokens", "16", "--router-arg=--protect-metrics"]
    args += [f"--node-arg={a}" for a in NODE_ARGS]
    process = ManagedProcess.splitserve("up", *args, ready_pattern=UP_READY)
    process.start(timeout_s=300)
    try:
        yield Cluster(process, ClusterCredentials(tls_dir))
    finally:
        process.stop(timeout_s=60)  # up stops router, nodes and Redis in turn


def grpc_call(record: NodeRecord, security: TransportSecurity, method: str, request):
    """One RPC on a node with the given credentials (a fresh channel)."""

    async def run():
        channel = open_channel(record.grpc_address, (), security)
        stub_class = (
            node_pb2_grpc.DecodeStub if record.role == "decode" else node_pb2_grpc.PrefillStub
        )
        try:
            return await getattr(stub_class(channel), method)(request, timeout=20)
        finally:
            await channel.close()

    return asyncio.run(run())


def grpc_error(record: NodeRecord, security: TransportSecurity, method: str, request):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        grpc_call(record, security, method, request)
    return caught.value


@pytest.mark.slow  # a whole cluster (shared by the module)
def test_https_with_the_openai_client_and_mtls_disaggregation(cluster: Cluster) -> None:
    assert cluster.url.startswith("https://")
    with httpx.Client(verify=cluster.verify) as http:
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=API_KEY, http_client=http)
        model = client.models.list().data[0].id
        prompt = " ".join(f"word{i}" for i in range(60))  # past --disagg-min-tokens
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=4)
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert chat.choices[0].message.content is not None
    # The long prompt was prefilled remotely: decode -> prefill over mTLS with the token.
    decode = cluster.nodes("decode")[0]
    stats = grpc_call(decode, cluster.security(), "Stats", pb.StatsRequest())
    assert stats.prompt_tokens_received > 0 and stats.num_prefill_fallbacks == 0
    # Without the CA the certificate is not trusted; plain HTTP on the HTTPS port fails.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{cluster.url}/health", timeout=5)
    with pytest.raises(httpx.HTTPError):
        httpx.get(cluster.url.replace("https://", "http://") + "/health", timeout=5)


@pytest.mark.slow  # a whole cluster (shared by the module)
def test_api_key_covers_every_protected_path(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.url, verify=cluster.verify, timeout=30) as http:
        for method, path, body in PROTECTED:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                reply = http.request(method, path, json=body, headers=headers)
                assert reply.status_code == 401, (path, headers, reply.text)
                error = reply.json()["error"]
                assert error["code"] == "invalid_api_key" and "Bearer" in error["message"]
        assert http.get("/health").status_code == 200
        for probe in ("/live", "/ready"):  # open: never a 401 (served or not)
            assert http.get(probe).status_code != 401
        key = {"Authorization": f"Bearer {API_KEY}"}
        assert http.get("/metrics", headers=key).status_code == 200
        body = {"model": _model(http, key), "prompt": "x"}
        assert http.post("/tokenize", json=body, headers=key).status_code == 200


@pytest.mark.slow  # a whole cluster (shared by the module)
def test_node_clients_without_the_credentials_are_refused(cluster: Cluster) -> None:
    prefill = cluster.nodes("prefill")[0]
    good = cluster.security()
    assert grpc_call(prefill, good, "Health", pb.HealthRequest()).node_id == prefill.node_id
    request = pb.PrefillRequest(request_id="intruder", prompt_token_ids=[1, 2, 3])
    for creds in (cluster.security(token="wrong"), cluster.security(token="")):
        for method, message in (("Prefill", request), ("Stats", pb.StatsRequest())):
            error = grpc_error(prefill, creds, method, message)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, method
            assert "cluster token" in (error.details() or "")
    # The right token but no client certificate: the TLS handshake fails (mTLS).
    error = grpc_error(prefill, cluster.security(with_cert=False), "Health", pb.HealthRequest())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # Plaintext towards a TLS node fails as well.
    plain = TransportSecurity(token=good.token)
    assert grpc_error(prefill, plain, "Health", pb.HealthRequest()).code() == (
        grpc.StatusCode.UNAVAILABLE
    )
    stats = grpc_call(prefill, good, "Stats", pb.StatsRequest())
    assert stats.num_running == 0 and stats.num_waiting == 0


@pytest.mark.slow  # a whole cluster (shared by the module)
def test_kv_compatibility_mismatch_is_refused_without_a_leak(cluster: Cluster) -> None:
    prefill, decode = cluster.nodes("prefill")[0], cluster.nodes("decode")[0]
    good = cluster.security()
    meta = grpc_call(decode, good, "TransferMetadata", pb.TransferMetadataRequest())
    descriptor = PoolDescriptor.from_json(meta.pool_descriptor)
    assert len(descriptor.compat_hash) == 64
    alien = PoolDescriptor.from_json(
        meta.pool_descriptor.replace(b'"compat_hash": "', b'"compat_hash": "0')
    )
    request = pb.PrefillRequest(
        request_id="alien-0",
        prompt_token_ids=list(range(1, 40)),
        sampling_params=sampling_params_to_proto(SamplingParams(temperature=0, max_tokens=1)),
        decode_node_id=decode.node_id,
        decode_agent_name=meta.agent_name,
        decode_agent_metadata=meta.agent_metadata,
        decode_pool_descriptor=alien.to_json().encode(),
        dst_block_ids=[0, 1, 2],
        timeout_s=10,
    )
    error = grpc_error(prefill, good, "Prefill", request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not compatible" in (error.details() or "")
    stats = grpc_call(prefill, good, "Stats", pb.StatsRequest())
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_blocks_free == stats.num_blocks_total
    # The node's prefill attention runs by path, its forward passes by kind and its
    # process's collections by generation ride in the extra map (router/metrics.py).
    runs = set(labelled_values(stats.extra, "prefill_runs_"))
    assert runs == {"context", "flash", "cudnn", "rows"}
    assert set(labelled_values(stats.extra, "forwards_")) == {"decode", "prefill"}
    assert set(labelled_values(stats.extra, "forward_device_s_")) == {"decode", "prefill"}
    assert set(labelled_values(stats.extra, "gc_pause_s_")) == {"0", "1", "2"}


@pytest.mark.slow  # a whole cluster (shared by the module)
def test_node_with_a_wrong_token_is_not_routed_to(cluster: Cluster, tiny_llama) -> None:
    tls = cluster.tls
    rogue = ManagedProcess.splitserve(
        "rogue-prefill",
        "prefill",
        *("--model", str(tiny_llama), "--redis", cluster.redis_url, *NODE_ARGS),
        *("--grpc-ca-certs", str(tls.ca_certs), "--grpc-require-client-cert"),
        *("--grpc-certfile", str(tls.server_cert), "--grpc-keyfile", str(tls.server_key)),
        *("--cluster-token", "not-the-cluster-token"),
        ready_pattern=NODE_READY,
    ).start(timeout_s=180)
    try:
        rogue_id = rogue.match.group(1) if rogue.match else ""
        assert rogue_id in {r.node_id for r in cluster.nodes("prefill")}  # it did register
        http = httpx.Client(base_url=cluster.url, verify=cluster.verify, timeout=60)
        key = {"Authorization": f"Bearer {API_KEY}"}
        deadline = time.monotonic() + 2.5  # five node-list refreshes (0.5 s each)
        prompt = " ".join(f"rogue{i}" for i in range(60))
        while time.monotonic() < deadline:
            assert http.get("/health").json()["num_prefill_nodes"] == 1
            body = {"model": _model(http, key), "prompt": prompt, "max_tokens": 2}
            assert http.post("/v1/completions", json=body, headers=key).status_code == 200
        # The cluster's calls to it fail, and it never computed a prompt (no Prefill RPC
        # reached it); its own token still works, so the refusals were about the token.
        rogue_record = next(r for r in cluster.nodes("prefill") if r.node_id == rogue_id)
        error = grpc_error(rogue_record, cluster.security(), "Stats", pb.StatsRequest())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        own = cluster.security(token="not-the-cluster-token")
        stats = grpc_call(rogue_record, own, "Stats", pb.StatsRequest())
        assert stats.prompt_tokens_computed == 0 and stats.num_requests_finished == 0
        http.close()
    finally:
        rogue.stop()


def _model(http: httpx.Client, headers: dict[str, str]) -> str:
    return http.get("/v1/models", headers=headers).json()["data"][0]["id"]


# ------------------------------------------------------------------ unit tests


def test_transport_security_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        TransportSecurity(ca_certs="ca.pem", certfile="c.pem")
    with pytest.raises(ValueError, match="--grpc-ca-certs"):
        TransportSecurity(certfile="c.pem", keyfile="k.pem")
    with pytest.raises(ValueError, match="--grpc-ca-certs"):
        TransportSecurity(require_client_cert=True)
    assert "token" not in repr(TransportSecurity(token="s3cret")).replace("cluster token", "")
    assert "s3cret" not in repr(TransportSecurity(token="s3cret"))
    (tmp_path / "t").write_text(" tok\n")
    assert read_token_file(str(tmp_path / "t")) == "tok"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token_file(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot read"):
        read_token_file(str(tmp_path / "missing"))


def test_self_signed_credentials(tmp_path: Path) -> None:
    from cryptography import x509

    creds = write_self_signed(tmp_path, ("localhost", "127.0.0.1", "10.1.2.3"))
    for path in (creds.server_key, creds.client_key, creds.token_file):
        assert path.stat().st_mode & 0o077 == 0, path
    cert = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    ca = x509.load_pem_x509_certificate(creds.ca_certs.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert len(read_token_file(str(creds.token_file))) >= 32


def _pool(dtype: torch.dtype = torch.float32, layers: int = 2, block_size: int = 16):
    return torch.zeros(4, layers, 2, block_size, 2, 8, dtype=dtype)


def test_kv_compat_hash_covers_each_field() -> None:
    base = KvCompat.from_pool("m", _pool())
    assert base == KvCompat("m", "float32", 16, 2, 2, 8)
    variants = [
        KvCompat.from_pool("other", _pool()),
        KvCompat.from_pool("m", _pool(torch.bfloat16)),
        KvCompat.from_pool("m", _pool(torch.float16)),
        KvCompat.from_pool("m", _pool(layers=3)),
        KvCompat.from_pool("m", _pool(block_size=32)),
        KvCompat("m", "float32", 16, 2, 2, 8, layout_version=2),
        KvCompat("m", "float32", 16, 2, 4, 4),
    ]
    hashes = {v.hash() for v in variants}
    assert base.hash() not in hashes and len(hashes) == len(variants)
    assert base.hash() == KvCompat.from_pool("m", _pool()).hash()  # stable
    with pytest.raises(ValueError, match="num_layers"):
        KvCompat.from_pool("m", torch.zeros(4, 2, 16))


def test_agent_refuses_an_incompatible_peer_before_loading_it() -> None:
    ours, theirs = KvCompat.from_pool("m", _pool()), KvCompat.from_pool("m", _pool(torch.float16))
    pool_a, pool_b = _pool(), _pool()
    with (
        TransferAgent(TransferConfig("compat-a", compat_hash=ours.hash()), pool_a) as a,
        TransferAgent(TransferConfig("compat-b", compat_hash=theirs.hash()), pool_b) as b,
        TransferAgent(TransferConfig("compat-c", compat_hash=ours.hash()), _pool()) as c,
    ):
        with pytest.raises(IncompatiblePeer, match="--dtype"):
            a.connect(b.metadata(), b.pool_descriptor)
        assert a.peers == []
        assert a.connect(c.metadata(), c.pool_descriptor) == "compat-c"


def test_router_https_requires_client_certs_with_ssl_ca_certs(tmp_path: Path, tiny_llama) -> None:
    from splitserve.launch.redis_server import free_port
    from splitserve.router.config import RouterConfig
    from splitserve.router.server import RouterServer
    from splitserve.router.tokenizer import RouterTokenizer

    creds = write_self_signed(tmp_path)
    with pytest.raises(ValueError, match="together"):
        RouterConfig(redis_url="redis://x", model="m", ssl_certfile=str(creds.server_cert))
    with pytest.raises(ValueError, match="--api-key"):
        RouterConfig(redis_url="redis://x", model="m", protect_metrics=True)
    config = RouterConfig(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing there: no nodes
        model="m",
        port=0,
        ssl_certfile=str(creds.server_cert),
        ssl_keyfile=str(creds.server_key),
        ssl_ca_certs=str(creds.ca_certs),
    )
    tokenizer = RouterTokenizer.load(str(tiny_llama))
    server = RouterServer(config, tokenizer=tokenizer, log_level="warning").start_in_thread()
    try:
        assert server.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(creds.ca_certs))
        with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
            httpx.get(f"{server.url}/health", verify=trust, timeout=10)
        trust.load_cert_chain(str(creds.client_cert), str(creds.client_key))
        reply = httpx.get(f"{server.url}/health", verify=trust, timeout=10)
        assert reply.status_code == 503 and reply.json()["num_decode_nodes"] == 0
    finally:
        server.stop_thread()


def test_token_refusals_are_logged_once_per_peer(caplog: pytest.LogCaptureFixture) -> None:
    class Prefill(node_pb2_grpc.PrefillServicer):
        async def Health(self, request, context):
            return pb.HealthResponse(node_id="n")

    async def run() -> list[grpc.StatusCode]:
        server_security = TransportSecurity(token="right")
        server = grpc.aio.server(interceptors=server_interceptors(server_security))
        node_pb2_grpc.add_PrefillServicer_to_server(Prefill(), server)
        port = add_port(server, "127.0.0.1:0", server_security)
        await server.start()
        codes = []
        try:
            for token in ("wrong", "wrong", "", "right"):
                channel = open_channel(f"127.0.0.1:{port}", (), TransportSecurity(token=token))
                stub = node_pb2_grpc.PrefillStub(channel)
                for _ in range(2):  # two calls on one connection: one peer
                    try:
                        await stub.Health(pb.HealthRequest(), timeout=10)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
                await channel.close()
        finally:
            await server.stop(None)
        return codes

    with caplog.at_level("WARNING", logger="splitserve.protocol.security"):
        codes = asyncio.run(run())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 6 + [grpc.StatusCode.OK] * 2
    refusals = [r.getMessage() for r in caplog.records if "cluster token" in r.getMessage()]
    # Each refused peer connection is logged once, however often it is refused (gRPC may
    # carry two channels to one target over one connection: one peer).
    peers = [m.split(" from ", 1)[1].split(":", 2)[:3] for m in refusals]
    assert 1 <= len(refusals) <= 3
    assert len(peers) == len({tuple(p) for p in peers})


def test_up_tls_flags(tmp_path: Path) -> None:
    import contextlib
    import shlex

    from splitserve.launch.cli import _build_parser
    from splitserve.launch.up_cmd import example_curl, tls_credentials

    def parse(*argv: str):
        return _build_parser(["up"]).parse_args(["up", *argv])

    assert parse().tls == "off" and parse().host == "127.0.0.1"
    with contextlib.ExitStack() as stack:
        assert tls_credentials(parse(), stack) is None
        with pytest.raises(ValueError, match="--tls self-signed"):
            tls_credentials(parse("--tls-dir", str(tmp_path)), stack)
        creds = tls_credentials(parse("--tls", "self-signed", "--tls-dir", str(tmp_path)), stack)
        assert creds is not None and creds.ca_certs == tmp_path / "ca.pem"
    assert creds.ca_certs.is_file()  # --tls-dir is kept
    words = shlex.split(example_curl("https://127.0.0.1:8000", "m", "k", str(creds.ca_certs)))
    assert words[words.index("--cacert") + 1] == str(creds.ca_certs)
