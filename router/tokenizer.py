"""The router's tokenizer: prompts to token ids, chat templates, token strings for logprobs.

Loaded once at start (local files only, never the network) from whatever `--model` may name
(an HF directory, a .gguf file or built-in model, whose converted directory holds the
tokenizer and chat template from the GGUF metadata, or a cached ORG/NAME repo id: see
`engine/model/source.py`) by `engine/model/tokenizer_files.py`, which loads a plain
tokenizer.json without torch; or, for `dummy:<preset>` models, built in memory by the
engine's torch-free dummy tokenizer builder (engine/model/dummy_presets.py), so that router
and nodes agree on every id.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from splitserve.engine.model.dummy_presets import DUMMY_PREFIX, build_dummy_tokenizer, dummy_arch
from splitserve.engine.model.tokenizer_files import load_dir_tokenizer

logger = logging.getLogger(__name__)


def load_hf_tokenizer(name_or_path: str) -> Any:
    """A PreTrainedTokenizer(Fast) for a local directory or a `dummy:<preset>` model."""
    if name_or_path.startswith(DUMMY_PREFIX):
        return build_dummy_tokenizer(dummy_arch(name_or_path))
    from splitserve.engine.model.source import ModelSourceError, resolve_model_source

    try:
        model_dir = resolve_model_source(name_or_path)
    except ModelSourceError as exc:
        raise ValueError(
            f"no tokenizer for {name_or_path!r}: pass --tokenizer with the nodes' --model ({exc})"
        ) from exc
    return load_dir_tokenizer(model_dir)


class ChatTemplateError(ValueError):
    """The chat template could not render these messages (a client error)."""


class RouterTokenizer:
    """Thin, typed wrapper over a Hugging Face tokenizer."""

    def __init__(self, hf_tokenizer: Any, name: str) -> None:
        self.hf = hf_tokenizer
        self.name = name
        self.vocab_size = len(hf_tokenizer)
        self._token_str = lru_cache(maxsize=1 << 16)(self._decode_one)

    @classmethod
    def load(cls, name_or_path: str) -> RouterTokenizer:
        tokenizer = cls(load_hf_tokenizer(name_or_path), name_or_path)
        logger.info("tokenizer %s loaded (%d ids)", name_or_path, tokenizer.vocab_size)
        return tokenizer

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`. A fast tokenizer encodes through its Rust batch call, which
        releases the GIL while it works: a megabyte prompt takes seconds, and holding the
        GIL that long would stall the router's event loop (docs/reliability.md)."""
        if getattr(self.hf, "is_fast", False):
            backend = self.hf.backend_tokenizer
            return list(backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def token_str(self, token_id: int) -> str:
        """The text of one token as logprobs show it (special tokens included)."""
        return str(self._token_str(token_id))

    def _decode_one(self, token_id: int) -> str:
        return str(self.hf.decode([token_id], skip_special_tokens=False))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        continue_final_message: bool,
        template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text the model's chat template makes of `messages` (and `tools`, the
        OpenAI tool definitions, which templates read as the `tools` variable; a template
        that never reads it does not show them to the model)."""
        if not self.has_chat_template:
            raise ChatTemplateError(
                f"the tokenizer of {self.name} has no chat template: use /v1/completions "
                "with a pre-formatted prompt instead"
            )
        if add_generation_prompt and continue_final_message:
            raise ChatTemplateError(
                "add_generation_prompt and continue_final_message cannot both be true: set "
                "add_generation_prompt to false to continue the final assistant message"
            )
        from jinja2 import TemplateError

        kwargs = dict(template_kwargs or {})
        if tools:
            kwargs["tools"] = tools
        try:
            text = self.hf.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **kwargs,
            )
        except (TemplateError, ValueError, TypeError, KeyError) as exc:
            message = f"the chat template cannot render these messages: {exc}"
            raise ChatTemplateError(message) from exc
        if not isinstance(text, str):
            raise ChatTemplateError(f"the chat template returned {type(text).__name__}, not text")
        return text
