"""IncrementalDetokenizer on a small byte-level BPE tokenizer trained in the fixture."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from splitserve.engine.detokenizer import IncrementalDetokenizer, TokenTexts, make_decode_fn
from splitserve.engine.sampling_params import SamplingParams

_CORPUS = [
    "The naïve café near 東京 serves crème brûlée 🙂 and green tea. ",
    "Stop here: the quick brown fox jumps over the lazy dog. Ünïcödé ñ ø 日本語 テスト 😀",
    "hello world, hello there, general kenobi. STOP STOP end of text. 1234567890 !?;:",
    "Zürich, São Paulo, Kraków and Ελλάδα are places; Москва too. Ωμέγα, 北京, 서울.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 30, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=SPECIALS[0], clean_up_tokenization_spaces=False
    )


def _stream(
    tokenizer: PreTrainedTokenizerFast,
    ids: list[int],
    params: SamplingParams,
    prompt: list[int] | None = None,
    rng: random.Random | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    """Feed `ids` in chunks (random sizes 1-3 when rng is given); deltas, stop string, detok."""
    detok = IncrementalDetokenizer(tokenizer, prompt or [], params, decode)
    deltas: list[str] = []
    pos = 0
    while pos < len(ids):
        size = rng.randint(1, 3) if rng else 1
        step = detok.step(ids[pos : pos + size])
        pos += size
        deltas.append(step.text_delta)
        if step.stop_str is not None:
            return deltas, step.stop_str, detok
    deltas.append(detok.flush())
    return deltas, None, detok


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_round_trip_on_random_ids(
    tokenizer: PreTrainedTokenizerFast, skip_special_tokens: bool
) -> None:
    rng = random.Random(0)
    vocab_size = len(tokenizer)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for _ in range(300):
        ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 30))]
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(0, 8))]
        deltas, stop, detok = _stream(tokenizer, ids, params, prompt, rng)
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert stop is None
        assert "".join(deltas) == expected == detok.text


def test_split_character_is_held_until_complete(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("a🦀")
    assert len(ids) >= 3  # the crab was never seen in training: its bytes are separate tokens
    deltas, _, _ = _stream(tokenizer, ids, SamplingParams())
    assert deltas[0] == "a"
    assert all(d == "" for d in deltas[1:-2])
    assert deltas[-2:] == ["🦀", ""]
    assert not any("\ufffd" in d for d in deltas)


def test_incomplete_character_released_on_flush(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("x🦀")[:-1]
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    assert detok.step(ids).text_delta == "x"
    assert detok.flush() == tokenizer.decode(ids)[1:] == "\ufffd"


def test_stop_string_spanning_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "naïve café 東京 🙂 and green tea"
    stop = "é 東京 🙂 a"
    ids = tokenizer.encode(text)
    assert not any(stop in tokenizer.decode([i]) for i in ids)
    deltas, found, detok = _stream(tokenizer, ids, SamplingParams(stop=("nope", stop)))
    assert found == stop
    assert "".join(deltas) == detok.text == "naïve caf"
    deltas, found, detok = _stream(
        tokenizer, ids, SamplingParams(stop=(stop,), include_stop_str_in_output=True)
    )
    assert found == stop
    assert detok.text.startswith("naïve café 東京 🙂 a")
    assert detok.text.endswith(stop)
    assert "".join(deltas) == detok.text
    assert detok.flush() == ""
    with pytest.raises(RuntimeError):
        detok.step(ids[:1])


def test_earliest_stop_string_wins(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("hello world, hello there")
    _, found, detok = _stream(tokenizer, ids, SamplingParams(stop=("there", "world", "llo w")))
    assert found == "llo w"
    assert detok.text == "he"


def test_holdback_then_release(tokenizer: PreTrainedTokenizerFast) -> None:
    params = SamplingParams(stop=("café!",))
    detok = IncrementalDetokenizer(tokenizer, [], params)
    step = detok.step(tokenizer.encode("x café"))
    assert step == ("x ", None)
    assert detok.text == "x "
    step = detok.step(tokenizer.encode(" au lait"))
    assert step.stop_str is None
    assert detok.text == "x café au lait"
    assert step.text_delta == "café au lait"
    # Held back at the end of the stream and released by flush.
    detok = IncrementalDetokenizer(tokenizer, [], params)
    assert detok.step(tokenizer.encode("tea café")).text_delta == "tea "
    assert detok.flush() == "café"
    assert detok.text == "tea café"


def test_no_holdback_with_include_stop_str(tokenizer: PreTrainedTokenizerFast) -> None:
    params = SamplingParams(stop=("café!",), include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    assert detok.step(tokenizer.encode("x café")).text_delta == "x café"
    step = detok.step(tokenizer.encode("! more"))
    assert step == ("!", "café!")
    assert detok.text == "x café!"


def test_stops_on_encoded_text_match_full_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = random.Random(1)
    words = ["hello", "world", "the", "café", "東京", "🙂", "STOP"]
    words += ["tea", "naïve", "🦀", "brûlée", ",", "."]
    stops = ("STOP", "é 東", "lo wo", "🙂 🦀")
    num_stopped = 0
    for _ in range(200):
        text = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12)))
        include = rng.random() < 0.5
        params = SamplingParams(stop=stops, include_stop_str_in_output=include)
        ids = tokenizer.encode(text)
        deltas, found, detok = _stream(tokenizer, ids, params, rng=rng)
        assert "".join(deltas) == detok.text
        if found is None:
            assert detok.text == text
            assert not any(s in text for s in stops)
            continue
        num_stopped += 1
        pos = min(text.find(s) for s in stops if s in text)
        assert text.find(found) == pos
        assert detok.text == text[: pos + (len(found) if include else 0)]
    assert num_stopped > 50


def test_skip_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    special = tokenizer.convert_tokens_to_ids(SPECIALS[1])
    ids = [*tokenizer.encode("hi"), special, *tokenizer.encode(" there"), tokenizer.eos_token_id]
    deltas, _, _ = _stream(tokenizer, ids, SamplingParams(skip_special_tokens=True))
    assert "".join(deltas) == "hi there"
    deltas, _, _ = _stream(tokenizer, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(deltas) == "hi<|im_start|> there<|endoftext|>"


def test_prompt_context_ending_mid_character(tokenizer: PreTrainedTokenizerFast) -> None:
    crab = tokenizer.encode("🦀")
    prompt, output = tokenizer.encode("ask ") + crab[:1], crab[1:] + tokenizer.encode(" ok")
    deltas, _, _ = _stream(tokenizer, output, SamplingParams(), prompt)
    assert "".join(deltas) == tokenizer.decode(output)
    assert "".join(deltas).endswith(" ok")


def test_prompt_context_keeps_leading_space_of_metaspace_tokens() -> None:
    """SentencePiece-style tokenizers drop the first token's space when decoded alone; in
    context (as the client sees prompt + completion) the space belongs to the output."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False)
    backend.train_from_iterator(_CORPUS * 30, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False
    )
    prompt, full = tokenizer.encode("hello"), tokenizer.encode("hello world")
    assert full[: len(prompt)] == prompt
    output = full[len(prompt) :]
    assert tokenizer.decode(output) == "world"
    deltas, _, _ = _stream(tokenizer, output, SamplingParams(), prompt)
    assert "".join(deltas) == " world"


