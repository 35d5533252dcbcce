"""Engine flags shared by every command that runs an engine (generate, prefill, decode,
benchmarks), and the EngineConfig they build. Defaults are read from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from splitserve.engine.config import (
    ATTENTION_BACKENDS,
    CPU_KV_CACHE_MEMORY_GIB,
    DTYPES,
    DUMMY_WEIGHTS,
    KERNEL_BACKENDS,
    LARGE_GPU_MIN_GIB,
    LARGE_GPU_SCHEDULER,
    LOAD_FORMATS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    scheduler_config,
)


def default_of(cls: type, name: str) -> Any:
    """The default a config dataclass gives `name`: the CLI's defaults are read from the
    configs, so each is defined once."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is dataclasses.MISSING:
                raise ValueError(f"{cls.__name__}.{name} has no plain default")
            return f.default
    raise ValueError(f"{cls.__name__} has no field {name!r}")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    _add_model_arguments(g)
    _add_kernel_arguments(g)
    _add_cache_and_scheduler_arguments(g)
    _add_output_arguments(g)


def _add_model_arguments(g: argparse._ArgumentGroup) -> None:
    model = ModelConfig
    g.add_argument(
        "--model",
        required=True,
        help="HF model directory, .gguf file, ORG/NAME repo id in the local HF cache, "
        "built-in name (smollm2-135m-instruct) or dummy:<preset>",
    )
    g.add_argument(
        "--dtype",
        default=default_of(model, "dtype"),
        choices=DTYPES,
        help="weights and KV dtype; auto: bfloat16 on CUDA, float32 on CPU",
    )
    g.add_argument(
        "--device", default=default_of(model, "device"), help="torch device: cpu, cuda, cuda:1"
    )
    g.add_argument(
        "--seed",
        type=int,
        default=default_of(model, "seed"),
        help="seed of random sampling (and of dummy weights)",
    )
    g.add_argument(
        "--cpu-threads",
        type=int,
        default=default_of(model, "cpu_threads"),
        help="CPU only: torch threads of this node (default: one per core; `up --cpu` gives "
        "each node its share of the cores)",
    )
    g.add_argument(
        "--load-format",
        default=default_of(model, "load_format"),
        choices=LOAD_FORMATS,
        help="dummy: the model directory's config and tokenizer with random weights",
    )
    g.add_argument(
        "--dummy-weights",
        default=default_of(model, "dummy_weights"),
        choices=DUMMY_WEIGHTS,
        help="how random weights are drawn: normal, N(0, 0.02) with norm scales 1; uniform, "
        "every parameter from U(-1e-3, 1e-3) as vLLM's and SGLang's dummy loaders",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=default_of(model, "max_model_len"),
        help="context length in tokens (default: the model config's)",
    )
    g.add_argument(
        "--served-model-name",
        default=default_of(model, "served_model_name"),
        help="name the API serves it as (default: --model)",
    )


def _add_kernel_arguments(g: argparse._ArgumentGroup) -> None:
    model = ModelConfig
    g.add_argument(
        "--attention-backend",
        default=default_of(model, "attention_backend"),
        choices=ATTENTION_BACKENDS,
        help="paged attention; auto: Triton kernels on CUDA (prefill chunks with nothing "
        "cached: torch's flash kernel), plain torch on CPU; triton: Triton kernels only",
    )
    g.add_argument(
        "--kernel-backend",
        default=default_of(model, "kernel_backend"),
        choices=KERNEL_BACKENDS,
        help="norm, rotary and activation kernels; auto: whatever attention resolves to",
    )
    g.add_argument(
        "--enforce-eager", action="store_true", help="CUDA: never replay captured CUDA graphs"
    )
    g.add_argument(
        "--cuda-graph-max-batch",
        type=int,
        default=default_of(model, "cuda_graph_max_batch"),
        help="CUDA: largest decode batch that replays a captured graph",
    )
    g.add_argument(
        "--cuda-graph-max-seq-len",
        type=int,
        default=default_of(model, "cuda_graph_max_seq_len"),
        help="CUDA: longest context a graph-replayed decode batch may hold",
    )
    g.add_argument(
        "--piecewise-graph-max-tokens",
        type=int,
        default=default_of(model, "piecewise_graph_max_tokens"),
        help="CUDA: largest prefill or mixed step that replays piecewise graphs; larger "
        "ones run the pieces eagerly at their own size (0: every step eager)",
    )
    _add_attention_path_arguments(g)


def _add_attention_path_arguments(g: argparse._ArgumentGroup) -> None:
    """The Triton attention's paths: which kernel takes which rows of a step."""
    _switch(
        g,
        "overlap_decode_attention",
        "CUDA, Triton attention: attend a mixed step's decode rows on a second stream "
        "beside its prefill rows",
    )
    _switch(
        g,
        "fused_decode_merge",
        "Triton attention: merge a split decode plan's partitions inside the split "
        "kernel (one launch a layer) instead of a second kernel",
    )
    g.add_argument(
        "--short-rest-rows",
        type=int,
        default=default_of(ModelConfig, "short_rest_rows"),
        help="Triton attention: attend a step's chunks over cached context of at most this "
        "many rows with the decode kernel, a row at a time (0: with the prefill kernel)",
    )
    _switch(
        g,
        "split_context_prefill",
        "Triton attention: attend chunks over cached context that would leave the device "
        "idle (a short chunk over a long context) with each context split across programs",
    )
    _switch(
        g,
        "cudnn_ragged_prompts",
        "CUDA, Triton attention: attend a run of fresh prompts on cuDNN in one ragged "
        "call (--no-cudnn-ragged-prompts: one call a prompt)",
    )


