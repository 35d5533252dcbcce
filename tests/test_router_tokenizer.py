"""The tokenizer loader of the router and the engine (engine/model/tokenizer_files.py): a
plain tokenizer.json loads without transformers' AutoTokenizer (whose import pulls in
torch) and gives AutoTokenizer's ids, text and chat prompts; a model-specific tokenizer
class still goes through AutoTokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.engine.model.loader import load_tokenizer
from splitserve.engine.model.tokenizer_files import is_plain_fast_tokenizer
from splitserve.router.tokenizer import RouterTokenizer

TEXTS = ("Hello world!", "  two  spaces\nand a newline", "ünïcödé – dashes", "")
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_plain_tokenizer_json_matches_autotokenizer(tiny_model_factory, arch: str) -> None:
    from transformers import AutoTokenizer

    path = tiny_model_factory(arch)
    assert is_plain_fast_tokenizer(path)
    ours = RouterTokenizer.load(str(path))
    auto = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert ours.vocab_size == len(auto)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == auto.encode(text, add_special_tokens=special)
            assert ours.decode(ids) == auto.decode(ids, skip_special_tokens=True)
    engine_side = load_tokenizer(path)  # what the engine detokenizes with
    assert engine_side.encode(TEXTS[2]) == auto.encode(TEXTS[2])
    for generation_prompt in (True, False):
        rendered = ours.render_chat(CHAT, generation_prompt, False, None)
        assert rendered == auto.apply_chat_template(
            CHAT, tokenize=False, add_generation_prompt=generation_prompt
        )


def test_router_loads_its_tokenizer_without_torch(tiny_llama: Path) -> None:
    code = (
        "import sys\n"
        "import splitserve.launch.router_cmd, splitserve.router.app\n"
        "from splitserve.router.tokenizer import RouterTokenizer\n"
        f"RouterTokenizer.load({str(tiny_llama)!r})\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "False", done.stderr


def test_model_specific_tokenizer_class_goes_through_autotokenizer(
    tiny_llama: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_llama, copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "LlamaTokenizer"
    config_path.write_text(json.dumps(config))
    assert not is_plain_fast_tokenizer(copy)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config))
    assert is_plain_fast_tokenizer(copy)
    (copy / "tokenizer.json").unlink()  # slow tokenizers' files only: AutoTokenizer's job
    assert not is_plain_fast_tokenizer(copy)
