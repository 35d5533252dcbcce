"""Disaggregation micro-benchmark: where the time to the first token goes, per prompt length.

    python -m splitserve.benchmarks.disagg --model dummy:tiny --lengths 128,512,2048,8192 \
        --reps 3 [--device cuda] [--out result.json]

Starts a one-host cluster of one prefill and one decode node (on cuda:0 and cuda:1 with
--device cuda), sends each prompt (fresh random tokens: no cache hits) to the decode node
with the prefill node named, and splits the time from `Generate` to the first token:

- admit: the decode node receiving the request and allocating its blocks;
- prefill queue: waiting in the prefill node's scheduler;
- prefill: first chunk scheduled to last chunk computed (chunk pushes overlap this);
- transfer: the rest until every block landed and the RPC answered (push tail, RPC and
  notification latency);
- admission: KV landed to first token streamed by the decode node.

Medians over --reps are printed and written as JSON with the command, commit and device.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
from typing import Any

import grpc

from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.engine.sampling_params import SamplingParams
from splitserve.launch.local_cluster import ClusterConfig, LocalCluster, NodeProcess
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc
from splitserve.protocol.messages import sampling_params_to_proto

PHASES = ("admit", "prefill_queue", "prefill", "transfer", "admission")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:tiny")
    parser.add_argument("--lengths", default="128,512,2048,8192")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def breakdown(ttft_s: float, m: pb.RequestMetrics) -> dict[str, float]:
    transfer = m.transfer_time_s - m.prefill_queue_time_s - m.prefill_compute_time_s
    return {
        "ttft": ttft_s,
        "admit": max(0.0, ttft_s - m.transfer_time_s - m.admission_time_s),
        "prefill_queue": m.prefill_queue_time_s,
        "prefill": m.prefill_compute_time_s,
        "transfer": max(0.0, transfer),
        "push_tail": m.push_tail_time_s,
        "admission": m.admission_time_s,
    }


async def one_request(
    decode: NodeProcess, prefill: NodeProcess, rid: str, prompt: list[int]
) -> dict[str, float]:
    params = sampling_params_to_proto(SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    request = pb.GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling_params=params,
        prefill_node=pb.NodeEndpoint(node_id=prefill.node_id, grpc_address=prefill.address),
    )
    async with grpc.aio.insecure_channel(decode.address) as channel:
        async for message in node_pb2_grpc.DecodeStub(channel).Generate(request):
            if message.finished:
                if not message.metrics.is_prefill_remote:
                    raise RuntimeError(f"{rid} was not prefilled remotely: {message.metrics}")
                return breakdown(message.metrics.ttft_s, message.metrics)
    raise RuntimeError(f"{rid}: stream ended without a final message")


def run(args: argparse.Namespace) -> dict[str, Any]:
    lengths = [int(x) for x in args.lengths.split(",")]
    node_args = (
        "--dtype",
        args.dtype,
        "--kv-cache-memory-gib",
        str(args.kv_cache_memory_gib),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--max-model-len",
        str(max(lengths) + 16),
    )
    devices = ("cuda:0", "cuda:1") if args.device == "cuda" else ()
    # The benchmark talks to the nodes directly: no router, no Redis.
    config = ClusterConfig(
        model=args.model, router_port=None, use_redis=False, node_args=node_args, devices=devices
    )
    rng = random.Random(args.seed)
    rows: dict[int, dict[str, float]] = {}
    with LocalCluster(config) as cluster:
        decode, prefill = cluster.decode[0], cluster.prefill[0]
        asyncio.run(one_request(decode, prefill, "warmup", [1] * 64))
        for length in lengths:
            samples = [
                asyncio.run(
                    one_request(
                        decode,
                        prefill,
                        f"len{length}-{rep}",
                        [rng.randrange(1000) for _ in range(length)],
                    )
                )
                for rep in range(args.reps)
            ]
            rows[length] = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    return {**provenance(args.device), "model": args.model, "reps": args.reps, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    result = run(args)
    print(f"{'tokens':>7} {'ttft':>9} " + " ".join(f"{p:>13}" for p in PHASES) + "   (ms)")
    for length, row in result["rows"].items():
        cells = " ".join(f"{row[p] * 1e3:13.2f}" for p in PHASES)
        print(f"{length:>7} {row['ttft'] * 1e3:9.2f} {cells}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
