"""Long fresh prompts on cuDNN's path (kernels/cudnn_prefill.py): the bucket padding read
from the buffer's storage, where each prompt's output lands, the fallback when a padded
prompt would run past the buffer, and when the Triton backend takes the path.

On the CPU a plain-torch dense attention stands in for cuDNN's call (the `attend` the path
takes, the only part that differs), at a smaller bucket and threshold; on an sm90 GPU the
`gpu`-marked test runs cuDNN itself at model shapes against the torch backend.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels import cudnn_prefill
from splitserve.kernels.attention_torch import TorchPagedAttention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEADS, KV_HEADS, HEAD_DIM = 4, 1, 32
SCALE = HEAD_DIM**-0.5


@pytest.fixture(scope="module", autouse=True)
def _kernels(triton_interpreter) -> None:
    """Kernel modules, imported once the interpreter is chosen (see conftest)."""
    global TritonPagedAttention, make_paged_batch, backend_module
    import splitserve.kernels.backend as backend_module
    from splitserve.kernels.backend import TritonPagedAttention
    from splitserve.kernels.testing import make_paged_batch


@pytest.fixture
def small_buckets(monkeypatch) -> None:
    """Buckets of 16 rows and a 32-row threshold, so that CPU shapes stay small."""
    monkeypatch.setattr(cudnn_prefill, "BUCKET_ROWS", 16)
    monkeypatch.setattr(cudnn_prefill, "MIN_ROWS", 32)


class DenseAttend:
    """Plain-torch causal attention standing in for cuDNN's; records each call's rows."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, q, k, v, scale: float) -> torch.Tensor:
        self.rows.append(q.shape[2])
        assert all(x.shape[2] == q.shape[2] for x in (k, v))
        out = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=True, scale=scale, enable_gqa=True
        )
        return out.to(q.dtype)


