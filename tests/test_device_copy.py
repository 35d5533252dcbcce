"""Host arrays to the device in one copy (kernels/device_copy.py): the packing round trip
and its alignment on the CPU; on a GPU, one pinned transfer gives the same tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve.kernels.device_copy import (
    PACK_ALIGN,
    arrays_to_device,
    pack_arrays,
    unpack_arrays,
)


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(-(2**40), 2**40, size=7, dtype=np.int64),  # 56 bytes: next is padded
        rng.integers(-5, 5, size=3, dtype=np.int32),
        np.empty(0, dtype=np.int64),
        rng.integers(-1, 1000, size=(5, 9), dtype=np.int32),
        rng.random(4, dtype=np.float32),
    ]


def test_packed_arrays_come_back_equal_and_aligned() -> None:
    arrays = _arrays()
    host, offsets = pack_arrays(arrays)
    assert host.dtype == torch.uint8 and all(o % PACK_ALIGN == 0 for o in offsets)
    views = unpack_arrays(host, arrays, offsets)
    for array, view in zip(arrays, views, strict=True):
        assert view.shape == array.shape and view.data_ptr() % PACK_ALIGN == 0
        np.testing.assert_array_equal(view.numpy(), array)
    # Views of one buffer: an in-place write lands in the buffer, not in a neighbour.
    views[1].fill_(42)
    np.testing.assert_array_equal(views[0].numpy(), arrays[0])
    np.testing.assert_array_equal(views[3].numpy(), arrays[3])


def test_packing_refuses_what_it_cannot_view_back() -> None:
    with pytest.raises(ValueError, match="C-contiguous"):
        pack_arrays([np.zeros((4, 4), dtype=np.int64)[:, 1]])
    with pytest.raises(ValueError, match="int16"):
        pack_arrays([np.zeros(3, dtype=np.int16)])


def test_off_cuda_the_arrays_are_the_tensors() -> None:
    arrays = _arrays()
    tensors = arrays_to_device(arrays, torch.device("cpu"))
    for array, tensor in zip(arrays, tensors, strict=True):
        assert array.size == 0 or np.shares_memory(tensor.numpy(), array)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_transfer_gives_the_arrays_on_the_gpu() -> None:
    arrays = _arrays()
    tensors = arrays_to_device(arrays, torch.device("cuda"))
    torch.cuda.synchronize()
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    for array, tensor in zip(arrays, tensors, strict=True):
        assert tensor.is_cuda and tensor.data_ptr() % PACK_ALIGN == 0
        np.testing.assert_array_equal(tensor.cpu().numpy(), array)
