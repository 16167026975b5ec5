"""``Engine(compile_layers=True)``: the model's decoder layers compiled in place (headwise's attention function left
out of the graphs), the same greedy tokens."""

from __future__ import annotations

import pytest
import torch

from headwise.engine import Engine
from headwise.fusion import compile_layers, compiled_kinds
from headwise.plan import HeadPlan
from tiny import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_compiled_layers_give_the_same_tokens_under_a_mixed_plan(arch):
    """A plan with streaming and full heads, a prompt prefilled in chunks of two sizes, then decode: the tokens with
    the decoder layers and the final norm compiled equal those without (fp32 on the CPU, where Inductor writes C++).
    Gemma 3's layers hold query and key norms and four norms each, and its MLP is GELU."""
    lm = tiny_model(arch, num_hidden_layers=2)
    plan = HeadPlan.split(lm.spec, 0.5, {"policy": "full"}, {"policy": "streaming", "params": {"sink": 4, "window": 8}})
    prompt = torch.randint(0, 128, (1, 45), generator=torch.Generator().manual_seed(3))

    def tokens(engine: Engine) -> list[int]:
        return [e.token_id for e in engine.generate(prompt, max_new_tokens=6) if e.token_id >= 0]

    want = tokens(Engine(lm, plan, chunk_size=16))
    engine = Engine(lm, plan, chunk_size=16, compile_layers=True)
    layers = [n for n, m in lm.model.named_modules() if type(m).__name__.endswith("DecoderLayer")]
    assert len(layers) == 2 and set(layers) < set(engine.compiled)
    assert [n for n in engine.compiled if n not in layers] == ["model.norm"]  # the layers' parts run in their graphs
    assert all(compiled_kinds(m) for n, m in lm.model.named_modules() if n in engine.compiled)
    assert tokens(engine) == want
    assert compile_layers(lm.model) == []  # once per model


def test_parts_outside_a_decoder_layer_are_compiled_on_their_own():
    """A model whose blocks are not transformers' ``*DecoderLayer``s gets its MLPs, norms and attention modules
    compiled one by one."""

    class TinyMLP(torch.nn.Module):
        def forward(self, x):
            return x * 2

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = TinyMLP()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

    assert compile_layers(Net()) == ["blocks.0.mlp", "blocks.1.mlp"]


def test_compiled_layers_serve_packed_steps_and_stop_at_headwise_attention():
    """Two sequences of different lengths advanced together by ``Engine.step`` (packed prompt chunks beside decode
    tokens): the same tokens as each alone uncompiled; the compiled layers break their graphs at
    headwise's attention function (so the cache is never traced) and a new chunk length does not recompile."""
    import torch._dynamo

    lm = tiny_model("llama", num_hidden_layers=2)
    plan = HeadPlan.split(lm.spec, 0.5, {"policy": "full"}, {"policy": "streaming", "params": {"sink": 4, "window": 8}})
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (1, n), generator=gen) for n in (37, 20)]
    def run(engine: Engine, batch: list[torch.Tensor]) -> list[list[int]]:
        seqs = [engine.add(p, max_new_tokens=5) for p in batch]
        while engine.live:
            engine.step()
        return [s.generated for s in seqs]

    plain = Engine(lm, plan, chunk_size=16)
    want = [run(plain, [p])[0] for p in prompts]
    torch._dynamo.utils.counters.clear()
    engine = Engine(lm, plan, chunk_size=16, compile_layers=True)
    assert run(engine, prompts) == want
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("headwise_attention" in reason for reason in breaks)
    torch._dynamo.utils.counters.clear()
    run(engine, [torch.randint(0, 128, (1, n), generator=gen) for n in (29, 11)])  # other chunk and batch shapes
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]  # nothing compiled again


def test_every_layer_runs_compiled_past_dynamos_recompile_limit():
    """Each layer's attention frame compiles once per layer (transformers' ``layer_idx`` is a constant to Dynamo):
    with more layers than Dynamo's default recompile limit (8), none may fall back to eager (it would raise here),
    and the tokens stay those of the uncompiled model."""
    import torch._dynamo

    lm = tiny_model("llama", num_hidden_layers=10)
    plan = HeadPlan.split(lm.spec, 0.5, {"policy": "full"}, {"policy": "streaming", "params": {"sink": 4, "window": 8}})
    prompt = torch.randint(0, 128, (1, 21), generator=torch.Generator().manual_seed(2))

    def run(engine: Engine) -> list[int]:
        seq = engine.add(prompt, max_new_tokens=3)
        while engine.live:
            engine.step()
        return seq.generated

    want = run(Engine(lm, plan, chunk_size=16))
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        assert run(Engine(lm, plan, chunk_size=16, compile_layers=True)) == want
