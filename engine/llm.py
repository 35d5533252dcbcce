"""The offline API: `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from splitserve.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    scheduler_config,
)
from splitserve.engine.core import EngineCore
from splitserve.engine.device_memory import total_memory_gib
from splitserve.engine.output_collector import OutputCollector
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate offline from an HF model directory or a `dummy:<preset>`.

    Keyword arguments are the fields of ModelConfig, CacheConfig and SchedulerConfig;
    the scheduler's limits not given are the device's (`scheduler_config`).
    """

    def __init__(self, model: str, **kwargs: object) -> None:
        groups: dict[type, dict[str, object]] = {
            ModelConfig: {},
            CacheConfig: {},
            SchedulerConfig: {},
        }
        for key, value in kwargs.items():
            owner = next(
                (c for c in groups if key in {f.name for f in dataclasses.fields(c)}), None
            )
            if owner is None:
                raise ValueError(f"LLM() got an unknown argument {key!r}")
            groups[owner][key] = value
        model_config = ModelConfig(model=model, **groups[ModelConfig])  # type: ignore[arg-type]
        config = EngineConfig(
            model=model_config,
            cache=CacheConfig(**groups[CacheConfig]),  # type: ignore[arg-type]
            scheduler=scheduler_config(
                total_memory_gib(model_config.device), **groups[SchedulerConfig]
            ),
        )
        self._setup(config)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm._setup(config)
        return llm

    def _setup(self, config: EngineConfig) -> None:
        self.config = config
        self.engine = EngineCore(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. Strings are tokenized (with special tokens);
        token-id lists are used as they are."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompt_list: list[Prompt] = [prompts]  # type: ignore[list-item]
        else:
            prompt_list = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompt_list)} prompts; "
                    "pass one, or one per prompt"
                )
        collectors = [self._add(p, sp) for p, sp in zip(prompt_list, params_list, strict=True)]
        pending = {c.request_id: c for c in collectors if not c.finished}
        while pending:
            for out in self.engine.step():
                collector = pending.get(out.request_id)
                if collector is not None:
                    collector.add(out)
                    if collector.finished:
                        del pending[out.request_id]
        return [c.result() for c in collectors]

    def _add(self, prompt: Prompt, params: SamplingParams) -> OutputCollector:
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = list(self.engine.tokenizer(prompt)["input_ids"])
        else:
            text, token_ids = None, list(prompt)
        request_id = f"offline-{next(self._ids)}"
        self.engine.add_request(request_id, token_ids, params)
        return OutputCollector(request_id, text, token_ids, params.n)
