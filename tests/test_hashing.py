"""Block hashing: the one spec router and nodes share."""

from __future__ import annotations

import subprocess
import sys

from splitserve.engine.hashing import hash_block, hash_blocks, hash_hex, seed_hash


def test_chain_matches_block_by_block_definition() -> None:
    seed = seed_hash("model", 16)
    tokens = list(range(1000, 1100))
    prev, expected = seed, []
    for i in range(len(tokens) // 16):
        prev = hash_block(prev, tokens[i * 16 : (i + 1) * 16])
        expected.append(prev)
    assert hash_blocks(tokens, 16, seed) == expected
    assert len(expected) == 6  # only full blocks
    assert hash_blocks(tokens, 16, seed, start=4, parent=expected[3]) == expected[4:]
    assert hash_blocks(tokens[:15], 16, seed) == []


def test_seed_depends_on_model_and_block_size_and_extra_changes_the_chain() -> None:
    assert seed_hash("a", 16) != seed_hash("b", 16) != seed_hash("a", 32)
    seed = seed_hash("a", 16)
    assert hash_block(seed, [1] * 16) != hash_block(seed, [1] * 16, extra=b"lora-x")
    assert len(hash_hex(seed)) == 32


def test_hashes_are_identical_across_processes() -> None:
    """Never Python's salted hash(): another interpreter computes the same values."""
    code = (
        "from splitserve.engine.hashing import hash_blocks, seed_hash;"
        "print(hash_blocks(list(range(64)), 16, seed_hash('m', 16)))"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2)
    }
    assert len(runs) == 1
    assert runs.pop().strip() == str(hash_blocks(list(range(64)), 16, seed_hash("m", 16)))
