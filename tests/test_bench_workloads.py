"""Workloads: token-exact prompts, Mooncake expansion, shared prefixes, ShareGPT, bodies."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from splitserve.benchmarks.cli import add_arguments
from splitserve.benchmarks.client import TargetConfig, build_body
from splitserve.benchmarks.datasets import MooncakeExpander, mooncake_sessions, sharegpt_sessions
from splitserve.benchmarks.tokenizer import WORDS, HFTokenizer, WhitespaceTokenizer
from splitserve.benchmarks.workload_factory import (
    MEASURED_STREAM,
    WARMUP_STREAM,
    build_sessions,
    draw_seed,
)
from splitserve.benchmarks.workloads import (
    PromptSynth,
    Session,
    Turn,
    multi_turn_sessions,
    random_sessions,
    sample_lengths,
)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer trained here, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 40)) for _ in range(200)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe")
    tok.save(str(path / "tokenizer.json"))
    return path


def test_text_prompts_are_token_exact_with_a_bpe_tokenizer(bpe_dir: Path) -> None:
    tok = HFTokenizer(str(bpe_dir))
    synth = PromptSynth(tok, "text")
    rng = np.random.default_rng(1)
    lens = np.array([1, 2, 7, 64, 300, 1000])
    sessions = random_sessions(synth, len(lens), lens, np.full(len(lens), 8), rng)
    for s, n in zip(sessions, lens, strict=True):
        turn = s.turns[0]
        assert turn.prompt_ids is None and turn.num_prompt_tokens == n
        assert len(tok.encode(turn.text or "")) == n


def test_token_id_prompts_and_seeding(bpe_dir: Path) -> None:
    synth = PromptSynth(HFTokenizer(str(bpe_dir)), "token-ids")
    a = random_sessions(
        synth, 3, np.array([5, 50, 500]), np.array([1, 2, 3]), np.random.default_rng(4)
    )
    b = random_sessions(
        synth, 3, np.array([5, 50, 500]), np.array([1, 2, 3]), np.random.default_rng(4)
    )
    assert a == b
    assert [len(s.turns[0].prompt_ids or ()) for s in a] == [5, 50, 500]
    assert [s.turns[0].max_tokens for s in a] == [1, 2, 3]
    assert a[0].turns[0].prompt_ids != a[1].turns[0].prompt_ids[:5]  # type: ignore[index]


def test_length_distributions() -> None:
    rng = np.random.default_rng(0)
    assert np.all(sample_lengths(100, "fixed", 0.5, 50, rng) == 100)
    uni = sample_lengths(100, "uniform", 0.2, 10_000, rng)
    assert uni.min() == 80 and uni.max() == 120 and uni.mean() == pytest.approx(100, rel=0.01)
    norm = sample_lengths(100, "normal", 0.1, 10_000, rng)
    assert norm.mean() == pytest.approx(100, rel=0.01) and norm.std() == pytest.approx(10, rel=0.05)
    assert sample_lengths(2, "normal", 5.0, 1000, rng).min() >= 1
    with pytest.raises(ValueError, match="length-spread"):
        sample_lengths(100, "uniform", 1.0, 5, rng)


def write_trace(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_mooncake_equal_hash_ids_give_equal_blocks(tmp_path: Path, bpe_dir: Path) -> None:
    rows = [
        {"timestamp": 1000, "input_length": 12, "output_length": 3, "hash_ids": [0, 1, 2]},
        {"timestamp": 1500, "input_length": 10, "output_length": 4, "hash_ids": [0, 1, 3]},
        {"timestamp": 4000, "input_length": 7, "output_length": 5, "hash_ids": [0, 4]},
        {"timestamp": 4000, "input_length": 4, "output_length": 1, "hash_ids": [3]},
    ]
    path = write_trace(tmp_path / "t.jsonl", rows)
    synth = PromptSynth(HFTokenizer(str(bpe_dir)), "token-ids")
    sessions = mooncake_sessions(path, synth, None, block_size=4, timestamp_unit_s=1e-3, seed=0)
    ids = [list(s.turns[0].prompt_ids or ()) for s in sessions]
    assert [len(x) for x in ids] == [12, 10, 7, 4]
    assert ids[0][:8] == ids[1][:8] and ids[0][8:12] != ids[1][8:12]  # blocks 0,1 shared; 2 != 3
    assert ids[2][:4] == ids[0][:4] and ids[2][4:7] != ids[0][4:7]
    assert ids[3][:2] == ids[1][8:10]  # block 3 is the same wherever it appears
    assert [s.turns[0].max_tokens for s in sessions] == [3, 4, 5, 1]
    assert [s.arrival_s for s in sessions] == pytest.approx([0.0, 0.5, 3.0, 3.0])
    again = mooncake_sessions(path, synth, 2, block_size=4, timestamp_unit_s=1e-3, seed=0)
    assert [s.turns[0].prompt_ids for s in again] == [tuple(x) for x in ids[:2]]
    # what a prefix cache may serve: leading blocks an earlier request had as its prefix
    assert [s.turns[0].num_shared_prefix_tokens for s in sessions] == [0, 8, 4, 0]
    fresh = mooncake_sessions(path, synth, None, block_size=4, timestamp_unit_s=1e-3, seed=5)
    fresh_ids = [list(s.turns[0].prompt_ids or ()) for s in fresh]
    assert fresh_ids[0][:8] == fresh_ids[1][:8] and fresh_ids[0][:4] != ids[0][:4]


def test_mooncake_short_and_long_hash_lists(bpe_dir: Path) -> None:
    exp = MooncakeExpander(PromptSynth(HFTokenizer(str(bpe_dir)), "token-ids"), block_size=4)
    padded = exp.expand([0], 10, request_index=0)  # ids cover 4 of 10 tokens
    assert len(padded) == 10 and padded[:4] == exp.block(0) and exp.num_padded == 1
    other = exp.expand([0], 10, request_index=1)
    assert other[:4] == padded[:4] and other[4:] != padded[4:]  # padding is request-unique
    cut = exp.expand([0, 1, 2], 5, request_index=2)  # block 2 is not needed
    assert cut == exp.block(0) + exp.block(1)[:1] and exp.num_truncated == 1


def test_mooncake_text_prompts_and_bad_lines(tmp_path: Path, bpe_dir: Path) -> None:
    tok = HFTokenizer(str(bpe_dir))
    rows = [{"timestamp": 0, "input_length": 40, "output_length": 2, "hash_ids": list(range(5))}]
    path = write_trace(tmp_path / "t.jsonl", rows)
    (s,) = mooncake_sessions(path, PromptSynth(tok, "text"), None, 8, 1e-3, 0)
    assert s.turns[0].text and abs(s.turns[0].num_prompt_tokens - 40) <= 5
    bad = write_trace(tmp_path / "bad.jsonl", [{"timestamp": 0, "input_length": 3}])
    with pytest.raises(ValueError, match="hash_ids"):
        mooncake_sessions(bad, PromptSynth(tok, "text"), None, 8, 1e-3, 0)


def test_sharegpt_first_and_all_turns(tmp_path: Path) -> None:
    data = [
        {
            "conversations": [
                {"from": "human", "value": "hello there friend"},
                {"from": "gpt", "value": "hi you two three four"},
                {"from": "human", "value": "and again"},
                {"from": "gpt", "value": "ok"},
            ]
        },
        {"conversations": [{"from": "human", "value": "alone"}]},  # no answer: skipped
        {
            "conversations": [
                {"from": "gpt", "value": "x"},
                {"from": "human", "value": "why"},
                {"from": "gpt", "value": "because"},
            ]
        },
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    synth = PromptSynth(WhitespaceTokenizer(), "text")
    first = sharegpt_sessions(str(path), synth, None, "first", None, seed=0)
    assert sorted((s.turns[0].text, s.turns[0].max_tokens) for s in first) == [
        ("hello there friend", 5),
        ("why", 1),
    ]
    one = sharegpt_sessions(str(path), synth, 1, "first", None, seed=0)
    two = sharegpt_sessions(str(path), synth, 1, "first", None, seed=0, skip=1)
    assert {one[0].turns[0].text, two[0].turns[0].text} == {"hello there friend", "why"}
    full = sharegpt_sessions(str(path), synth, None, "all", 7, seed=0)
    longest = max(full, key=lambda s: len(s.turns))
    assert [t.text for t in longest.turns] == ["hello there friend", "and again"]
    assert all(t.max_tokens == 7 for s in full for t in s.turns)
    assert len(sharegpt_sessions(str(path), synth, 1, "first", None, seed=0)) == 1


def test_chat_and_completion_bodies_resend_history() -> None:
    session = Session("c0", (Turn("q1", None, 5, 2), Turn("q2", None, 6, 2, 0.5)), system="sys")
    history = [("q1", "a1")]
    chat = build_body(
        TargetConfig("http://h:1/v1", "chat", "m", temperature=0.0), session, 1, history
    )
    assert chat["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert chat["max_tokens"] == 6 and chat["stream_options"] == {"include_usage": True}
    assert chat["ignore_eos"] is True and chat["temperature"] == 0.0
    comp = build_body(
        TargetConfig("http://h:1", "completions", "m", stream=False), session, 1, history
    )
    assert comp["prompt"] == "sys\n\nq1a1\n\nq2" and "stream" not in comp
    ids = Session("t", (Turn(None, (5, 6), 1, 2),), system_ids=(1, 2))
    target = TargetConfig(
        "http://h:1", extra_body=(("top_k", 1),), max_tokens_field="max_completion_tokens"
    )
    body = build_body(target, ids, 0, [])
    assert (
        body["prompt"] == [1, 2, 5, 6] and body["top_k"] == 1 and body["max_completion_tokens"] == 1
    )


def _run_args(*flags: str) -> argparse.Namespace:
    """`splitserve bench run` parsed with these flags after a URL."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["run", "--url", "http://x:1", *flags])