def test_shared_token_texts_give_the_same_stream_with_fewer_decodes(tokenizer) -> None:
    """Detokenizers sharing a TokenTexts (as an engine's do) release exactly what their own
    decode releases, over random ids (multi-byte characters split across tokens, special
    tokens) and over text, at random step sizes; on text the tokenizer decodes fewer
    windows (about a third fewer on this multilingual corpus)."""
    rng = random.Random(7)
    vocab = tokenizer.backend_tokenizer.get_vocab_size()
    text = " ".join(_CORPUS)
    random_ids = [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(30)]
    text_ids = []
    for _ in range(30):
        start = rng.randrange(len(text) - 80)
        text_ids.append(tokenizer.encode(text[start : start + 80]))
    for skip in (True, False):
        params = SamplingParams(skip_special_tokens=skip)
        for kind, streams in (("random", random_ids), ("text", text_ids)):
            plain_decode = _Counted(make_decode_fn(tokenizer, skip))
            shared_decode = _Counted(make_decode_fn(tokenizer, skip))
            shared = TokenTexts(shared_decode)
            for ids in streams:
                prompt = [rng.randrange(vocab) for _ in range(6)]
                seed = rng.random()  # the same step sizes for both
                plain, _, _ = _stream(
                    tokenizer, ids, params, prompt, random.Random(seed), plain_decode
                )
                mine, _, _ = _stream(tokenizer, ids, params, prompt, random.Random(seed), shared)
                assert mine == plain
            if kind == "text":  # multilingual: some characters span tokens and are held
                assert shared_decode.calls < 0.75 * plain_decode.calls


class _Counted:
    def __init__(self, decode) -> None:  # type: ignore[no-untyped-def]
        self.decode, self.calls = decode, 0

    def __call__(self, ids: list[int]) -> str:
        self.calls += 1
        return self.decode(ids)


def test_token_texts_stop_remembering_at_their_limit() -> None:
    seen: list[list[int]] = []
    texts = TokenTexts(lambda ids: seen.append(ids) or "x" * len(ids), limit=2)
    for ids in ([1], [1], [2], [3], [3], [1, 2]):
        texts(ids)
    assert seen == [[1], [2], [3], [3], [1, 2]]
