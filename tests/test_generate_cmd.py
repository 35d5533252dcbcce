"""`splitserve generate --chat`: the chat template's ids, whatever apply_chat_template
returns (a BatchEncoding in transformers 5 made it crash)."""

from __future__ import annotations

from pathlib import Path

from splitserve.launch.cli import main
from splitserve.launch.generate_cmd import chat_prompt_ids
from splitserve.router.tokenizer import RouterTokenizer


def test_chat_prompt_ids_match_the_router(tiny_llama: Path) -> None:
    router = RouterTokenizer.load(str(tiny_llama))
    text = router.render_chat([{"role": "user", "content": "hi"}], True, False, None)
    ids = chat_prompt_ids(router.hf, "hi")
    assert ids == router.encode(text, add_special_tokens=False)
    assert all(isinstance(t, int) for t in ids) and len(ids) > 3


def test_generate_chat_runs(tiny_llama: Path, capsys) -> None:
    argv = ["generate", "--model", str(tiny_llama), "--dtype", "float32", "--chat"]
    code = main([*argv, "--prompt", "hi", "--max-tokens", "3", "--temperature", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "output: " in out and "1 prompts, 3 tokens" in out
