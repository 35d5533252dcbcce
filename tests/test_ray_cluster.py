"""`splitserve ray up|scale|status|down` on a local multi-node Ray cluster
(`ray.cluster_utils.Cluster`: a head and two worker nodes, each offering two units of the
custom resource `splitserve_node`), the tiny llama on CPU, a real redis-server given with
--redis (so that `down` can be checked to leave no keys behind), the official `openai`
client. One Ray cluster and one splitserve cluster for the whole module; the tests run in
order and build on each other: up 1P2D -> kill a decode node under load -> scale 1P1D ->
2P2D -> 1P1D under load -> down.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import redis
from process_state import is_alive

from splitserve.engine.llm import LLM
from splitserve.engine.sampling_params import SamplingParams
from splitserve.launch.redis_server import RedisServer, free_port
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc
from splitserve.ray_cluster.commands import node_command, router_command
from splitserve.ray_cluster.config import Placement, RayClusterConfig, Role
from splitserve.ray_cluster.placement import Placed, RayNode, choose_node, node_demand, num_slots

# The cluster tests: real Ray, node and router processes (`-m "not slow"` leaves them out).
slow = pytest.mark.slow

MODEL = "tiny"
RESOURCE = "splitserve_node"
NUM_RAY_NODES = 3
WORDS = ("harbour", "tide", "lantern", "gull", "rope", "anchor", "sail", "keel", "mast", "deck")
# Prompts of ~60 words: past --disagg-min-tokens, so they go through a prefill node.
DISAGG_MIN_TOKENS = 32
REQUEST_TIMEOUT_S = 60.0


def _ray_module() -> Any:
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("needs the ray extra: run `make install`")
        pytest.skip("needs the ray extra: pip install -e '.[ray]'")
    return ray


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    ray = _ray_module()
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {RESOURCE: 2}, "include_dashboard": False},
    )
    for _ in range(NUM_RAY_NODES - 1):
        cluster.add_node(num_cpus=2, resources={RESOURCE: 2})
    ray.init(address=cluster.address, namespace="splitserve-tests", log_to_driver=False)
    yield cluster.address
    ray.shutdown()
    cluster.shutdown()


def splitserve_ray(address: str, cluster: str, *args: str, timeout_s: float = 300) -> str:
    """`splitserve ray ACTION ...` as its own process; its stdout (fails on exit code != 0)."""
    action, *rest = args
    command = [sys.executable, "-m", "splitserve.launch.cli", "ray", action]
    command += ["--address", address, "--cluster", cluster, *rest]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def status(address: str, cluster: str) -> dict[str, Any]:
    return json.loads(splitserve_ray(address, cluster, "status", "--json").strip().splitlines()[-1])


def members(st: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [m for m in st["members"] if m["kind"] == kind]


class RayServing:
    def __init__(self, address: str, cluster: str, redis_url: str) -> None:
        self.address = address
        self.cluster = cluster
        self.redis_url = redis_url
        self.up_output = ""
        self.status: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return self.status["router_url"]

    def refresh(self) -> dict[str, Any]:
        self.status = status(self.address, self.cluster)
        return self.status


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="module")
def serving(ray_address: str, redis_url: str, tiny_llama: Path) -> RayServing:
    cluster = f"t{random.randrange(1 << 30):x}"
    running = RayServing(ray_address, cluster, redis_url)
    running.up_output = splitserve_ray(
        ray_address,
        cluster,
        *("up", "--model", str(tiny_llama), "--served-model-name", MODEL),
        *("--port", str(free_port()), "--redis", redis_url, "--cpu", "--cpus-per-node", "0"),
        *("--node-resource", RESOURCE, "--num-prefill", "1", "--num-decode", "2"),
        *("--node-arg=--dtype=float32", "--node-arg=--num-blocks=512"),
        *("--drain-timeout-s", "30", "--restart-backoff-s", "0.5"),
        f"--router-arg=--disagg-min-tokens={DISAGG_MIN_TOKENS}",
        timeout_s=400,
    )
    running.refresh()
    return running


def long_prompt(num_words: int = 60) -> str:
    """Fresh (no cache holds it) and long enough to be prefilled remotely."""
    return " ".join(random.choice(WORDS) for _ in range(num_words))


def offline_text(tiny_llama: Path, prompts: list[str], max_tokens: int) -> list[str]:
    llm = LLM(str(tiny_llama), dtype="float32")
    ids = [list(llm.get_tokenizer()(p)["input_ids"]) for p in prompts]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    return [o.outputs[0].text for o in outs]


async def one_request(client: openai.AsyncOpenAI, prompt: str) -> str:
    """ok | error: <what> (a clean OpenAI error object) | hung (no answer within the timeout)."""
    try:
        await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        return "ok"
    except openai.APITimeoutError:
        return "hung"
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        assert "message" in body or "error" in body, f"not an OpenAI error object: {exc}"
        return f"error: {exc.status_code} {body.get('code')}: {body.get('message')}"
    except openai.APIConnectionError as exc:
        return f"error: connection: {exc!r}"


async def steady_load(url: str, rate: float, count: int | None, stop: threading.Event) -> Counter:
    """`count` requests (None: until `stop`) at `rate` per second, each with a fresh prompt."""
    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )
    start = time.monotonic()
    tasks = []
    i = 0
    while (count is None or i < count) and not (count is None and stop.is_set()):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one_request(client, long_prompt())))
        i += 1
    outcomes = Counter(await asyncio.gather(*tasks))
    await client.close()
    return outcomes


def node_stats(address: str, role: str) -> pb.StatsResponse:
    stub = node_pb2_grpc.PrefillStub if role == "prefill" else node_pb2_grpc.DecodeStub
    with grpc.insecure_channel(address) as channel:
        return stub(channel).Stats(pb.StatsRequest(), timeout=10)


def grpc_address(member: dict[str, Any]) -> str:
    """host:port from a node id `{role}-{host}:{port}-{hex}`."""
    return member["info"]["server_id"].split("-", 1)[1].rsplit("-", 1)[0]


@slow
def test_up_places_1p2d_across_nodes_and_matches_offline_tokens(
    serving: RayServing, tiny_llama: Path
) -> None:
    print(serving.up_output)
    st = serving.status
    assert (st["num_prefill"], st["num_decode"]) == (1, 2)
    assert "OpenAI API: http" in serving.up_output and "decode-1" in serving.up_output
    nodes = [*members(st, "prefill"), *members(st, "decode")]
    assert all(m["state"] == "serving" and is_alive(m["info"]["pid"]) for m in nodes)
    # spread: each of the three nodes on its own simulated Ray node
    assert len({m["info"]["ray_node_id"] for m in nodes}) == NUM_RAY_NODES
    health = httpx.get(f"{serving.url}/health", timeout=10).json()
    assert (health["num_prefill_nodes"], health["num_decode_nodes"]) == (1, 2)

    prompts = ["The fishing boats came back at dawn", long_prompt(), long_prompt()]
    expected = offline_text(tiny_llama, prompts, 12)
    client = openai.OpenAI(base_url=f"{serving.url}/v1", api_key="unused", max_retries=0)
    for prompt, text in zip(prompts * 2, expected * 2, strict=True):
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert reply.choices[0].text == text
    served = [node_stats(grpc_address(m), "decode").num_requests_finished for m in nodes[1:]]
    prefilled = node_stats(grpc_address(nodes[0]), "prefill").prompt_tokens_computed
    print(f"ray up 1P2D: decode requests {served}, prefill tokens computed {prefilled}")
    assert prefilled > 0 and sum(served) >= 2 * len(prompts)


@slow
def test_up_with_a_node_that_cannot_start_fails_cleanly(serving: RayServing) -> None:
    """A node flag the node refuses: `up` exits 1 naming the node and its own error, and
    leaves nothing behind: no actor, and no Redis (the one `up` started as an actor); the
    running cluster is untouched."""
    ray = _ray_module()
    cluster = serving.cluster + "-bad"
    redis_port = free_port()
    command = ["ray", "up", "--address", serving.address, "--cluster", cluster]
    command += ["--model", "dummy:tiny", "--port", str(free_port())]
    command += ["--redis-port", str(redis_port), "--cpu", "--cpus-per-node", "0"]
    command += ["--node-resource", RESOURCE, "--num-prefill", "0", "--node-arg=--max-num-seqs=-1"]
    done = subprocess.run(
        [sys.executable, "-m", "splitserve.launch.cli", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{cluster}:decode-0 did not start" in done.stderr and "max" in done.stderr
    named = ray.util.list_named_actors(all_namespaces=True)
    assert [a for a in named if a["name"].startswith(f"{cluster}:")] == []
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host=ray.util.get_node_ip_address(), port=redis_port).ping()
    assert cluster_processes(cluster) == []
    assert httpx.get(f"{serving.url}/health", timeout=10).json()["num_decode_nodes"] == 2


def controller_status(serving: RayServing) -> Any:
    """The controller's status, asked from this process (no CLI start-up per poll)."""
    ray = _ray_module()
    handle = ray.get_actor(f"{serving.cluster}:controller", namespace="splitserve")
    return ray.get(handle.status.remote(), timeout=60)


