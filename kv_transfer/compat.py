"""The KV compatibility hash: two nodes exchange KV only when their pools mean the same thing.

A prefill node WRITEs raw bytes into a decode node's pool, so both must agree on what a
block is: the model (its identity, which also seeds the block-hash chain), the KV dtype,
the block size, the pool layout (its version below) and the shape of a block (layers, KV
heads, head dim). Equal block sizes in bytes are not enough: a float16 and a bfloat16 pool,
or two models of one shape, would exchange garbage silently.

Who calls what: NodeRuntime builds `KvCompat.from_pool(model_id, kv_pool).hash()` once and
passes it in TransferConfig; the TransferAgent puts it in its PoolDescriptor (sent with
the agent metadata: in every PrefillRequest and TransferMetadata answer) and, in
`connect`, refuses a peer whose descriptor carries another hash before adding the remote
agent (IncompatiblePeer), as vLLM's NixlConnector does in its handshake.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

# Bump when the pool's memory layout changes (kv_pool.py: block-major
# [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]).
KV_LAYOUT_VERSION = 1


class IncompatiblePeer(ValueError):
    """A peer's KV pool is not compatible with this node's (another model, dtype or layout)."""


@dataclass(frozen=True)
class KvCompat:
    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout_version: int = KV_LAYOUT_VERSION

    @classmethod
    def from_pool(cls, model_id: str, pool: torch.Tensor) -> KvCompat:
        """From a block-major pool [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]."""
        if pool.dim() != 6 or pool.shape[2] != 2:
            raise ValueError(
                "a KV pool is [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
                f"got shape {tuple(pool.shape)}"
            )
        _, num_layers, _, block_size, num_kv_heads, head_dim = pool.shape
        return cls(
            model_id=model_id,
            dtype=str(pool.dtype).removeprefix("torch."),
            block_size=block_size,
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
        )

    def hash(self) -> str:
        """Hex SHA-256 of the fields (stable across processes and versions of Python)."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())
