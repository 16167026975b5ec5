"""The profiler's retrieval probes: exact lengths, facts where they say, and no format shared with eval."""

import random

import pytest

from headwise.errors import InputError
from headwise.probes import HAYSTACKS, TEMPLATES, gate_sequence, retrieval_probe


def test_gate_sequence_has_the_length_and_ends_with_every_fact_recalled(smollm2):
    tok = smollm2.tokenizer
    seq = gate_sequence(tok, 700, 3, random.Random(0))
    assert len(seq.ids) == 700
    recall = tok.decode(seq.ids[-seq.recall_tokens:])
    answer = seq.format.template.answer.split("{key}")[0].strip() or seq.format.template.answer
    assert recall.count("?") == 3
    assert answer.split()[0] in recall


def test_retrieval_probe_spans_point_at_the_asked_fact(smollm2):
    tok = smollm2.tokenizer
    for seed in range(6):
        p = retrieval_probe(tok, 600, 0.3, seed)
        assert abs(len(p.ids) - 600) <= 2
        assert tok.decode(p.ids[p.fact.value_span[0]:p.fact.value_span[1]]).strip() == p.answer
        assert p.fact.key in tok.decode(p.ids[p.fact.span[0]:p.fact.span[1]])
        assert 0.15 < p.fact.span[0] / len(p.ids) < 0.45  # at the asked depth
        assert p.fact.key in tok.decode(p.ids[-30:])  # the question names the fact's key


def test_probe_formats_are_disjoint_from_the_eval_tasks(smollm2):
    """What the eval's tasks write (RULER's wording, the passkey filler, Shakespeare) never appears in a probe."""
    from headwise.eval.tasks import make_sample

    tok = smollm2.tokenizer
    eval_phrases = ["pass key", "special magic number", "The grass is green", "VAR "]
    for seed in range(8):
        text = tok.decode(retrieval_probe(tok, 400, 0.5, seed).ids)
        assert not any(p in text for p in eval_phrases)
    needle = make_sample("needle", tok, 400, 0.5, 0).prompt
    assert not any(t.fact.split("{")[0].strip() and t.fact.split("{")[0].strip() in needle for t in TEMPLATES)
    assert len(HAYSTACKS) >= 4 and len(TEMPLATES) >= 5


def test_a_probe_too_short_for_its_facts_is_refused(smollm2):
    with pytest.raises(InputError, match="too short"):
        retrieval_probe(smollm2.tokenizer, 40, 0.5, 0)
