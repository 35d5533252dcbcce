"""CausalLM over the paged pool against transformers on the same tiny checkpoints: one
prompt, a prompt in two chunks, and a batch mixing prefill chunks with decode steps."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.model.loader import LoadedModel, load_model
from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.registry import torch_kernels

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
BLOCK_SIZE = 16
TOL: dict[str, Any] = dict(atol=1e-4, rtol=1e-4)


def make_batch(
    chunks: list[tuple[list[int], int, list[int]]], device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """chunks: (all tokens of the sequence so far, first new position, block ids)."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    tables: list[list[int]] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    max_blocks = max(len(b) for _, _, b in chunks)
    for tokens, start, blocks in chunks:
        ids += tokens[start:]
        positions += range(start, len(tokens))
        slots += [
            blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, len(tokens))
        ]
        tables.append(blocks + [-1] * (max_blocks - len(blocks)))
        query_lens.append(len(tokens) - start)
        seq_lens.append(len(tokens))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0, *query_lens], device=device).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    return torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta


def new_pool(loaded: LoadedModel, num_blocks: int, device: str = "cpu") -> torch.Tensor:
    arch = loaded.arch
    shape = (num_blocks, arch.num_layers, 2, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim)
    return torch.zeros(shape, dtype=loaded.dtype, device=device)


@torch.inference_mode()
def run(loaded: LoadedModel, pool: torch.Tensor, chunks) -> torch.Tensor:
    ids, positions, meta = make_batch(chunks, str(pool.device))
    hidden = loaded.model(ids, positions, pool, meta)
    assert hidden.shape == (len(ids), loaded.arch.hidden_size) and hidden.dtype == loaded.dtype
    logits = loaded.model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    return logits


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tiny_model_factory):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_factory(request.param)
    ours = load_model(ModelConfig(str(model_dir), dtype="float32"), torch_kernels())
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = random.Random(0)
    vocab = ours.arch.vocab_size
    seqs = {n: [rng.randrange(vocab) for _ in range(n)] for n in (77, 62, 48)}
    with torch.no_grad():
        ref = {n: hf(torch.tensor([s])).logits[0].float() for n, s in seqs.items()}
    return model_dir, ours, seqs, ref


def test_full_prompt_matches_transformers(case) -> None:
    _, ours, seqs, ref = case
    logits = run(ours, new_pool(ours, 5), [(seqs[77], 0, [0, 1, 2, 3, 4])])
    torch.testing.assert_close(logits, ref[77], **TOL)
    assert logits.argmax(-1).tolist() == ref[77].argmax(-1).tolist()


def test_second_chunk_attends_to_cached_first_chunk(case) -> None:
    _, ours, seqs, ref = case
    tokens, blocks = seqs[77], [4, 0, 3, 1, 2]
    pool = new_pool(ours, 6)
    first = run(ours, pool, [(tokens[:40], 0, blocks[:3])])
    second = run(ours, pool, [(tokens, 40, blocks)])
    logits = torch.cat([first, second])
    torch.testing.assert_close(logits, ref[77], **TOL)
    assert logits.argmax(-1).tolist() == ref[77].argmax(-1).tolist()


def test_mixed_batch_of_prefill_chunks_and_decodes(case) -> None:
    _, ours, seqs, ref = case
    a, b = seqs[62], seqs[48]
    blocks_a, blocks_b = [7, 2, 5, 0], [1, 6, 3]
    pool = new_pool(ours, 8)
    steps = [  # (tokens of a so far, a's start), (tokens of b so far, b's start)
        ((30, 0), (45, 0)),  # two prefill chunks
        ((60, 30), (46, 45)),  # a prefill chunk next to a decode
        ((61, 60), (47, 46)),  # all decode
        ((62, 61), (48, 47)),  # all decode, b ends on a block boundary
    ]
    got_a, got_b = [], []
    for (end_a, start_a), (end_b, start_b) in steps:
        nblk_a, nblk_b = -(-end_a // BLOCK_SIZE), -(-end_b // BLOCK_SIZE)
        logits = run(
            ours,
            pool,
            [(a[:end_a], start_a, blocks_a[:nblk_a]), (b[:end_b], start_b, blocks_b[:nblk_b])],
        )
        got_a.append(logits[: end_a - start_a])
        got_b.append(logits[end_a - start_a :])
    for got, n in ((torch.cat(got_a), 62), (torch.cat(got_b), 48)):
        torch.testing.assert_close(got, ref[n], **TOL)
        assert got.argmax(-1).tolist() == ref[n].argmax(-1).tolist()


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "float16"])
def test_other_dtypes(case, dtype: str) -> None:
    model_dir, _, seqs, ref = case
    loaded = load_model(ModelConfig(str(model_dir), dtype=dtype), torch_kernels())
    assert next(loaded.model.parameters()).dtype == loaded.dtype == getattr(torch, dtype)
    logits = run(loaded, new_pool(loaded, 5), [(seqs[77], 0, [0, 1, 2, 3, 4])])
    if dtype == "float64":
        torch.testing.assert_close(logits, ref[77], **TOL)
        return
    # Half precision: finite and close to the float32 reference in aggregate.
    assert torch.isfinite(logits).all()
    rel = (logits - ref[77]).norm() / ref[77].norm()
    assert rel < {"bfloat16": 0.06, "float16": 0.015}[dtype], f"{dtype} logits off by {rel:.3f}"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_tiny_on_gpu_matches_transformers(case) -> None:
    model_dir, _, seqs, ref = case
    config = ModelConfig(str(model_dir), dtype="float32", device="cuda")
    loaded = load_model(config, torch_kernels())
    pool = new_pool(loaded, 8, "cuda")
    first = run(loaded, pool, [(seqs[77], 0, [5, 1, 2, 7, 0])])
    decode = run(loaded, pool, [(seqs[77][:1], 0, [3]), (seqs[77], 76, [5, 1, 2, 7, 0])])
    torch.testing.assert_close(first.cpu(), ref[77], **TOL)
    torch.testing.assert_close(decode[1].cpu(), ref[77][-1], **TOL)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["auto", "float32"])
@pytest.mark.parametrize("preset", ["dummy:llama-3.1-8b", "dummy:qwen3-0.6b"])
def test_dummy_preset_runs_on_gpu(preset: str, dtype: str) -> None:
    config = ModelConfig(preset, dtype=dtype, device="cuda", max_model_len=4096)  # type: ignore[arg-type]
    loaded = load_model(config, torch_kernels())
    assert loaded.dtype == (torch.bfloat16 if dtype == "auto" else torch.float32)
    assert loaded.max_model_len == 4096
    vocab = loaded.arch.vocab_size
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (301,), generator=gen).tolist()
    b = torch.randint(0, vocab, (200,), generator=gen).tolist()
    blocks_a, blocks_b = list(range(0, 19)), list(range(19, 32))
    pool = new_pool(loaded, 32, "cuda")
    prefill = run(loaded, pool, [(a[:300], 0, blocks_a), (b, 0, blocks_b)])
    decode = run(loaded, pool, [(a, 300, blocks_a), ([*b, 7], 200, blocks_b)])
    assert prefill.shape == (500, vocab) and decode.shape == (2, vocab)
    assert torch.isfinite(prefill).all() and torch.isfinite(decode).all()
    # Decoding token 300 of `a` in a batch equals computing it as part of a prefill.
    pool2 = new_pool(loaded, 32, "cuda")
    whole = run(loaded, pool2, [(a, 0, blocks_a)])
    rel = ((decode[0] - whole[-1]).norm() / whole[-1].norm()).item()
    assert rel < (0.05 if dtype == "auto" else 1e-4), rel
