"""Tiny HF models (reproducible, offline, tokenizer and chat template), the loader's
error paths and sharded checkpoints, config parsing, and the dummy presets."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.engine.config import ModelConfig
from splitserve.engine.model.arch import ModelArchConfig
from splitserve.engine.model.dummy_presets import DUMMY_PRESETS, build_dummy_tokenizer, dummy_arch
from splitserve.engine.model.llama import CausalLM
from splitserve.engine.model.loader import load_model
from splitserve.engine.model.tiny import make_tiny_model
from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.registry import torch_kernels
from splitserve.launch.cli import main as cli_main
from splitserve.launch.engine_args import add_engine_arguments, engine_config_from_args

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def _load(path: str | Path, **kwargs):
    return load_model(ModelConfig(str(path), **kwargs), torch_kernels())


@torch.inference_mode()
def _prompt_logits(loaded, tokens: list[int], block_size: int = 16) -> torch.Tensor:
    arch, n = loaded.arch, len(tokens)
    num_blocks = -(-n // block_size)
    pool = torch.zeros(
        num_blocks,
        arch.num_layers,
        2,
        block_size,
        arch.num_kv_heads,
        arch.head_dim,
        dtype=loaded.dtype,
    )
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        max_query_len=n,
        max_seq_len=n,
        query_lens_cpu=[n],
        seq_lens_cpu=[n],
    )
    hidden = loaded.model(torch.tensor(tokens), torch.arange(n), pool, meta)
    return loaded.model.compute_logits(hidden)


# Tiny models.


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", "llama", seed=5)
    b = make_tiny_model(tmp_path / "b", "llama", seed=5)
    c = make_tiny_model(tmp_path / "c", "llama", seed=6)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_config_tokenizer_and_chat_template(tiny_model_factory, arch: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    model_dir = tiny_model_factory(arch)
    config = json.loads((model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert config["vocab_size"] == len(tok) == 1024
    assert AutoConfig.from_pretrained(model_dir).model_type == arch
    messages = [{"role": "user", "content": "Is it going to rain on the river today?"}]
    ids = cast(
        list[int],
        tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False),
    )
    assert all(0 <= i < config["vocab_size"] for i in ids)
    assert ids[0] == tok.bos_token_id == config["bos_token_id"]
    assert tok.eos_token_id in ids and tok.convert_tokens_to_ids("<|assistant|>") == ids[-2]
    text = tok.decode(ids, skip_special_tokens=True)
    assert "Is it going to rain on the river today?" in text
    # Prose from the corpus's domain compresses well below one token per byte.
    prose = "The weather in the valley changes quickly in the afternoon."
    assert len(tok(prose).input_ids) < len(prose) / 2.5
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_margin_is_wide(tiny_model_factory, arch: str) -> None:
    """Top-1/top-2 logit gaps stay far above float32 reduction noise (~1e-5)."""
    loaded = _load(tiny_model_factory(arch), dtype="float32")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, loaded.arch.vocab_size, (400,), generator=gen).tolist()
    top2 = _prompt_logits(loaded, tokens).topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert gaps.median() > 0.3 and gaps.min() > 2e-5, (gaps.median(), gaps.min())


def test_loads_offline(tiny_model_factory) -> None:
    """A fresh process with the hub unreachable loads model and tokenizer from disk."""
    model_dir = tiny_model_factory("qwen3")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1]);"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
        "print(len(tok), m.config.vocab_size)"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(model_dir.parent / "hf-home"),
    }
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1024", "1024"]


def test_cli_writes_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-model"
    assert cli_main(["make-tiny-model", str(out), "--arch", "qwen2", "--seed", "2"]) == 0
    assert str(out) in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }


# Loader.


def test_loader_facts(tiny_model_factory) -> None:
    llama = _load(tiny_model_factory("llama"))
    assert llama.dtype == torch.float32 and llama.max_model_len == 2048
    assert llama.eos_token_ids == frozenset({llama.tokenizer.eos_token_id})
    assert not llama.model.is_tied and llama.arch.rope_scaling is not None
    qwen3 = _load(tiny_model_factory("qwen3"), max_model_len=100)
    assert qwen3.model.is_tied and qwen3.arch.qk_norm and qwen3.max_model_len == 100
    assert qwen3.arch.rope_theta == 1e6 and qwen3.arch.torch_dtype == "float32"
    # Mistral's 1024-token window caps the context.
    mistral_dir = tiny_model_factory("mistral")
    assert _load(mistral_dir).max_model_len == 1024
    with pytest.raises(ValueError, match="sliding_window=1024"):
        _load(mistral_dir, max_model_len=2048)


def test_missing_model_errors(tmp_path: Path, tiny_model_factory) -> None:
    with pytest.raises(ValueError, match="make-tiny-model"):
        _load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not found"):  # a hub id not in the local cache
        _load("no-such-org/no-such-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"config\.json not found"):
        _load(empty)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_factory("llama") / "config.json", no_weights)
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        _load(no_weights)


def test_dummy_load_format_reads_no_weight_file(tmp_path: Path, tiny_model_factory) -> None:
    """`--load-format dummy`: the directory's config and tokenizer, random weights."""
    source = tiny_model_factory("llama")
    shape_only = tmp_path / "shape-only"
    shutil.copytree(source, shape_only, ignore=shutil.ignore_patterns("*.safetensors"))
    checkpoint = _load(source)
    dummy = _load(shape_only, load_format="dummy", seed=3)
    assert dummy.arch == checkpoint.arch and dummy.eos_token_ids == checkpoint.eos_token_ids
    assert dummy.tokenizer.get_vocab() == checkpoint.tokenizer.get_vocab()
    ours, theirs = dict(dummy.model.named_parameters()), dict(checkpoint.model.named_parameters())
    assert ours.keys() == theirs.keys()
    assert not torch.equal(ours["lm_head.weight"], theirs["lm_head.weight"])
    again = _load(shape_only, load_format="dummy", seed=3)
    assert torch.equal(again.model.lm_head.weight, dummy.model.lm_head.weight)
    with pytest.raises(ValueError, match="load_format must be one of"):
        ModelConfig(str(source), load_format="npz")  # type: ignore[arg-type]


