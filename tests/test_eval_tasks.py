"""Task generators: the answer is in the prompt where the sample says, prompts have the requested length in
the model's tokenizer, and a seed fixes the prompt."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from headwise.errors import InputError
from headwise.eval.tasks import LENGTH_TOLERANCE, TASKS, make_sample


@pytest.fixture(scope="module")
def tok(request):
    """SmolLM2's tokenizer alone (from the converted-model cache) when it exists, else the session model's."""
    from transformers import AutoTokenizer

    from headwise.models import BUNDLED, _converted_dir

    try:
        cached = _converted_dir(BUNDLED["smollm2-135m"].locate())
    except Exception:
        cached = None
    if cached is not None and (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    return request.getfixturevalue("smollm2").tokenizer


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=True).input_ids)


@pytest.mark.parametrize("length", [300, 1500])
@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_hits_requested_length_within_two_percent(tok, task, length):
    s = make_sample(task, tok, length, seed=5)
    n = n_tokens(tok, s.prompt)
    assert abs(n - length) <= LENGTH_TOLERANCE * length
    assert s.meta["n_tokens"] == n


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_prompt_other_seed_other_prompt(tok, task):
    a = make_sample(task, tok, 400, seed=1)
    b = make_sample(task, tok, 400, seed=1)
    c = make_sample(task, tok, 400, seed=2)
    assert (a.prompt, a.answers) == (b.prompt, b.answers)
    assert a.prompt != c.prompt


@pytest.mark.parametrize("task", list(TASKS))
def test_every_answer_is_in_the_prompt(tok, task):
    s = make_sample(task, tok, 600, seed=3)
    for a in s.answers:
        assert a in s.prompt


@pytest.mark.parametrize("task", ["passkey", "needle"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_sits_at_the_stated_depth(tok, task, depth):
    s = make_sample(task, tok, 1200, depth=depth, seed=7)
    needle = s.meta["needles"][0]
    h0, h1 = s.meta["haystack_token_span"]
    n0, n1 = needle["token_span"]
    filler = (h1 - h0) - (n1 - n0)
    assert abs((n0 - h0) / filler - depth) < 0.03
    assert s.depth == depth


def test_needle_spans_locate_the_needle_and_its_value(tok):
    s = make_sample("needle", tok, 800, depth=0.4, seed=0)
    ids = tok(s.prompt, add_special_tokens=True).input_ids
    needle = s.meta["needles"][0]
    value = s.answers[0]
    c0, c1 = s.meta["needle_char_span"]
    assert s.prompt[c0:c1].startswith("One of the special magic numbers for") and value in s.prompt[c0:c1]
    t0, t1 = s.meta["needle_token_span"]
    assert value in tok.decode(ids[t0:t1])
    v0, v1 = needle["value_token_span"]
    assert tok.decode(ids[v0:v1]).strip() == value
    assert tok.decode(needle["answer_token_ids"]).strip() == value


def test_multikey_needle_asks_one_key_among_distractors(tok):
    s = make_sample("multikey_needle", tok, 800, seed=4)
    keys = [n["key"] for n in s.meta["needles"]]
    assert len(set(keys)) == 4 and len(s.answers) == 1
    asked = s.meta["queried_keys"][0]
    assert s.prompt.rstrip().endswith(f"The special magic number for {asked} mentioned in the provided text is")
    assert s.answers == [n["value"] for n in s.meta["needles"] if n["key"] == asked]


def test_multivalue_needle_has_four_values_of_one_key(tok):
    s = make_sample("multivalue_needle", tok, 800, seed=4)
    assert len({n["key"] for n in s.meta["needles"]}) == 1
    assert len(set(s.answers)) == 4


def test_variable_tracking_chain_is_in_order(tok):
    s = make_sample("variable_tracking", tok, 800, seed=2)
    value = s.meta["value"]
    first = s.prompt.index(f"VAR {s.answers[0]} = {value}.")
    pos = [first] + [s.prompt.index(f"VAR {b} = VAR {a}.") for a, b in zip(s.answers, s.answers[1:])]
    assert pos == sorted(pos)
    assert f"assigned the value {value}" in s.prompt


def test_common_words_answers_are_the_most_repeated(tok):
    s = make_sample("common_words", tok, 1000, seed=2)
    listed = re.findall(r"^\d+\. (\S+)$", s.prompt, flags=re.M)
    counts = Counter(listed)
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(s.answers)
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_frequent_words_top_three_are_strictly_most_frequent(tok):
    s = make_sample("frequent_words", tok, 1000, seed=2)
    body = s.prompt.split("coded words.\n", 1)[1].split("\nQuestion:", 1)[0]
    counts = Counter(body.split())
    ranked = [c for _, c in counts.most_common()]
    assert [w for w, _ in counts.most_common(3)] == s.answers
    assert ranked[0] > ranked[1] > ranked[2] > ranked[3]


def test_mqar_queries_keys_listed_with_their_values(tok):
    s = make_sample("mqar", tok, 600, seed=1)
    for key, value in zip(s.meta["keys"], s.answers):
        assert f"\n{key} = {value}\n" in s.prompt
    assert s.prompt.endswith(f"Answer: {s.meta['keys'][0]} =")


def test_unknown_task_names_the_valid_ones(tok):
    with pytest.raises(InputError, match="valid tasks: passkey, needle"):
        make_sample("haystack", tok, 500)


def test_depth_is_refused_for_tasks_without_one(tok):
    with pytest.raises(InputError, match="takes no depth"):
        make_sample("mqar", tok, 500, depth=0.5)


def test_depth_outside_unit_interval_is_refused(tok):
    with pytest.raises(InputError, match="between 0 and 1"):
        make_sample("needle", tok, 500, depth=1.5)


def test_length_too_short_for_the_instructions_is_refused(tok):
    with pytest.raises(InputError, match="at least 64"):
        make_sample("needle", tok, 10)
