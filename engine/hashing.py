"""Block hashing: the one definition of a KV block's identity, shared by nodes and router.

Torch-free on purpose: the router imports it to hash prompts the same way the nodes do.

Spec (docs/architecture.md, "Block hashing"):

    h[-1] = H(b"splitserve-kv-v1" ‖ model identity (UTF-8) ‖ 0x00 ‖ block_size as LE uint32)
    h[i]  = H(h[i-1] as 16 LE bytes ‖ tokens of block i as LE uint32 ‖ extra)

`H` is xxh3-128 (seed 0) and a hash is the 128-bit unsigned integer it returns. Only full
blocks are hashed. `extra` is empty unless something else changes the KV (a LoRA name,
later). Python's built-in `hash()` is never used: it is salted per process.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NewType

import xxhash

BlockHash = NewType("BlockHash", int)

_HASH_DOMAIN = b"splitserve-kv-v1"


def seed_hash(model_id: str, block_size: int) -> BlockHash:
    """The chain's root, h[-1], for one model identity and block size."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    payload = _HASH_DOMAIN + model_id.encode("utf-8") + b"\x00" + struct.pack("<I", block_size)
    return BlockHash(xxhash.xxh3_128_intdigest(payload))


def hash_block(parent: BlockHash, tokens: Sequence[int], extra: bytes = b"") -> BlockHash:
    """h[i] from h[i-1] and the token ids of block i."""
    payload = parent.to_bytes(16, "little") + struct.pack(f"<{len(tokens)}I", *tokens) + extra
    return BlockHash(xxhash.xxh3_128_intdigest(payload))


def hash_blocks(
    tokens: Sequence[int],
    block_size: int,
    seed: BlockHash,
    extra: bytes = b"",
    start: int = 0,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Hashes of the full blocks of `tokens`, from block index `start` on.

    `parent` is h[start - 1] (the seed when `start` is 0), so a caller that already holds
    the first hashes extends the chain without rehashing them.
    """
    prev = seed if parent is None else parent
    if start > 0 and parent is None:
        raise ValueError("hash_blocks: pass parent=h[start-1] when start > 0")
    end = len(tokens) // block_size
    if end <= start:
        return []
    # Pack every token once; each block hashes a slice (same bytes as hash_block).
    packed = struct.pack(
        f"<{(end - start) * block_size}I", *tokens[start * block_size : end * block_size]
    )
    step = 4 * block_size
    digest = xxhash.xxh3_128_intdigest
    out: list[BlockHash] = []
    for offset in range(0, len(packed), step):
        prev = BlockHash(
            digest(prev.to_bytes(16, "little") + packed[offset : offset + step] + extra)
        )
        out.append(prev)
    return out


def hash_hex(h: BlockHash) -> str:
    """Fixed-width hex form of a hash (32 characters), as used in Redis keys."""
    return f"{h:032x}"