def _with_slack(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x as the first rows of a buffer with `rows` more rows of finite values."""
    extra = torch.randn(rows, *x.shape[1:], dtype=x.dtype, device=x.device)
    return torch.cat([x, extra])[: x.shape[0]]


def _fresh_batch(lens: list[int], decodes: int = 0, seed: int = 0):
    cases = [(20, 1)] * decodes + [(0, n) for n in lens]
    batch = make_paged_batch(cases, HEADS, KV_HEADS, HEAD_DIM, 16, torch.float32, DEVICE, seed)
    return batch, dataclasses.replace(batch.meta, num_decodes=decodes)


def test_padded_rows_read_the_storage_past_the_view() -> None:
    buffer = torch.arange(10 * 2 * 3, dtype=torch.float32).view(10, 2, 3)
    view = buffer[:6]
    padded = cudnn_prefill.padded_rows(view, 4, 4)
    assert padded is not None and torch.equal(padded, buffer[4:8])
    assert cudnn_prefill.padded_rows(view, 6, 4) is not None
    assert cudnn_prefill.padded_rows(view, 7, 4) is None  # rows 7..10 end past the storage
    # A column slice (k of a fused q/k/v row) ends before its row does.
    fused = torch.zeros(8, 12)
    k = fused[:, 4:8].view(8, 2, 2)[:5]
    assert cudnn_prefill.padded_rows(k, 4, 4) is not None
    assert cudnn_prefill.padded_rows(k, 5, 4) is None


def test_bucket_arithmetic() -> None:
    assert cudnn_prefill.bucket_rows(1024) == 1024
    assert cudnn_prefill.bucket_rows(1025) == 1024 + cudnn_prefill.BUCKET_ROWS
    buckets = cudnn_prefill.buckets_up_to(2000)
    assert buckets[0] == cudnn_prefill.MIN_ROWS and buckets[-1] == 2048
    assert all(b % cudnn_prefill.BUCKET_ROWS == 0 for b in buckets)


@pytest.mark.usefixtures("small_buckets")
def test_padded_prompts_match_the_torch_backend() -> None:
    lens = [40, 33, 16]
    batch, meta = _fresh_batch(lens)
    ref = TorchPagedAttention().forward(batch.q, batch.k, batch.v, batch.kv_cache, meta, SCALE)
    q, k, v = (_with_slack(x, 16) for x in (batch.q, batch.k, batch.v))
    out = torch.full((sum(lens) + 5, HEADS, HEAD_DIM), float("nan"))
    attend = DenseAttend()
    assert cudnn_prefill.cudnn_fresh_prefill(q, k, v, lens, SCALE, out, attend)
    assert attend.rows == [48, 48, 16]
    torch.testing.assert_close(out[: sum(lens)], ref[: sum(lens)], atol=1e-5, rtol=1e-5)
    assert bool((out[sum(lens) :] == 0).all())


@pytest.mark.usefixtures("small_buckets")
def test_a_prompt_padded_past_its_buffer_writes_nothing() -> None:
    lens = [40, 33]
    batch, _ = _fresh_batch(lens)
    out = torch.full((sum(lens), HEADS, HEAD_DIM), float("nan"))
    attend = DenseAttend()
    assert not cudnn_prefill.cudnn_fresh_prefill(
        batch.q, batch.k, batch.v, lens, SCALE, out, attend
    )
    assert attend.rows == [] and bool(out.isnan().all())


@pytest.mark.usefixtures("small_buckets")
def test_the_backend_takes_the_path_once_prepared_for_one_long_fresh_prompt(monkeypatch) -> None:
    """Before `prepare`, for two prompts and for a prompt under MIN_ROWS, fresh steps take
    the flash path; a cached chunk takes the Triton kernel; once prepared, one long fresh
    prompt behind decode rows takes cuDNN's path, matches the torch backend, and is padded
    once for all the layers of its step. float32 stands in for the 16-bit dtypes both
    paths take on a GPU."""
    monkeypatch.setattr(backend_module, "FLASH_DTYPES", (torch.float32,))
    flash_calls: list[int] = []

    def flash(q, k, v, query_start_loc, query_lens, scale, out) -> None:
        flash_calls.append(len(query_lens))
        out.zero_()

    monkeypatch.setattr(backend_module, "fresh_prefill_attention", flash)
    padded = cudnn_prefill.padded_prompts
    paddings: list[int] = []
    monkeypatch.setattr(
        cudnn_prefill, "padded_prompts", lambda *a: paddings.append(1) or padded(*a)
    )
    attend = DenseAttend()
    attention = TritonPagedAttention(
        flash_fresh_prefill=True, cudnn_fresh_prefill=True, dense_attend=attend
    )
    batch, meta = _fresh_batch([40], decodes=2, seed=1)
    q, k, v = (_with_slack(x, 16) for x in (batch.q, batch.k, batch.v))
    attention.forward(q, k, v, batch.kv_cache, meta, SCALE)
    assert flash_calls == [1] and attend.rows == []

    buffer = torch.zeros(80, HEADS + 2 * KV_HEADS, HEAD_DIM, dtype=torch.float32)
    attention.prepare(*buffer.split([HEADS, KV_HEADS, KV_HEADS], dim=1), SCALE, max_rows=64)
    assert attend.rows == [32, 48, 64]

    attend.rows.clear()
    ref = TorchPagedAttention().forward(q, k, v, batch.pool.clone()[:, 1], meta, SCALE)
    step = dataclasses.replace(meta)
    for _layer in range(3):  # one pool layer stands for every layer of the step
        out = attention.forward(q, k, v, batch.kv_cache, step, SCALE)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert attend.rows == [48, 48, 48] and paddings == [1] and flash_calls == [1]

    for lens in ([40, 33], [20]):
        other, other_meta = _fresh_batch(lens, seed=2)
        attention.forward(other.q, other.k, other.v, other.kv_cache, other_meta, SCALE)
    assert flash_calls == [1, 2, 1] and attend.rows == [48, 48, 48]

    cached = make_paged_batch([(16, 40)], HEADS, KV_HEADS, HEAD_DIM, 16, torch.float32, DEVICE)
    attention.forward(cached.q, cached.k, cached.v, cached.kv_cache, cached.meta, SCALE)
    assert flash_calls == [1, 2, 1] and attend.rows == [48, 48, 48]


class FlashStandIn:
    """Plain-torch causal attention of each fresh sequence over its own rows, standing in
    for FlashAttention-2's ragged call; records each call's lengths and starts."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, q, k, v, query_start_loc, query_lens, scale, out) -> None:
        self.calls.append((list(query_lens), query_start_loc.tolist()))
        start = 0
        for rows in query_lens:
            heads = (x[start : start + rows].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            result = DenseAttend()(*heads, scale)
            out[start : start + rows].copy_(result[0].transpose(0, 1))
            start += rows
        out[start:].zero_()


def _runs_backend(monkeypatch) -> tuple[object, DenseAttend, FlashStandIn]:
    """A prepared backend whose cuDNN and flash calls are plain torch, float32 standing in
    for the 16-bit dtypes."""
    monkeypatch.setattr(backend_module, "FLASH_DTYPES", (torch.float32,))
    flash = FlashStandIn()
    monkeypatch.setattr(backend_module, "fresh_prefill_attention", flash)
    attend = DenseAttend()
    attention = TritonPagedAttention(
        flash_fresh_prefill=True, cudnn_fresh_prefill=True, dense_attend=attend
    )
    buffer = torch.zeros(96, HEADS + 2 * KV_HEADS, HEAD_DIM, dtype=torch.float32)
    attention.prepare(*buffer.split([HEADS, KV_HEADS, KV_HEADS], dim=1), SCALE, max_rows=96)
    attend.rows.clear()
    return attention, attend, flash


@pytest.mark.usefixtures("small_buckets")
@pytest.mark.parametrize(
    ("cases", "cudnn_rows", "flash_lens", "triton_rows"),
    [
        # The rest of a running prompt, then two fresh prompts long enough for cuDNN.
        ([(16, 24), (0, 40), (0, 48)], [48, 48], [], 24),
        # A fresh prompt too short for cuDNN in the fresh run: FlashAttention-2 takes both.
        ([(16, 24), (0, 40), (0, 20)], [], [40, 20], 24),
        # One fresh prompt before a cached chunk: its padding reads the chunk's rows.
        ([(0, 40), (16, 24)], [48], [], 24),
        # Nothing fresh: the Triton kernel alone.
        ([(16, 24), (8, 40)], [], [], 64),
    ],
)
def test_each_run_of_a_mixed_step_takes_its_path_and_matches_the_torch_backend(
    monkeypatch, cases, cudnn_rows, flash_lens, triton_rows
) -> None:
    """Decode rows, then prefill runs: cuDNN, flash and the Triton kernel each attend their
    own rows, and together they give the torch backend's output, on every layer."""
    attention, attend, flash = _runs_backend(monkeypatch)
    triton_calls: list[int] = []
    triton_kernel = backend_module.prefill_attention

    def triton(q, *args, **kwargs):
        triton_calls.append(q.shape[0])
        return triton_kernel(q, *args, **kwargs)

    monkeypatch.setattr(backend_module, "prefill_attention", triton)
    batch = make_paged_batch(
        [(20, 1), (30, 1), *cases], HEADS, KV_HEADS, HEAD_DIM, 16, torch.float32, DEVICE, seed=4
    )
    meta = dataclasses.replace(batch.meta, num_decodes=2)
    q, k, v = (_with_slack(x, 16) for x in (batch.q, batch.k, batch.v))
    ref = TorchPagedAttention().forward(q, k, v, batch.pool.clone()[:, 1], meta, SCALE)
    for _layer in range(2):
        out = attention.forward(q, k, v, batch.kv_cache, meta, SCALE)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert attend.rows == cudnn_rows * 2
    assert [lens for lens, _ in flash.calls] == ([flash_lens] * 2 if flash_lens else [])
    for _, starts in flash.calls:  # the run's own starts, from 0
        assert starts[0] == 0 and starts[-1] == sum(flash_lens)
    assert triton_calls == [triton_rows] * 2 if triton_rows else not triton_calls
    # One step: each of its runs counted once, whatever its layers.
    planned = attention.prefill_runs()
    assert planned["cudnn"] == (1 if cudnn_rows else 0)
    assert planned["flash"] == (1 if flash_lens else 0)
    assert planned["context"] == (1 if triton_rows else 0)


def _at_model_shapes(cases: list[tuple[int, int]], decodes: int, seed: int):
    """bf16, Llama-8B heads, from a fused q/k/v buffer with slack rows, on a prepared
    backend whose cuDNN calls are recorded: (the rows of each cuDNN call, its output, the
    torch backend's output)."""
    heads, kv_heads, dim = 32, 8, 128
    batch = make_paged_batch(cases, heads, kv_heads, dim, 16, torch.bfloat16, DEVICE, seed=seed)
    meta = dataclasses.replace(batch.meta, num_decodes=decodes)
    rows = batch.q.shape[0]
    fused = torch.zeros(rows + 128, heads + 2 * kv_heads, dim, dtype=torch.bfloat16, device=DEVICE)
    q, k, v = fused.split([heads, kv_heads, kv_heads], dim=1)
    for view, src in zip((q, k, v), (batch.q, batch.k, batch.v), strict=True):
        view[:rows].copy_(src)
    calls: list[int] = []

    def attend(q, k, v, scale: float) -> torch.Tensor:
        calls.append(q.shape[2])
        return cudnn_prefill.cudnn_attend(q, k, v, scale)

    attention = TritonPagedAttention(
        flash_fresh_prefill=True, cudnn_fresh_prefill=True, dense_attend=attend
    )
    attention.prepare(q, k, v, dim**-0.5, max_rows=rows)
    calls.clear()
    ref = TorchPagedAttention().forward(
        q[:rows], k[:rows], v[:rows], batch.pool.clone()[:, 1], meta, dim**-0.5
    )
    out = attention.forward(q[:rows], k[:rows], v[:rows], batch.kv_cache, meta, dim**-0.5)
    return calls, out, ref


@pytest.mark.gpu
@pytest.mark.skipif(
    not cudnn_prefill.cudnn_prefill_supported(DEVICE.type), reason="needs cuDNN on an sm90+ GPU"
)
def test_cudnn_matches_the_torch_backend_at_model_shapes() -> None:
    """cuDNN itself: one fresh prompt, padded to its bucket, behind decode rows."""
    calls, out, ref = _at_model_shapes([(700, 1)] * 3 + [(0, 1100)], decodes=3, seed=3)
    assert calls == [1152] and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(
    not cudnn_prefill.cudnn_prefill_supported(DEVICE.type), reason="needs cuDNN on an sm90+ GPU"
)
@pytest.mark.parametrize(
    ("fresh", "cudnn_rows"),
    [([2100, 2200], [2176, 2304]), ([900, 800], [1024, 896]), ([900, 700], [])],
)
def test_the_runs_of_a_mixed_step_match_the_torch_backend_at_model_shapes(
    fresh, cudnn_rows
) -> None:
    """Decode rows, the rest of a prompt over its cached context (the Triton kernel), then
    two fresh prompts on cuDNN, or on FlashAttention-2 where one is too short for cuDNN."""
    cases = [(700, 1)] * 3 + [(1000, 300)] + [(0, n) for n in fresh]
    calls, out, ref = _at_model_shapes(cases, decodes=3, seed=5)
    assert calls == cudnn_rows and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
