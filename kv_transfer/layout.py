"""Where a node's KV blocks live, as its peers need to know, and how pushes address them.

The KV pool is one block-major tensor
``kv[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``, so block ``b`` of
every layer is the contiguous region ``[base + b * block_bytes, base + (b+1) * block_bytes)``.
A `PoolDescriptor` says that much about a node's pool; the decode node publishes its own
(with its NIXL metadata) and the prefill node hands it to `TransferAgent.connect`.

NIXL's cost is per descriptor, so a push turns its block lists into runs that are
consecutive on both sides (`coalesce_runs`), one descriptor per run (`run_descs`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch

MemType = Literal["DRAM", "VRAM"]
MEM_TYPES: tuple[str, ...] = get_args(MemType)


@dataclass(frozen=True)
class PoolDescriptor:
    # NIXL agent name of the node owning the pool.
    agent_name: str
    # Virtual address of block 0 (data_ptr of the pool tensor).
    base_addr: int
    # Bytes of one block of all layers.
    block_bytes: int
    num_blocks: int
    # "DRAM" for a CPU pool, "VRAM" for a GPU pool.
    mem_type: MemType
    # CUDA device index of a VRAM pool; 0 for DRAM.
    device_id: int
    # KV compatibility hash of the owning node (kv_transfer/compat.py); "" for bare agents.
    compat_hash: str = ""

    def __post_init__(self) -> None:
        if self.mem_type not in MEM_TYPES:
            raise ValueError(f"mem_type must be one of {MEM_TYPES}, got {self.mem_type!r}")
        for name in ("base_addr", "block_bytes", "num_blocks", "device_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"PoolDescriptor.{name} must be an int >= 0, got {value!r}")
        if self.block_bytes == 0 or self.num_blocks == 0:
            raise ValueError("a KV pool needs block_bytes > 0 and num_blocks > 0")

    @property
    def total_bytes(self) -> int:
        return self.block_bytes * self.num_blocks

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PoolDescriptor:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError(f"a PoolDescriptor is a JSON object, got {text!r}")
        return cls(**fields)


def describe_pool(pool: torch.Tensor, agent_name: str, compat_hash: str = "") -> PoolDescriptor:
    """The descriptor of a block-major pool tensor (dim 0 indexes blocks)."""
    if pool.dim() < 1 or pool.shape[0] < 1:
        raise ValueError(f"KV pool must have a leading block dimension, got shape {pool.shape}")
    if not pool.is_contiguous():
        raise ValueError("KV pool must be contiguous (block-major); pass kv.contiguous()")
    block_bytes = pool[0].numel() * pool.element_size()
    is_cuda = pool.device.type == "cuda"
    if not is_cuda and pool.device.type != "cpu":
        raise ValueError(f"KV pool must be on cpu or cuda, got {pool.device}")
    return PoolDescriptor(
        agent_name=agent_name,
        base_addr=pool.data_ptr(),
        block_bytes=block_bytes,
        num_blocks=pool.shape[0],
        mem_type="VRAM" if is_cuda else "DRAM",
        device_id=(pool.device.index or 0) if is_cuda else 0,
        compat_hash=compat_hash,
    )


class Run(NamedTuple):
    src_start: int
    dst_start: int
    length: int


def coalesce_runs(src: Sequence[int], dst: Sequence[int]) -> list[Run]:
    """Split the pairing src[i] -> dst[i] into maximal runs consecutive on both sides.

    Order is kept: runs come in the order of the input pairs.
    """
    if len(src) != len(dst):
        raise ValueError(
            f"src and dst block lists differ in length ({len(src)} vs {len(dst)}); "
            "pass one destination block per source block"
        )
    runs: list[Run] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            last = runs[-1]
            if s == last.src_start + last.length and d == last.dst_start + last.length:
                runs[-1] = Run(last.src_start, last.dst_start, last.length + 1)
                continue
        runs.append(Run(s, d, 1))
    return runs


def split_runs(runs: Sequence[Run], max_blocks: int) -> list[Run]:
    """Cut runs longer than `max_blocks` into pieces of at most that many (0: no cut)."""
    if max_blocks <= 0:
        return list(runs)
    out: list[Run] = []
    for run in runs:
        for offset in range(0, run.length, max_blocks):
            length = min(max_blocks, run.length - offset)
            out.append(Run(run.src_start + offset, run.dst_start + offset, length))
    return out


def run_descs(runs: Sequence[Run], pool: PoolDescriptor, side: Literal["src", "dst"]) -> np.ndarray:
    """NIXL descriptors (address, length, device id) of one side of `runs`, an N x 3 array."""
    descs = np.empty((len(runs), 3), dtype=np.uint64)
    for i, run in enumerate(runs):
        start = run.src_start if side == "src" else run.dst_start
        descs[i] = (
            pool.base_addr + start * pool.block_bytes,
            run.length * pool.block_bytes,
            pool.device_id,
        )
    return descs


def check_block_ids(
    block_ids: Sequence[int], num_blocks: int, what: str, is_unique: bool = False
) -> None:
    """Raise unless every id indexes the pool (and, with `is_unique`, none repeats)."""
    if not block_ids:
        return
    low, high = min(block_ids), max(block_ids)
    if low < 0 or high >= num_blocks:
        raise ValueError(
            f"{what} block ids must lie in [0, {num_blocks}), got min {low} max {high}"
        )
    if is_unique and len(set(block_ids)) != len(block_ids):
        raise ValueError(f"{what} block ids repeat; each block may be written once per push")