def test_unsupported_architecture(tmp_path: Path, tiny_model_factory) -> None:
    model_dir = tmp_path / "gpt2"
    shutil.copytree(tiny_model_factory("llama"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model architecture.*LlamaForCausalLM"):
        _load(model_dir)


def test_sharded_checkpoint_loads_like_single_file(tmp_path: Path, tiny_model_factory) -> None:
    source = tiny_model_factory("qwen2")
    sharded = tmp_path / "sharded"
    shutil.copytree(source, sharded)
    weights = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, str(sharded / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    tokens = list(range(3, 60))
    single = _prompt_logits(_load(source), tokens)
    torch.testing.assert_close(_prompt_logits(_load(sharded), tokens), single, rtol=0, atol=0)
    # A shard gone missing is named.
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002"):
        _load(sharded)


# Config parsing.


def _hf_llama_config(**extra) -> dict:
    base = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return {**base, **extra}


def test_transformers5_style_config() -> None:
    arch = ModelArchConfig.from_hf_config(
        _hf_llama_config(
            dtype="bfloat16",
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        )
    )
    assert arch.rope_theta == 500000.0 and arch.torch_dtype == "bfloat16"
    assert (
        arch.rope_scaling is not None and arch.rope_scaling.original_max_position_embeddings == 1024
    )
    assert arch.head_dim == 16 and arch.max_context_len == 4096
    linear = ModelArchConfig.from_hf_config(
        _hf_llama_config(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})
    )
    assert linear.rope_scaling is not None and linear.rope_scaling.rope_type == "linear"


def test_config_rejections() -> None:
    with pytest.raises(ValueError, match="llama3, linear"):
        ModelArchConfig.from_hf_config(
            _hf_llama_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})
        )
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        ModelArchConfig.from_hf_config(_hf_llama_config(architectures=["MixtralForCausalLM"]))
    qwen2 = ModelArchConfig.from_hf_config(
        _hf_llama_config(architectures=["Qwen2ForCausalLM"], sliding_window=128)
    )
    assert qwen2.sliding_window is None and qwen2.attention_bias and not qwen2.o_proj_bias


