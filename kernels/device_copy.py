"""Small host lists to device tensors without stalling the host.

`torch.tensor(values, device="cuda")` copies from pageable memory, which makes the host
wait until the stream has finished everything queued before it (a whole forward pass,
when the sampler builds its per-row tensors right after launching one). `to_device`
stages the values in pinned memory and copies them asynchronously, so the host goes on
queueing work; the caching host allocator keeps the staging buffer alive until the copy
has run. On the CPU it is a plain tensor.

`arrays_to_device` sends several numpy arrays in one copy: packed into one pinned byte
buffer (each at a 16-byte aligned offset, which keeps Triton's pointer specialisation the
same as for tensors of their own), copied once, and viewed back as one tensor each. A
prefill or mixed step's index tensors (`engine/model_runner.py`) take one staging buffer
and one transfer instead of one each, as do a short rest's per-row inputs
(`kernels/backend.py`). Host-side, no kernel: it sits here so that both the engine and the
attention backend can call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Offset alignment of each array in a packed transfer, bytes.
PACK_ALIGN = 16


def to_device(values: Sequence[object], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return host_to_device(torch.tensor(values, dtype=dtype), device)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, through pinned memory (the tensor itself on the CPU)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def arrays_to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Each array (C-contiguous) as a tensor of its dtype and shape on `device`: on CUDA all
    sent in one asynchronous copy from one pinned buffer, elsewhere the arrays themselves."""
    if device.type != "cuda":
        return [torch.from_numpy(array) for array in arrays]
    host, offsets = pack_arrays(arrays, pin=True)
    return unpack_arrays(host.to(device, non_blocking=True), arrays, offsets)


def pack_arrays(arrays: Sequence[np.ndarray], pin: bool = False) -> tuple[torch.Tensor, list[int]]:
    """The arrays' bytes in one uint8 tensor (pinned when `pin`), each at a PACK_ALIGN
    aligned offset; with the offsets."""
    offsets = []
    total = 0
    for array in arrays:
        if not array.flags.c_contiguous:
            raise ValueError("pack_arrays takes C-contiguous arrays (np.ascontiguousarray)")
        if array.dtype not in _TORCH_DTYPES:
            raise ValueError(
                f"pack_arrays takes {sorted(map(str, _TORCH_DTYPES))}, got {array.dtype}"
            )
        total = -(-total // PACK_ALIGN) * PACK_ALIGN
        offsets.append(total)
        total += array.nbytes
    host = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
    staged = host.numpy()
    for array, offset in zip(arrays, offsets, strict=True):
        staged[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
    return host, offsets


def unpack_arrays(
    packed: torch.Tensor, arrays: Sequence[np.ndarray], offsets: Sequence[int]
) -> list[torch.Tensor]:
    """Views of `packed` (what `pack_arrays` made, on any device) as the arrays' dtypes and
    shapes."""
    return [
        packed[offset : offset + array.nbytes].view(_TORCH_DTYPES[array.dtype]).view(array.shape)
        for array, offset in zip(arrays, offsets, strict=True)
    ]


_TORCH_DTYPES = {
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.float32): torch.float32,
}
