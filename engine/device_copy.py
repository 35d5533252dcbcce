"""Small host lists to device tensors without stalling the host.

`torch.tensor(values, device="cuda")` copies from pageable memory, which makes the host
wait until the stream has finished everything queued before it (a whole forward pass,
when the sampler builds its per-row tensors right after launching one). `to_device`
stages the values in pinned memory and copies them asynchronously, so the host goes on
queueing work; the caching host allocator keeps the staging buffer alive until the copy
has run. On the CPU it is a plain tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence[object], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return host_to_device(torch.tensor(values, dtype=dtype), device)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, through pinned memory (the tensor itself on the CPU)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
