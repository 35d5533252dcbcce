"""splitserve.engine: the node runtime (model, KV pool, scheduler, sampler).

`LLM` and `AsyncEngine` are imported lazily so that torch-free users of the package
(the router imports `engine.hashing`) never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from splitserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from splitserve.engine.async_engine import AsyncEngine
    from splitserve.engine.llm import LLM

__all__ = ["LLM", "AsyncEngine", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from splitserve.engine.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from splitserve.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'splitserve.engine' has no attribute {name!r}")
