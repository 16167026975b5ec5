"""Fidelity to dense: KL, top-1 agreement and perplexity by position bucket, computed chunk by chunk."""

from __future__ import annotations

import pytest

from headwise.eval.fidelity import bucket_edges, bucket_label, fidelity, text_ids
from headwise.plan import HeadPlan


def test_buckets_double_from_512():
    assert bucket_edges(4096) == [0, 512, 1024, 2048, 4096]
    assert bucket_edges(3000) == [0, 512, 1024, 2048, 3000]
    assert bucket_edges(300) == [0, 300]
    assert bucket_label(1024, 2048) == "1K-2K"


def test_text_is_seeded(smollm2):
    a, b, c = text_ids(smollm2, 64, 0), text_ids(smollm2, 64, 0), text_ids(smollm2, 64, 1)
    assert a.shape == (1, 64) and a.equal(b) and not a.equal(c)


def test_plan_that_drops_nothing_matches_dense_and_a_short_window_does_not(smollm2):
    spec = smollm2.spec
    T = 160
    ids = text_ids(smollm2, T, 0)
    wide = HeadPlan.uniform(spec, {"policy": "streaming", "params": {"sink": 4, "window": T}})
    narrow = HeadPlan.uniform(spec, {"policy": "streaming", "params": {"sink": 4, "window": 16}})
    res = fidelity(smollm2, {"wide": wide, "narrow": narrow}, ids, chunk=64)
    o = res["overall"]
    assert o["tokens"] == T - 1
    assert o["plans"]["wide"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert o["plans"]["wide"]["top1"] == 1.0
    assert o["plans"]["wide"]["ppl"] == pytest.approx(o["ppl_dense"], rel=1e-4)
    assert o["plans"]["narrow"]["kl"] > 0.01
    assert o["plans"]["narrow"]["top1"] < 1.0
    assert [b["range"] for b in res["buckets"]] == [[0, T]]
