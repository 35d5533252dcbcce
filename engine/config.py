"""Engine configuration: frozen dataclasses, built once (CLI or `LLM(...)`) and passed down.

Derived values are properties; per-node variants are made with `dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

DType = Literal["auto", "float32", "bfloat16", "float16", "float64"]
# Kernel backends (kernels/registry.py): "auto" is Triton on CUDA, plain torch elsewhere.
AttentionBackendName = Literal["auto", "torch", "triton"]
KernelBackendName = Literal["auto", "torch", "triton"]
# "dummy": the model directory's config and tokenizer with random weights (vLLM's flag).
LoadFormat = Literal["auto", "dummy"]
# How random weights are drawn (engine/model/dummy.py): "normal" at a trained checkpoint's
# scale, "uniform" as vLLM's and SGLang's dummy loaders draw them.
DummyWeights = Literal["normal", "uniform"]

DTYPES: tuple[str, ...] = get_args(DType)
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackendName)
KERNEL_BACKENDS: tuple[str, ...] = get_args(KernelBackendName)
LOAD_FORMATS: tuple[str, ...] = get_args(LoadFormat)
DUMMY_WEIGHTS: tuple[str, ...] = get_args(DummyWeights)


@dataclass(frozen=True)
class ModelConfig:
    # HF model directory, .gguf file, cached ORG/NAME repo id or built-in name (resolved by
    # engine/model/source.py), or `dummy:<preset>` for random weights of a real shape.
    model: str
    # "auto" takes the checkpoint's torch_dtype (fp32 when it has none).
    dtype: DType = "auto"
    # torch device string: "cpu", "cuda", "cuda:1".
    device: str = "cpu"
    # Seed for dummy weights and for sampling rows that carry no seed of their own.
    seed: int = 0
    # "auto" reads the checkpoint's weights; "dummy" draws random ones of its shape.
    load_format: LoadFormat = "auto"
    # Random weights (dummy presets, load_format "dummy"): "normal" draws N(0, 0.02) with
    # norm scales 1 and biases 0; "uniform" draws every parameter, norm scales included,
    # from U(-1e-3, 1e-3), as vLLM's and SGLang's dummy loaders do, so that engines compared
    # on dummy weights multiply operands of one distribution.
    dummy_weights: DummyWeights = "normal"
    # CPU only: torch's intra-op threads in this process; None keeps torch's default (one
    # per core). Nodes sharing a machine each take a share, or their threads contend.
    cpu_threads: int | None = None
    # Context cap in tokens; None takes the model's max_position_embeddings.
    max_model_len: int | None = None
    # Name the API reports and the block-hash chain is seeded with; None: `model` itself.
    served_model_name: str | None = None
    # Paged attention. "auto": Triton kernels on CUDA devices, plain torch elsewhere.
    attention_backend: AttentionBackendName = "auto"
    # Norm, rotary and activation. "auto": the same backend attention resolves to.
    kernel_backend: KernelBackendName = "auto"
    # CUDA only: run every step eagerly instead of replaying captured CUDA graphs.
    enforce_eager: bool = False
    # Decode-only batches of at most this many sequences replay a CUDA graph (larger run
    # piecewise graphs); capped by max_num_seqs.
    cuda_graph_max_batch: int = 512
    # ... and only while every sequence's context fits in this many tokens.
    cuda_graph_max_seq_len: int = 8192
    # Other steps (prefill, mixed) of at most this many tokens replay piecewise CUDA graphs
    # around an eager attention (engine/piecewise_graphs.py); larger ones run the same
    # pieces eagerly at their own row count; 0 runs every step eagerly.
    piecewise_graph_max_tokens: int = 2048
    # CUDA, Triton attention: a mixed step's decode rows are attended on a second stream
    # beside its prefill rows (kernels/side_stream.py).
    overlap_decode_attention: bool = True
    # Triton attention: a decode plan of several partitions per sequence merges them in
    # the split kernel (the last partition of each query group; kernels/decode_attention.py)
    # instead of a second kernel.
    fused_decode_merge: bool = True
    # Triton attention: a step's chunks over cached context of at most this many rows (the
    # rest of a prompt chunked at the step's budget) are attended by the decode kernel, one
    # query row as one sequence (kernels/prefill_runs.py, ROWS); 0: by the prefill kernel.
    # On an H100 the decode kernel wins at 12 rows and loses at 32 over a 4,096-token prompt
    # (benchmarks/results/kernels/short_rest_h100_2026-12-06/).
    short_rest_rows: int = 16
    # Triton attention: a run of chunks over cached context whose query tiles would leave
    # most of the device idle (a short chunk over a long context) is attended by the prefill
    # kernel with each context split across programs (kernels/prefill_split.py). On an H100
    # a 128-row chunk over 4,096 tokens beside 12 decode rows took 140.8 µs a layer against
    # 194.7 unsplit (benchmarks/results/kernels/short_rest_split_h100_2026-12-06/).
    split_context_prefill: bool = True
    # CUDA, Triton attention: a run of several fresh prompts on cuDNN is attended in one
    # ragged call (kernels/cudnn_ragged.py) where the torch build keeps its plans; False:
    # one call a prompt.
    cudnn_ragged_prompts: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(
                f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}"
            )
        if self.short_rest_rows < 0:
            raise ValueError(
                f"short_rest_rows must be >= 0 (0 leaves short chunks to the prefill kernel), "
                f"got {self.short_rest_rows}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.dummy_weights not in DUMMY_WEIGHTS:
            raise ValueError(
                f"dummy_weights must be one of {DUMMY_WEIGHTS}, got {self.dummy_weights!r}"
            )
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be >= 1, got {self.cuda_graph_max_batch}")
        if self.piecewise_graph_max_tokens < 0:
            raise ValueError(
                f"piecewise_graph_max_tokens must be >= 0, got {self.piecewise_graph_max_tokens}"
            )
        if self.cuda_graph_max_seq_len < 1:
            raise ValueError(
                f"cuda_graph_max_seq_len must be >= 1, got {self.cuda_graph_max_seq_len}"
            )

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model


# KV pool of a node on a device other than CUDA when no size is given, GiB.
CPU_KV_CACHE_MEMORY_GIB = 0.5


@dataclass(frozen=True)
class CacheConfig:
    # Tokens per KV block; one value for the whole cluster.
    block_size: int = 16
    # Exact number of KV blocks; overrides kv_cache_memory_gib when set.
    num_blocks: int | None = None
    # Memory budget for the KV pool in GiB when num_blocks is not given. None: on CUDA,
    # what gpu_memory_utilization leaves once the weights and one full step's activations
    # are counted (engine/device_memory.py); on other devices CPU_KV_CACHE_MEMORY_GIB.
    kv_cache_memory_gib: float | None = None
    # CUDA, when neither size is given: the share of the device's memory this engine may
    # use in all (weights, activations, KV pool); the rest covers CUDA graphs and the
    # sampler's temporaries. vLLM 0.26's default (its servers report 0.92 in
    # cache_config_info), so that both size their KV pools alike.
    gpu_memory_utilization: float = 0.92
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory_gib is not None and self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    # Token budget of one engine step, shared by decode tokens and prefill chunks (on a
    # large GPU, LARGE_GPU_SCHEDULER's unless given: `scheduler_config`).
    max_num_batched_tokens: int = 2048
    # Most sequences in the running batch at once (the same).
    max_num_seqs: int = 256
    # Split long prompts into chunks of the remaining step budget (else whole prompts only).
    enable_chunked_prefill: bool = True
    # Launch the next step's forward pass before detokenizing this step's tokens, so the
    # host's output work overlaps the GPU. None: on for CUDA devices, unless the node's KV
    # connector needs each step's blocks as it ends (a prefill node's).
    overlap_output_processing: bool | None = None
    # Hand a request's first and last outputs to its stream as soon as the step that made
    # them is read back, not with the rest of that step's outputs during the next step
    # (engine/async_engine.py): neither the time to first token nor the request's end
    # waits for a launch.
    first_and_last_at_once: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


# A CUDA device of at least this much memory (GiB) gets LARGE_GPU_SCHEDULER's limits where
# they are not given, as `vllm serve` does on such a GPU.
LARGE_GPU_MIN_GIB = 70
LARGE_GPU_SCHEDULER = {"max_num_batched_tokens": 8192, "max_num_seqs": 1024}


def scheduler_config(device_memory_gib: float | None, **fields: object) -> SchedulerConfig:
    """SchedulerConfig from the fields given (None: not given), the rest from the device:
    LARGE_GPU_SCHEDULER on a CUDA device of LARGE_GPU_MIN_GIB or more
    (`device_memory_gib`, None for other devices), else the dataclass defaults."""
    given = {name: value for name, value in fields.items() if value is not None}
    if device_memory_gib is not None and device_memory_gib >= LARGE_GPU_MIN_GIB:
        given = {**LARGE_GPU_SCHEDULER, **given}
    return SchedulerConfig(**given)  # type: ignore[arg-type]
