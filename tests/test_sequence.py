"""A sequence's stop rules and text hold-back (``headwise/sequence.py``), the one place they live: a stop token
ends it, a stop string cuts the text before it, and text is released only once no later token can change it
(a half-decoded UTF-8 character, the start of a stop string)."""

from __future__ import annotations

from headwise.plan import HeadPlan
from headwise.sequence import SamplingParams, Sequence, first_stop, safe_end
from headwise.spec import ModelSpec

# A byte-level vocabulary, as byte-level BPE tokenizers have: token i is one byte; the text of a token list is
# its bytes decoded with U+FFFD for an incomplete character, as ``tokenizer.decode`` does.
EOS = 300


def detokenize(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def tokens(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def run(output: str, stop: tuple[str, ...] = (), max_new_tokens: int = 100, eos: bool = False) -> Sequence:
    spec = ModelSpec(architecture="llama", num_layers=1, num_q_heads=1, num_kv_heads=1, head_dim=4, max_context=1024)
    seq = Sequence("s", [1], SamplingParams(max_new_tokens=max_new_tokens, stop=stop), {EOS},
                   HeadPlan.dense(spec, "t"))
    for t in tokens(output) + ([EOS] if eos else []):
        seq.accept(t, detokenize)
        if seq.finished:
            break
    return seq


def pieces(seq: Sequence) -> list[str]:
    return [e.text for e in seq.take_events()]


def test_partial_stop_string_is_held_back_until_decided():
    # "Hello ##" could still become the stop string "###": only "Hello " may be sent.
    assert safe_end("Hello ##", ["###"]) == len("Hello ")
    assert safe_end("Hello #x", ["###"]) == len("Hello #x")
    assert first_stop("Hello ### bye", ["###"]) == len("Hello ")


def test_split_utf8_character_is_held_back():
    # A multi-byte character cut between tokens decodes as U+FFFD until its last byte arrives.
    assert safe_end("caf\ufffd", []) == 3
    assert safe_end("café", []) == 4


def test_earliest_of_several_stop_strings_wins():
    assert first_stop("a. b! c", ["!", "."]) == 1
    assert first_stop("abc", ["x", "y"]) is None


def test_stop_string_ends_the_sequence_and_its_start_is_never_sent():
    seq = run("ab#c##d###tail", stop=("###",))
    got = pieces(seq)
    assert "".join(got) == "ab#c##d" and seq.finish_reason == "stop"
    # Every released prefix is a prefix of the final text, and none ends in a '#' that was still undecided.
    sent = ""
    for p in got:
        sent += p
        assert "ab#c##d".startswith(sent)
    assert seq.generated == tokens("ab#c##d###"), "the tokens up to the stop string count as generated"


def test_multibyte_characters_are_released_whole():
    seq = run("é🐱ü", max_new_tokens=100, eos=True)
    got = pieces(seq)
    assert "".join(got) == "é🐱ü" and "\ufffd" not in "".join(got)
    assert [p for p in got if p] == ["é", "🐱", "ü"]
    assert seq.finish_reason == "stop" and seq.generated == tokens("é🐱ü"), "EOS is not part of the output"


def test_text_held_back_at_a_stop_token_is_released_at_the_end():
    seq = run("ab#", stop=("###",), eos=True)
    events = seq.take_events()
    assert "".join(e.text for e in events) == "ab#"
    assert events[-2].token_id == -1 and events[-2].text == "#", "the undecided '#' comes out once EOS decides it"
    assert events[-1].stats is not None and events[-1].stats.new_tokens == 3


def test_length_limit_releases_everything_and_says_length():
    seq = run("abcdef", stop=("cdX",), max_new_tokens=4)
    assert "".join(pieces(seq)) == "abcd" and seq.finish_reason == "length" and len(seq.generated) == 4
