"""Constrained decoding in the engine (engine/grammar.py): the sampler's bitmask path, and
the tiny llama generating under JSON schemas, regexes, choices and EBNF grammars offline,
through preemption, overlap and a failed remote prefill."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from structured_schemas import SCHEMAS, check_every_schema_beside_free_rows

from splitserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.core import EngineCore
from splitserve.engine.grammar import (
    TokenBitmask,
    apply_token_bitmask,
    bounded_strings_as_patterns,
    unpack_bitmask,
)
from splitserve.engine.kv_connector import FinalBlocks, KVEvents
from splitserve.engine.llm import LLM
from splitserve.engine.sampler import Sampler, SamplingRow
from splitserve.engine.sampling_params import GrammarSpec, SamplingParams
from splitserve.protocol.messages import sampling_params_from_proto, sampling_params_to_proto

VOCAB = 100


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32")


def json_params(schema: dict, **kwargs: object) -> SamplingParams:
    return SamplingParams(grammar=GrammarSpec("json", json.dumps(schema)), **kwargs)  # type: ignore[arg-type]


def random_bitmask(rows: list[int], seed: int) -> TokenBitmask:
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31 - 1, (len(rows), 4), generator=gen, dtype=torch.int64)
    return TokenBitmask(rows, words.to(torch.int32))


def test_bitmask_masks_only_the_constrained_rows() -> None:
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0))
    mask = random_bitmask([1, 3], seed=1)
    out = logits.clone()
    apply_token_bitmask(out, mask)
    allowed = unpack_bitmask(mask.words, VOCAB)
    for j, row in enumerate(mask.rows):
        expected = logits[row].masked_fill(~allowed[j], float("-inf"))
        assert torch.equal(out[row], expected)
    for row in (0, 2, 4):
        assert torch.equal(out[row], logits[row])
    # The device path's torch op (used on GPUs) against xgrammar's CPU kernel.
    bits = [(int(w) >> b) & 1 for w in mask.words[0].tolist() for b in range(32)]
    assert allowed[0].tolist() == [bool(b) for b in bits[:VOCAB]]


def test_sampler_obeys_the_mask_and_leaves_other_rows_alone() -> None:
    sampler = Sampler(VOCAB, torch.device("cpu"))
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)] * 2
    rows = [SamplingRow(p, Sampler.make_generator(3, "cpu"), [1], []) for p in params]
    words = torch.zeros(2, 4, dtype=torch.int32)
    words[0, 1] = 1 << 5  # row 1: only token 37
    words[1, 2] = 1 << 0  # row 2: only token 64
    free = sampler(logits.clone(), rows).token_ids
    rows = [SamplingRow(p, Sampler.make_generator(3, "cpu"), [1], []) for p in params]
    masked = sampler(logits.clone(), rows, TokenBitmask([1, 2], words)).token_ids
    assert masked[1] == 37 and masked[2] == 64
    assert masked[0] == free[0] == int(logits[0].argmax())
    assert masked[3] == free[3]  # same seed, same draw: the unmasked row is untouched


def test_min_tokens_does_not_hold_open_a_grammar_that_must_end() -> None:
    """eos (id 5) is the only token the grammar allows: min_tokens gives way; where the
    grammar allows more, min_tokens holds eos back as usual."""
    sampler = Sampler(VOCAB, torch.device("cpu"))
    params = SamplingParams(temperature=0, min_tokens=10)
    eos = frozenset({5})
    rows = [SamplingRow(params, None, [1], [], eos) for _ in range(2)]
    words = torch.zeros(2, 4, dtype=torch.int32)
    words[0, 0] = 1 << 5  # row 0: eos only
    words[1, 0] = (1 << 5) | (1 << 6)  # row 1: eos or 6
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 3.0
    out = sampler(logits, rows, TokenBitmask([0, 1], words))
    assert out.token_ids == [5, 6]


def test_grammar_spec_crosses_the_wire() -> None:
    params = json_params(SCHEMAS[2], temperature=0.5)
    assert sampling_params_from_proto(sampling_params_to_proto(params)) == params
    assert sampling_params_from_proto(sampling_params_to_proto(SamplingParams())).grammar is None


def test_length_bounded_strings_exclude_control_characters() -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}}}
    pattern = json.loads(bounded_strings_as_patterns(json.dumps(schema)))["properties"]["s"]
    expected = "^[\\u0020\\u0021\\u0023-\\u005b\\u005d-\\ud7ff\\ue000-\\U0010ffff]{0,3}$"
    assert pattern == {"type": "string", "pattern": expected}
    long = {"type": "string", "maxLength": 5000}
    assert json.loads(bounded_strings_as_patterns(json.dumps(long))) == long


@pytest.mark.parametrize(
    "content",
    [
        b"\xe0\x80\x80",  # overlong U+0000: xgrammar's negated class took it as one character
        b"\xf0\x80\x80\x80",  # overlong, four bytes
        b"\xe0\x9f\xbf",  # overlong U+07FF
        b"\xed\xa0\x80",  # a surrogate
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"\x01",  # a raw control character
        b'a"',
    ],
)
def test_length_bounded_strings_admit_only_what_decodes_to_that_length(content: bytes) -> None:
    """A bounded string's grammar takes valid UTF-8 of at most maxLength characters, and no
    byte sequence that Python decodes to U+FFFD replacements (one per byte), which would
    break the bound the client validates."""
    import xgrammar as xgr
    from xgrammar.testing import _get_matcher_from_grammar

    schema = bounded_strings_as_patterns(json.dumps({"type": "string", "maxLength": 4}))
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False)

    def accepts(data: bytes) -> bool:
        return bool(_get_matcher_from_grammar(grammar).accept_string(b'"' + data + b'"'))

    valid = "a\u00e9\u4e2d\U0001f600".encode()  # 1-, 2-, 3- and 4-byte characters
    assert accepts(valid) and accepts("\U0010ffff".encode()) and not accepts(b"abcde")
    assert not accepts(content)


def test_every_schema_validates_and_free_rows_are_unaffected(llm: LLM) -> None:
    check_every_schema_beside_free_rows(llm)


CHOICES = ["yes", 'no "way"']


def test_regex_choice_and_ebnf(llm: LLM) -> None:
    cases = [
        (GrammarSpec("regex", "[a-c]{2,5}x"), lambda t: len(t) in range(3, 7) and t[-1] == "x"),
        (GrammarSpec("choice", json.dumps(CHOICES)), lambda t: t in CHOICES),
        (GrammarSpec("grammar", 'root ::= "(" [0-9]+ ")"'), lambda t: t[0] + t[-1] == "()"),
        (GrammarSpec("json_object"), lambda t: isinstance(json.loads(t), dict)),
    ]
    for spec, check in cases:
        params = SamplingParams(temperature=0.8, max_tokens=48, n=2, seed=5, grammar=spec)
        for completion in llm.generate(["Pick one"], params)[0].outputs:
            assert completion.finish_reason == "stop" and check(completion.text), completion


def test_bad_grammars_are_value_errors_naming_the_problem(llm: LLM) -> None:
    bad = [
        (GrammarSpec("json", '{"type": "objectx"}'), "objectx"),
        (GrammarSpec("json", "{not json"), "not valid JSON"),
        (GrammarSpec("regex", "a("), "parenthesis"),
        (GrammarSpec("grammar", "root ::= foo"), "foo"),
    ]
    for spec, words in bad:
        with pytest.raises(ValueError, match="cannot be compiled") as info:
            llm.generate(["x"], SamplingParams(grammar=spec))
        assert words in str(info.value)
    assert not llm.engine.has_unfinished()


def test_impossible_grammar_ends_on_length_and_frees_everything(llm: LLM) -> None:
    params = SamplingParams(
        temperature=0.8, max_tokens=6, grammar=GrammarSpec("regex", "[a-z]{40}")
    )
    out = llm.generate(["Spell a long word"], params)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    assert llm.engine.pool.usage == 0.0


def test_preemption_and_overlap_keep_the_grammar(tiny_llama, llm: LLM) -> None:
    """A pool too small for the batch preempts (recompute), with overlapped output
    processing: the outputs equal the roomy engine's at temperature 0, and validate."""
    config = EngineConfig(
        ModelConfig(str(tiny_llama), dtype="float32"),
        CacheConfig(block_size=16, num_blocks=12),
        SchedulerConfig(max_num_batched_tokens=64, overlap_output_processing=True),
    )
    small = LLM.from_config(config)
    prompts = [f"Describe record {i} as JSON, please, with every field filled in" for i in range(4)]
    schema = SCHEMAS[9]
    params = json_params(schema, temperature=0, max_tokens=48)
    expected = [o.outputs[0].text for o in llm.generate(prompts, params)]
    got = [o.outputs[0].text for o in small.generate(prompts, params)]
    assert small.engine.stats().num_preemptions > 0
    assert got == expected
    for text in got:
        jsonschema.validate(json.loads(text), schema)


