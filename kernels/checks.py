"""Argument checks and launch helpers shared by the kernel wrappers.

Every wrapper validates its tensors on the host (shape, dtype, device, unit stride of the
innermost dim) before launching, so a bad call raises a ValueError that says what to fix
instead of faulting on the device. Nothing here reads device memory.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

# Triton decides at decoration time whether @triton.jit functions run in the CPU
# interpreter; the kernels follow whatever the environment said when they were imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Interpreter launches are slow; CPU runs pretend to have this many multiprocessors.
_CPU_NUM_SMS = 4


def _patch_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a loaded scalar into a loop bound with
    int(<1-element array>), which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed
    after 3.6). Wrap its tensor patching so `__index__` takes the single element first.
    Only the CPU interpreter is touched; compiled kernels never run this code."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "splitserve_scalar_index", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.splitserve_scalar_index = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _patch_interpreter_scalar_index()


def check_tensor(
    name: str,
    t: torch.Tensor,
    ndim: int,
    dtypes: Sequence[torch.dtype],
    device: torch.device,
    inner_contiguous: bool = True,
) -> None:
    """Raise ValueError unless `t` has `ndim` dims, one of `dtypes`, lives on `device`
    and (when asked) has a unit stride in its last dim."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; cast it to one of: {allowed}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if inner_contiguous and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} needs a unit stride in its last dim (got strides {t.stride()}); "
            "pass a view whose last dim is contiguous, e.g. t.contiguous()"
        )


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_launchable(device: torch.device) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors in the interpreter."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and INTERPRET:
        return
    raise ValueError(
        f"Triton kernels need CUDA tensors (got {device}); on the CPU use the torch "
        "reference, or set TRITON_INTERPRET=1 before importing splitserve.kernels"
    )


@functools.lru_cache(maxsize=16)
def _cuda_num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def indexed_device(device: torch.device | str) -> torch.device:
    """The device as its tensors name it: a CUDA device without an index is the current one."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_NUM_SMS
    return _cuda_num_sms(indexed_device(device).index)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products (no tf32) so they match the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_tile(name: str, value: int) -> None:
    """Tile sizes feed tl.dot and tl.arange: powers of two, at least 16."""
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())