def node_record(serving: RayServing, node_id: str) -> dict[str, Any] | None:
    client = redis.Redis.from_url(serving.redis_url)
    raw = client.hget(f"splitserve:{serving.cluster}:node:{node_id}", "record")
    client.close()
    return None if raw is None else json.loads(raw)


def wait_restarted(serving: RayServing, name: str, old_pid: int, timeout_s: float) -> Any:
    """The member `name` once it serves again from a new process and the router sees
    every decode node; None after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        member = next(m for m in controller_status(serving).members if m.name == name)
        if member.state == "serving" and member.info.pid != old_pid:
            health = httpx.get(f"{serving.url}/health", timeout=10).json()
            if health["num_decode_nodes"] == 2 and node_record(serving, member.info.server_id):
                return member.info
        time.sleep(0.5)
    return None


def in_thread(target: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(result=target()), daemon=True)
    thread.start()
    return thread, out


def kill_and_wait(serving: RayServing, victim: dict[str, Any], how: str) -> tuple[Any, float]:
    """Kill a decode node (crash: SIGKILL of its server, whose actor then exits; actor:
    Ray's kill of the actor, whose server then drains on its own); wait until Ray has
    restarted it and it serves again. (its new ServerInfo or None, seconds)."""
    ray = _ray_module()
    old_pid = victim["info"]["pid"]
    if how == "crash":
        os.kill(old_pid, signal.SIGKILL)
    else:
        ray.kill(ray.get_actor(victim["name"], namespace="splitserve"), no_restart=False)
    killed = time.monotonic()
    info = wait_restarted(serving, victim["name"], old_pid, timeout_s=60)
    restart_s = time.monotonic() - killed
    assert info is not None and restart_s < 30, f"{how}: not serving again within 30 s: {info}"
    assert info.num_starts == 2 and info.server_id != victim["info"]["server_id"]
    record = node_record(serving, info.server_id)
    assert record is not None and record["nixl_agent_name"] == info.server_id
    return info, restart_s


@slow
@pytest.mark.faults
def test_killed_decode_nodes_are_restarted_and_no_request_hangs(serving: RayServing) -> None:
    decode = members(serving.status, "decode")
    rate, count = 6.0, 200  # 33 s: both kills and the first restart fall inside
    load, out = in_thread(
        lambda: asyncio.run(steady_load(serving.url, rate, count, threading.Event()))
    )
    served_before = node_stats(grpc_address(decode[0]), "decode").num_requests_finished
    time.sleep(3.0)
    served_at_kill = node_stats(grpc_address(decode[0]), "decode").num_requests_finished
    restart_s = {}
    is_mid_load = []
    for victim, how in zip(decode, ("crash", "actor"), strict=True):
        is_mid_load.append(load.is_alive())
        restart_s[f"{victim['name']} ({how})"] = round(kill_and_wait(serving, victim, how)[1], 1)
    load.join(count / rate + 2 * REQUEST_TIMEOUT_S)
    outcomes = out["result"]
    print(
        f"decode nodes killed under {count} requests at {rate:.0f} req/s: {dict(outcomes)}; "
        f"seconds until each served again: {restart_s}"
    )
    assert served_at_kill > served_before, "the load never reached the node killed"
    assert all(is_mid_load), "a node was killed after the load ended"
    assert sum(outcomes.values()) == count and outcomes["hung"] == 0
    assert not any(is_alive(m["info"]["pid"]) for m in decode)


@slow
def test_scale_to_2p2d_and_back_under_load_fails_no_request(serving: RayServing) -> None:
    stop = threading.Event()
    load, out = in_thread(lambda: asyncio.run(steady_load(serving.url, 4.0, None, stop)))
    try:
        steps = {"1P1D": scale_to(serving, 1, 1), "2P2D": scale_to(serving, 2, 2)}
        grown = serving.refresh()
        assert (grown["num_prefill"], grown["num_decode"]) == (2, 2)
        new = [m for m in grown["members"] if m["name"].endswith(("prefill-1", "decode-2"))]
        assert len(new) == 2 and all(m["state"] == "serving" for m in new)
        traffic = wait_for_traffic(new, timeout_s=60)
        steps["back to 1P1D"] = scale_to(serving, 1, 1)
        command = ["ray", "scale", "--address", serving.address, "--cluster", serving.cluster]
        bad = subprocess.run(
            [sys.executable, "-m", "splitserve.launch.cli", *command, "--num-decode", "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 2 and "at least one decode node" in bad.stderr, bad.stderr
        shrunk = serving.refresh()
    finally:
        stop.set()
        load.join(2 * REQUEST_TIMEOUT_S)
    outcomes = out["result"]
    print(f"scale under 4 req/s: {dict(outcomes)}; seconds per step {steps}; new nodes {traffic}")
    assert outcomes["ok"] > 0 and outcomes["ok"] == sum(outcomes.values())
    assert [m["name"].rsplit(":", 1)[1] for m in shrunk["members"] if m["kind"] != "router"] == [
        "prefill-0",
        "decode-0",
    ]
    assert all(not is_alive(m["info"]["pid"]) for m in new)
    assert all(node_record(serving, m["info"]["server_id"]) is None for m in new)


def scale_to(serving: RayServing, num_prefill: int, num_decode: int) -> float:
    """`splitserve ray scale`; once it returned, the router lists exactly the nodes wanted.
    Its seconds."""
    start = time.monotonic()
    splitserve_ray(
        serving.address,
        serving.cluster,
        *("scale", "--num-prefill", str(num_prefill), "--num-decode", str(num_decode)),
    )
    seconds = round(time.monotonic() - start, 1)
    health = httpx.get(f"{serving.url}/health", timeout=10).json()
    assert (health["num_prefill_nodes"], health["num_decode_nodes"]) == (num_prefill, num_decode)
    return seconds


def wait_for_traffic(new: list[dict[str, Any]], timeout_s: float) -> dict[str, int]:
    """Until each new node's stats show work routed to it: {name: requests or tokens}."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, int] = {}
    while time.monotonic() < deadline:
        for m in new:
            stats = node_stats(grpc_address(m), m["kind"])
            work = stats.prompt_tokens_computed if m["kind"] == "prefill" else 0
            seen[m["name"]] = work or stats.num_requests_finished
        if all(seen.values()):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"routing did not reach every new node within {timeout_s} s: {seen}")


