"""Engine flags shared by every command that runs an engine (generate, prefill, decode,
benchmarks), and the EngineConfig they build."""

from __future__ import annotations

import argparse

from splitserve.engine.config import (
    ATTENTION_BACKENDS,
    DTYPES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    Role,
    SchedulerConfig,
)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        required=True,
        help="HF model directory, .gguf file, ORG/NAME repo id in the local HF cache, "
        "built-in name (smollm2-135m-instruct) or dummy:<preset>",
    )
    g.add_argument("--dtype", default="auto", choices=DTYPES)
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="auto: Triton kernels on CUDA, plain torch on CPU",
    )
    g.add_argument(
        "--enforce-eager", action="store_true", help="CUDA: never replay captured CUDA graphs"
    )
    g.add_argument(
        "--cuda-graph-max-batch",
        type=int,
        default=256,
        help="CUDA: largest decode batch that replays a captured graph",
    )
    g.add_argument(
        "--cuda-graph-max-seq-len",
        type=int,
        default=8192,
        help="CUDA: longest context a graph-replayed decode batch may hold",
    )
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--served-model-name", default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-blocks", type=int, default=None, help="exact KV pool size in blocks")
    g.add_argument("--kv-cache-memory-gib", type=float, default=0.5)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--no-chunked-prefill", action="store_true")
    g.add_argument(
        "--no-overlap-output-processing",
        action="store_true",
        help="CUDA: detokenize each step's tokens before launching the next step",
    )


def engine_config_from_args(args: argparse.Namespace, role: Role = "both") -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            seed=args.seed,
            max_model_len=args.max_model_len,
            served_model_name=args.served_model_name,
            attention_backend=args.attention_backend,
            enforce_eager=args.enforce_eager,
            cuda_graph_max_batch=args.cuda_graph_max_batch,
            cuda_graph_max_seq_len=args.cuda_graph_max_seq_len,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            kv_cache_memory_gib=args.kv_cache_memory_gib,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            enable_chunked_prefill=not args.no_chunked_prefill,
            role=role,
            overlap_output_processing=False if args.no_overlap_output_processing else None,
        ),
    )