# Dummy presets.


def test_dummy_tiny_loads_runs_and_decodes_every_id() -> None:
    loaded = _load("dummy:tiny", seed=3)
    again = _load("dummy:tiny", seed=3)
    other = _load("dummy:tiny", seed=4)
    weight = loaded.model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(weight, again.model.model.layers[0].mlp.gate_up_proj.weight)
    assert not torch.equal(weight, other.model.model.layers[0].mlp.gate_up_proj.weight)
    assert 0.015 < weight.std().item() < 0.025
    assert loaded.dtype == torch.float32 and loaded.eos_token_ids == frozenset({1})
    logits = _prompt_logits(loaded, list(range(40)))
    assert logits.shape == (40, 2048) and torch.isfinite(logits).all()
    texts = loaded.tokenizer.batch_decode([[i] for i in range(loaded.arch.vocab_size)])
    assert all(texts)
    text = "Rain is likely later, so take a coat!"
    assert loaded.tokenizer.decode(loaded.tokenizer(text).input_ids) == text
    with pytest.raises(ValueError, match=r"dummy:llama-3\.1-8b"):
        _load("dummy:nonexistent")


def test_uniform_dummy_weights_draw_every_parameter_as_vllm_does() -> None:
    """`--dummy-weights uniform`: norm scales and all, U(-1e-3, 1e-3); the forward stays
    finite. The default draws norm scales 1 and N(0, 0.02) elsewhere."""
    uniform = _load("dummy:tiny", seed=3, dummy_weights="uniform")
    normal = _load("dummy:tiny", seed=3)
    params = dict(uniform.model.named_parameters())
    assert any(name.endswith("norm.weight") for name in params)
    for name, param in params.items():
        assert param.abs().max().item() <= 1e-3, name
        assert param.std().item() > 4e-4, name  # drawn, not filled
    assert torch.equal(
        normal.model.model.norm.weight, torch.ones_like(normal.model.model.norm.weight)
    )
    again = _load("dummy:tiny", seed=3, dummy_weights="uniform")
    assert torch.equal(again.model.lm_head.weight, uniform.model.lm_head.weight)
    logits = _prompt_logits(uniform, list(range(40)))
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="dummy_weights must be one of"):
        ModelConfig("dummy:tiny", dummy_weights="zeros")  # type: ignore[arg-type]


def test_dummy_weights_flag_reaches_the_model_config(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    given = ["--model", "dummy:tiny", "--dummy-weights", "uniform"]
    assert engine_config_from_args(parser.parse_args(given)).model.dummy_weights == "uniform"
    default = engine_config_from_args(parser.parse_args(["--model", "dummy:tiny"]))
    assert default.model.dummy_weights == ModelConfig("dummy:tiny").dummy_weights == "normal"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "dummy:tiny", "--dummy-weights", "zeros"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preset,num_params,kv_bytes_per_token",
    [("llama-3.1-8b", 8_030_261_248, 131072), ("qwen3-0.6b", 596_049_920, 114688)],
)
def test_dummy_preset_shapes(preset: str, num_params: int, kv_bytes_per_token: int) -> None:
    arch = dummy_arch(f"dummy:{preset}")
    with torch.device("meta"):
        model = CausalLM(arch, torch_kernels(), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * 2 == kv_bytes_per_token
    assert DUMMY_PRESETS[preset] is arch


def test_dummy_tokenizer_covers_the_large_vocab() -> None:
    arch = DUMMY_PRESETS["qwen3-0.6b"]
    tok = build_dummy_tokenizer(arch)
    assert len(tok) == arch.vocab_size == 151936
    texts = tok.batch_decode([[i] for i in range(arch.vocab_size)])
    assert all(texts)
    assert set(arch.eos_token_ids) <= set(tok.all_special_ids)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "hi" in chat
