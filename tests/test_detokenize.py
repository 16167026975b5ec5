"""Incremental detokenization (``Sequence._detokenized``): after every accepted token the text equals the tokenizer's
decoding of all the generated tokens, for the bundled models' real tokenizers (byte-level BPE for SmolLM2, Gemma 3's
SentencePiece-style one) on text with multi-byte characters, random token ids (partial UTF-8 sequences, special
tokens) and spaces; a tokenizer that rewrites across tokens falls back to decoding everything."""

from __future__ import annotations

import random

import pytest

from headwise.sequence import SamplingParams, Sequence

TEXT = ("Ünïcödé — naïve café, 日本語のテキスト, emoji 🎉🧪👩‍🔬, tabs\tand  double  spaces,\nnew lines\n\n"
        "Zürich ½ ∑ ≈ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and plain words. ")


def _sequence(stop: list[str] | None = None) -> Sequence:
    params = SamplingParams(max_new_tokens=10_000, stop=stop or [])
    return Sequence("s", [1], params, set(), None)  # type: ignore[arg-type]


def _token_streams(tok, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    text_ids = tok(TEXT * 3, add_special_tokens=False)["input_ids"]
    vocab = len(tok)
    random_ids = [rng.randrange(vocab) for _ in range(300)]
    mixed = [i for pair in zip(text_ids, random_ids) for i in pair]
    specials = list(tok.all_special_ids)
    with_specials = [rng.choice(specials) if rng.random() < 0.1 else i for i in text_ids]
    return [text_ids, random_ids, mixed, with_specials]


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_incremental_text_equals_decoding_every_token_of_real_tokenizers(model, request):
    tok = request.getfixturevalue(model).tokenizer

    def detokenize(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    for k, ids in enumerate(_token_streams(tok, seed=3)):
        seq = _sequence()
        calls: list[int] = []

        def counted(window: list[int], calls: list[int] = calls) -> str:
            calls.append(len(window))
            return detokenize(window)

        for i, t in enumerate(ids):
            seq.accept(t, counted)
            assert seq.text == detokenize(ids[: i + 1]), (model, i)
        seq.finish("length")
        if k < 3:  # text, random ids, both: the streamed text is the decoding, and decoding works on short windows,
            # not on every token at every step (a byte-fallback decoder, Gemma's, turns a run of byte tokens into U+FFFD while its last character is
            # incomplete: those few tokens decode everything). The fourth stream drops bytes out of multi-byte
            # characters (special tokens in their place): invalid UTF-8, decoded whole, whose later bytes change
            # characters already streamed (as they did when every step decoded everything).
            assert "".join(e.text for e in seq.take_events()) == detokenize(ids)
            assert seq._incremental and sum(calls) < len(ids) ** 2 / 6, (model, k, sum(calls), len(ids))


def test_a_tokenizer_that_rewrites_across_tokens_falls_back_to_decoding_everything():
    """A decoder that removes a space before punctuation (as clean_up_tokenization_spaces does) changes text already
    committed when the punctuation arrives: the sequence notices and decodes all its tokens from then on."""
    words = {1: "Hello", 2: " ", 3: ".", 4: " world", 5: "!"}

    def detokenize(ids: list[int]) -> str:
        return "".join(words[i] for i in ids).replace(" .", ".")

    ids = [1, 4, 2, 3, 4, 5, 2, 3] * 3
    seq = _sequence()
    for i, t in enumerate(ids):
        seq.accept(t, detokenize)
        assert seq.text == detokenize(ids[: i + 1])
    assert not seq._incremental


def test_stop_strings_and_held_back_text_are_unchanged_by_incremental_decoding(smollm2):
    """A stop string that spans tokens still cuts the text where decoding everything would."""
    tok = smollm2.tokenizer
    ids = tok("The answer is: forty-two. END of text", add_special_tokens=False)["input_ids"]
    seq = _sequence(stop=["END"])
    for t in ids:
        seq.accept(t, lambda w: tok.decode(w, skip_special_tokens=True))
        if seq.finished:
            break
    assert seq.finish_reason == "stop" and seq.text == "The answer is: forty-two. "
    assert "".join(e.text for e in seq.take_events()) == seq.text


def test_the_detokenize_cost_bench_measures_both_ways_and_writes_its_json(tmp_path):
    from bench_modules import bench_module

    res = bench_module("detokenize_cost.py").main(["--lengths", "12,30", "--reps", "1", "--out-dir", str(tmp_path)])
    assert set(res["by_length"]) == {12, 30}
    assert all(r["incremental_accept_us_per_token"] > 0 and r["decode_all_us_per_token"] > 0
               for r in res["by_length"].values())
    assert len(list(tmp_path.glob("detokenize_cost_*.json"))) == 1
