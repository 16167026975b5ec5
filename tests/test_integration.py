"""``headwise.apply``: a plan inside plain ``model.generate`` gives Engine.generate's tokens, and leaves no trace."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.engine import Engine
from headwise.errors import InputError
from headwise.plan import HeadPlan
from headwise.policies import Full, Streaming
from tiny import tiny_model


def _mixed_plan(spec) -> HeadPlan:
    """Full and streaming(sink 2, window 8) KV heads alternating: a 40-token prompt overflows every window."""
    rows = [[Full() if (i + h) % 2 == 0 else Streaming(sink=2, window=8) for h in range(spec.num_kv_heads)]
            for i in range(spec.num_layers)]
    return HeadPlan.from_policies(spec, rows)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_generate_inside_apply_gives_the_engines_greedy_tokens(arch):
    lm = tiny_model(arch)
    plan = _mixed_plan(lm.spec)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    engine = [e.token_id for e in Engine(lm, plan, chunk_size=16).generate(ids[0], max_new_tokens=12,
                                                                            stop_token_ids=[]) if e.stats is None]
    dense = lm.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 40:].tolist()
    with headwise.apply(lm.model, plan) as cache:
        out = lm.model.generate(ids, past_key_values=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out[0, 40:].tolist() == engine
    assert engine != dense  # the streaming heads really dropped tokens
    assert cache.get_seq_length() == 40 + 11 and cache.decode_step == 11
    with headwise.apply(lm.model, HeadPlan.dense(lm.spec)) as dense_cache:
        out = lm.model.generate(ids, past_key_values=dense_cache, max_new_tokens=12, min_new_tokens=12,
                                do_sample=False)
    assert out[0, 40:].tolist() == dense
    assert cache.kv_bytes() < dense_cache.kv_bytes()


def test_apply_undoes_its_hook_and_attention_implementation_even_on_error():
    lm = tiny_model("llama")
    before = lm.model.config._attn_implementation
    with pytest.raises(InputError, match="past_key_values=cache"), headwise.apply(lm.model, _mixed_plan(lm.spec)):
        from transformers import DynamicCache

        lm.model(torch.tensor([[1, 2, 3]]), past_key_values=DynamicCache())
    assert lm.model.config._attn_implementation == before
    assert not lm.model._forward_pre_hooks
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        assert torch.equal(lm.model(ids).logits, tiny_model("llama").model(ids).logits)


def test_apply_refuses_padded_rows_in_one_line():
    lm = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3, 4], [0, 0, 5, 6]])
    with pytest.raises(InputError, match="padding") as info, headwise.apply(lm.model, _mixed_plan(lm.spec), batch=2) as c:
        lm.model(ids, attention_mask=(ids > 0).long(), past_key_values=c)
    assert "\n" not in str(info.value)
