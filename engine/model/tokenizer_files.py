"""A model directory's tokenizer, loaded without importing torch where that is possible.

transformers' AutoTokenizer reads the model's config to pick a tokenizer class, and that
import pulls in torch and a large part of transformers (about 2 CPU-seconds at every
process start). A directory whose tokenizer is a plain `tokenizer.json` (its
tokenizer_config.json names the class `PreTrainedTokenizerFast` or `TokenizersBackend`,
as every built-in, dummy and converted GGUF model does) needs none of that: it loads
through `PreTrainedTokenizerFast` directly, to the same ids, text and chat prompts. Any
other class (a model-specific tokenizer) still goes through AutoTokenizer.

Who calls it: `engine/model/loader.py` (every engine) and `router/tokenizer.py` (the
router, which thereby never imports torch). Local files only, never the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# tokenizer_config.json classes that are their tokenizer.json and nothing more.
PLAIN_FAST_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})


def is_plain_fast_tokenizer(model_dir: Path) -> bool:
    """The directory's tokenizer is a tokenizer.json with no model-specific class."""
    config = model_dir / "tokenizer_config.json"
    if not (model_dir / "tokenizer.json").is_file() or not config.is_file():
        return False
    return json.loads(config.read_text()).get("tokenizer_class") in PLAIN_FAST_CLASSES


def load_dir_tokenizer(model_dir: Path) -> Any:
    """The tokenizer of a local model directory (see the module docstring)."""
    if is_plain_fast_tokenizer(model_dir):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