def _switch(g: argparse._ArgumentGroup, field: str, help_text: str) -> None:
    """--FIELD / --no-FIELD for a boolean of ModelConfig, defaulting to its default."""
    g.add_argument(
        "--" + field.replace("_", "-"),
        action=argparse.BooleanOptionalAction,
        default=default_of(ModelConfig, field),
        help=help_text,
    )


def _add_cache_and_scheduler_arguments(g: argparse._ArgumentGroup) -> None:
    cache, sched = CacheConfig, SchedulerConfig
    g.add_argument(
        "--block-size",
        type=int,
        default=default_of(cache, "block_size"),
        help="tokens per KV block (one value per cluster)",
    )
    g.add_argument(
        "--num-blocks",
        type=int,
        default=default_of(cache, "num_blocks"),
        help="exact KV pool size in blocks",
    )
    g.add_argument(
        "--kv-cache-memory-gib",
        type=float,
        default=default_of(cache, "kv_cache_memory_gib"),
        help="KV pool size in GiB (when --num-blocks is not given; default: on CUDA what "
        f"--gpu-memory-utilization leaves, else {CPU_KV_CACHE_MEMORY_GIB})",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=default_of(cache, "gpu_memory_utilization"),
        help="CUDA, with no KV pool size given: the share of the device's memory the node "
        "uses in all (weights, one step's activations, KV pool)",
    )
    g.add_argument(
        "--no-prefix-caching", action="store_true", help="never reuse cached prompt blocks"
    )
    large = f"on a GPU of {LARGE_GPU_MIN_GIB} GiB or more"
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="token budget of one engine step (decode tokens plus prefill chunks; default: "
        f"{LARGE_GPU_SCHEDULER['max_num_batched_tokens']} {large}, else "
        f"{default_of(sched, 'max_num_batched_tokens')})",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help=f"most requests running at once (default: {LARGE_GPU_SCHEDULER['max_num_seqs']} "
        f"{large}, else {default_of(sched, 'max_num_seqs')})",
    )
    g.add_argument(
        "--no-chunked-prefill",
        action="store_true",
        help="prefill each prompt in one step instead of budget-sized chunks",
    )


def _add_output_arguments(g: argparse._ArgumentGroup) -> None:
    """When a step's tokens are read back and handed on."""
    sched = SchedulerConfig
    g.add_argument(
        "--overlap-output-processing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch each step before the previous step's tokens are read back (default: "
        "on CUDA, unless the node's KV connector needs each step's blocks as it ends)",
    )
    g.add_argument(
        "--first-and-last-at-once",
        action=argparse.BooleanOptionalAction,
        default=default_of(sched, "first_and_last_at_once"),
        help="stream a request's first and last outputs as soon as they are read back, not "
        "with the rest of their step's outputs after the next step's launch",
    )


def resolve_scheduler_args(args: argparse.Namespace) -> None:
    """Fill --max-num-batched-tokens and --max-num-seqs, where not given, with the
    device's defaults (`scheduler_config`), in place."""
    from splitserve.engine.device_memory import total_memory_gib  # torch: only where needed

    limits = scheduler_config(
        total_memory_gib(args.device),
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
    )
    args.max_num_batched_tokens = limits.max_num_batched_tokens
    args.max_num_seqs = limits.max_num_seqs


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    resolve_scheduler_args(args)
    return EngineConfig(
        model=ModelConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            seed=args.seed,
            load_format=args.load_format,
            dummy_weights=args.dummy_weights,
            cpu_threads=args.cpu_threads,
            max_model_len=args.max_model_len,
            served_model_name=args.served_model_name,
            attention_backend=args.attention_backend,
            kernel_backend=args.kernel_backend,
            enforce_eager=args.enforce_eager,
            cuda_graph_max_batch=args.cuda_graph_max_batch,
            cuda_graph_max_seq_len=args.cuda_graph_max_seq_len,
            piecewise_graph_max_tokens=args.piecewise_graph_max_tokens,
            overlap_decode_attention=args.overlap_decode_attention,
            fused_decode_merge=args.fused_decode_merge,
            short_rest_rows=args.short_rest_rows,
            split_context_prefill=args.split_context_prefill,
            cudnn_ragged_prompts=args.cudnn_ragged_prompts,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            kv_cache_memory_gib=args.kv_cache_memory_gib,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            enable_chunked_prefill=not args.no_chunked_prefill,
            overlap_output_processing=args.overlap_output_processing,
            first_and_last_at_once=args.first_and_last_at_once,
        ),
    )