def cluster_processes(cluster: str) -> list[str]:
    """Command lines of live processes started for `cluster` (they all take --cluster)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        is_ours = any(a == "--cluster" and b == cluster for a, b in itertools.pairwise(args))
        if is_ours and is_alive(int(proc.name)):
            found.append(" ".join(args))
    return found


@slow
def test_down_leaves_no_actors_processes_or_redis_keys(serving: RayServing) -> None:
    ray = _ray_module()
    before = serving.refresh()
    pids = [p for m in before["members"] for p in (m["info"]["pid"], m["info"]["actor_pid"])]
    assert cluster_processes(serving.cluster), "the cluster's servers are not found"
    start = time.monotonic()
    said = splitserve_ray(serving.address, serving.cluster, "down").strip()
    print(f"ray down in {time.monotonic() - start:.1f} s: {said}")
    assert "is down" in said

    named = ray.util.list_named_actors(all_namespaces=True)
    assert [a for a in named if a["name"].startswith(f"{serving.cluster}:")] == []
    deadline = time.monotonic() + 30
    while any(is_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in pids if is_alive(p)] == [] and cluster_processes(serving.cluster) == []
    client = redis.Redis.from_url(serving.redis_url)
    assert list(client.scan_iter(match=f"splitserve:{serving.cluster}:*")) == []
    client.close()
    command = ["ray", "status", "--address", serving.address, "--cluster", serving.cluster]
    again = subprocess.run(
        [sys.executable, "-m", "splitserve.launch.cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and "no splitserve cluster" in again.stderr


def test_placement_packs_or_spreads_by_role() -> None:
    nodes = [RayNode(f"n{i}", "10.0.0.1", {"GPU": 2.0, "CPU": 8.0}) for i in range(3)]
    demand = node_demand(RayClusterConfig(model="m"))
    assert demand == {"GPU": 1.0}

    def place(roles: list[Role], strategy: Placement) -> list[str]:
        placed: list[Placed] = []
        for role in roles:
            node = choose_node(nodes, placed, role, strategy, demand)
            placed.append(Placed(node.node_id if node else "none", role))
        return [p.ray_node_id for p in placed]

    roles: list[Role] = ["prefill", "decode", "decode", "decode", "prefill", "decode", "decode"]
    assert place(roles, "pack") == ["n0", "n0", "n1", "n1", "n2", "n2", "none"]
    assert place(roles, "spread") == ["n0", "n1", "n2", "n0", "n1", "n2", "none"]


def test_placement_counts_cpu_and_custom_resource_slots() -> None:
    config = RayClusterConfig(model="m", use_gpu=False, cpus_per_node=2, node_resource="slot")
    demand = node_demand(config)
    assert demand == {"CPU": 2.0, "slot": 1.0}
    assert num_slots({"CPU": 8.0, "slot": 3.0}, demand) == 3
    assert num_slots({"CPU": 3.0, "slot": 3.0}, demand) == 1
    assert num_slots({"CPU": 8.0}, demand) == 0


def test_config_checks_and_restart_backoff() -> None:
    config = RayClusterConfig(model="m", restart_backoff_s=1.0, max_restart_backoff_s=5.0)
    assert [config.restart_delay_s(n) for n in range(5)] == [0.0, 1.0, 2.0, 4.0, 5.0]
    for bad, hint in (
        ({"num_decode": 0}, "at least one decode node"),
        ({"num_prefill": -1}, "--num-prefill"),
        ({"cluster": "a b"}, "--cluster"),
        ({"router_port": 0}, "fixed port"),
        ({"decode_placement": "random"}, "pack"),
    ):
        with pytest.raises(ValueError, match=hint):
            RayClusterConfig(model="m", **bad)


def test_node_command_takes_a_fresh_port_and_the_role_flags() -> None:
    config = RayClusterConfig(
        model="/m", use_gpu=False, node_args=("--dtype=float32",), decode_args=("--x",)
    )
    args = node_command(config, "decode", "10.0.0.5", "redis://h:1/0")
    assert args[0] == "decode" and args[-2:] == ("--dtype=float32", "--x")
    flags = dict(zip(args[1:-2:2], args[2:-2:2], strict=True))
    assert flags["--port"] == "0" and flags["--host"] == "10.0.0.5"
    assert flags["--device"] == "cpu" and flags["--redis"] == "redis://h:1/0"
    assert flags["--cpu-threads"] == "1"  # the actor's one CPU (cpus_per_node)
    gpu = node_command(RayClusterConfig(model="/m"), "decode", "10.0.0.5", "redis://h:1/0")
    assert "--cpu-threads" not in gpu
    router = router_command(config, "10.0.0.5", "redis://h:1/0")
    assert "--stream-idle-timeout-s" in router and "--x" not in router