class FailingRemote:
    """A decode-like connector whose every remote prefill fails: the engine computes the
    prompt itself, and samples the first token under the grammar."""

    max_new_tokens = None
    reserves_prompt = False
    supports_overlap = True

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.to_release: list[str] = []

    def on_admission(self, request_id: str, kv_params: object | None) -> bool:
        return True

    def on_remote_plan(self, request_id: str, plan: object) -> None:
        self.failed.append(request_id)

    def on_blocks_final(self, blocks: FinalBlocks) -> None:
        pass

    def on_finish(self, request_id: str) -> bool:
        return False

    def poll(self) -> KVEvents:
        failed, self.failed = self.failed, []
        released, self.to_release = self.to_release, failed
        return KVEvents(failed=failed, released=released)


def test_failed_remote_prefill_falls_back_under_the_grammar(tiny_llama, llm: LLM) -> None:
    config = EngineConfig(
        ModelConfig(str(tiny_llama), dtype="float32"), CacheConfig(block_size=16, num_blocks=32)
    )
    eng = EngineCore(config)
    eng.set_connector(FailingRemote())
    schema = SCHEMAS[2]
    params = json_params(schema, temperature=0, max_tokens=40)
    prompt = list(llm.get_tokenizer()("Make a user record")["input_ids"])
    eng.add_request("r", prompt, params)
    tokens: list[int] = []
    while eng.has_unfinished():
        eng.poll_connector()
        for out in eng.step():
            tokens += out.new_token_ids
    expected = llm.generate([prompt], params)[0].outputs[0]
    assert tokens == expected.token_ids
    jsonschema.validate(json.loads(expected.text), schema)
    eng.poll_connector()
    eng.check_invariants()
    assert eng.pool.usage == 0.0
