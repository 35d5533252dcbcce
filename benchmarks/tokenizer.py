"""Tokenizers the benchmark uses to build token-exact prompts and to count output tokens.

Resolution order (`load_tokenizer`):
1. `--tokenizer PATH`: a local Hugging Face tokenizer directory. `tokenizer.json` is loaded
   with the `tokenizers` library (fast, no torch); otherwise transformers' AutoTokenizer,
   imported only then.
2. The target's `/tokenize` and `/detokenize` endpoints (vLLM, SGLang and splitserve have them).
3. A whitespace tokenizer over a fixed word list, with a warning: prompt lengths and
   client-side output token counts are then approximate.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Plain words used to synthesise prompts; any tokenizer splits them into ordinary tokens.
_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education river garden window paper light music green quiet simple travel market bridge "
    "winter summer letter signal engine cloud stone field glass forest dinner answer "
)
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


class BenchTokenizer(Protocol):
    name: str
    is_exact: bool  # False for the whitespace approximation

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A local Hugging Face tokenizer (no special tokens added)."""

    is_exact = True

    def __init__(self, path: str) -> None:
        self.name = path
        json_path = Path(path) / "tokenizer.json"
        self._fast: Any = None
        self._hf: Any = None
        if json_path.is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(json_path))
        else:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(path)

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=False).ids)
        return list(self._hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return str(self._fast.decode(ids, skip_special_tokens=False))
        return str(self._hf.decode(ids, skip_special_tokens=False))


def _post_json(url: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return dict(json.loads(resp.read()))


class ServerTokenizer:
    """The target's own tokenizer through POST /tokenize and /detokenize."""

    is_exact = True

    def __init__(self, base_url: str, model: str, timeout_s: float = 30.0) -> None:
        self.name = f"{base_url}/tokenize"
        self._base = base_url.rstrip("/")
        self._model = model
        self._timeout_s = timeout_s

    def encode(self, text: str) -> list[int]:
        body = {"model": self._model, "prompt": text, "add_special_tokens": False}
        out = _post_json(f"{self._base}/tokenize", body, self._timeout_s)
        return [int(t) for t in out["tokens"]]

    def decode(self, ids: list[int]) -> str:
        body = {"model": self._model, "tokens": ids}
        return str(_post_json(f"{self._base}/detokenize", body, self._timeout_s)["prompt"])


class WhitespaceTokenizer:
    """Approximate tokenizer: one token per whitespace-separated word."""

    name = "whitespace (approximate)"
    is_exact = False

    def __init__(self) -> None:
        self._index = {w: i for i, w in enumerate(WORDS)}

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            idx = self._index.get(word)
            ids.append(idx if idx is not None else zlib.crc32(word.encode()) % len(WORDS))
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(WORDS[i % len(WORDS)] for i in ids)


def _server_tokenizer(base_url: str, model: str) -> ServerTokenizer | None:
    tok = ServerTokenizer(base_url, model, timeout_s=10.0)
    try:
        ids = tok.encode("hello world")
        tok.decode(ids)
    except (urllib.error.URLError, OSError, KeyError, ValueError, TypeError) as exc:
        logger.info("server has no usable /tokenize + /detokenize (%s)", exc)
        return None
    return tok


def load_tokenizer(path: str | None, base_url: str | None, model: str | None) -> BenchTokenizer:
    """Pick the most exact tokenizer available (see the module docstring)."""
    if path:
        if not Path(path).exists():
            raise ValueError(
                f"--tokenizer {path} does not exist; pass a local Hugging Face tokenizer "
                "directory, or leave it out to use the server's /tokenize"
            )
        return HFTokenizer(path)
    if base_url and model:
        server = _server_tokenizer(base_url, model)
        if server is not None:
            logger.info("using the target's /tokenize for prompt lengths and token counts")
            return server
    logger.warning(
        "no tokenizer: prompt lengths and client-side token counts are approximate "
        "(one token per word); pass --tokenizer PATH for exact lengths"
    )
    return WhitespaceTokenizer()