def test_shared_prefix_from_cli_flags() -> None:
    tok = WhitespaceTokenizer()
    args = _run_args(
        "--workload", "shared-prefix", "--num-requests", "12", "--num-prefixes", "3",
        "--prefix-len", "20", "--input-len", "5",
    )  # fmt: skip
    sessions = build_sessions(args, tok, seed=0)
    systems = [s.system for s in sessions]
    assert len(set(systems)) == 3 and all(systems.count(x) == 4 for x in set(systems))
    assert all(len(tok.encode(x or "")) == 20 for x in systems)
    assert all(s.turns[0].num_prompt_tokens == 25 for s in sessions)
    shared = [s.turns[0].num_shared_prefix_tokens for s in sessions]
    assert sorted(shared) == [0] * 3 + [20] * 9  # each prefix's first use shares nothing
    other = build_sessions(args, tok, seed=draw_seed(0, MEASURED_STREAM, 1))
    assert not {s.system for s in other} & set(systems)  # a new point: new prefixes


def test_multi_turn_from_cli_flags_and_what_it_refuses() -> None:
    tok = WhitespaceTokenizer()
    args = _run_args(
        "--workload", "multi-turn", "--num-requests", "4", "--num-turns", "3",
        "--think-time-s", "0.2",
    )  # fmt: skip
    conv = build_sessions(args, tok, seed=0)
    assert len(conv) == 4 and all(len(s.turns) == 3 for s in conv)
    assert [t.think_time_s for t in conv[0].turns] == [0.0, 0.2, 0.2]
    with pytest.raises(ValueError, match="prompt-format text"):
        multi_turn_sessions(
            PromptSynth(tok, "token-ids"),
            1,
            2,
            0.0,
            np.ones(2, int),
            np.ones(2, int),
            np.random.default_rng(0),
        )
    with pytest.raises(ValueError, match="--dataset"):
        build_sessions(_run_args("--workload", "mooncake"), tok, seed=0)


def test_every_run_and_warmup_draws_fresh_prompts() -> None:
    args = _run_args("--num-requests", "50")
    tok = WhitespaceTokenizer()
    seeds = [draw_seed(0, stream, i) for stream in (MEASURED_STREAM, WARMUP_STREAM) for i in (0, 1)]
    prompts = [{s.turns[0].text for s in build_sessions(args, tok, seed)} for seed in seeds]
    assert all(len(p) == 50 for p in prompts)
    assert len(set().union(*prompts)) == 200  # no prompt sent twice in a two-point sweep
    assert prompts[0] == {s.turns[0].text for s in build_sessions(args, tok, seeds[0])}


def test_every_flag_has_a_description_and_a_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, action_parser in sub.choices.items():
        for action in action_parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = action.help or ""
            assert len(text) > 12 and "default: " in text, f"{name} {action.option_strings[0]}"
