"""DuoAttention gate optimisation (Xiao et al., 2024, https://arxiv.org/abs/2410.10819, section 3.2).

One gate ``alpha`` in [0, 1] per (layer, KV head); every model weight is frozen. Each layer's attention output
is ``alpha * full + (1 - alpha) * streaming(sink, window)`` (the gate of a KV head applies to all its query
heads). The gates are trained on synthetic retrieval data (a haystack with several facts, all of them recalled at
the end; ``probes.gate_sequence`` varies the haystack, the kind of value and the wording per sequence) with
the distillation loss between the last hidden states of the dense model and of the mixed
model on the final recall tokens, plus an L1 push of the gates towards 0. Heads whose gate stays high need
the whole context (retrieval heads); the others can stream.

The mixed attention is the attention function ``"headwise-duo"`` registered in transformers'
``AttentionInterface``; the gates travel as the forward keyword ``headwise_gates`` (an ``nn.Module`` whose
``alpha`` is an ``nn.Parameter`` ``[layers, kv_heads]``).

Where this differs from the paper: the paper trains Llama-scale models for 2,000 steps on passkey sequences
of ~1K-32K tokens with sink 64 / window 256 and lr 0.02. Here the streaming side is sink 64 / window 64 by
default (the solver's cheapest streaming span, so the gates judge the heads as the plan will run them, at
the 1-2K lengths the bundled models retrieve at); the data mixes many retrieval formats rather than one
passkey wording (a plan fitted to one wording keeps little else: issue 19); the distillation loss is the
squared error *relative* to the dense hidden state's squared norm (so one L1 weight serves models with
different hidden scales), lambda = 0.05 on the mean gate. ``headwise profile`` trains for ``Settings.duo_steps``
steps: a few hundred on a GPU (the loss curve is kept in the plan's metadata), a few dozen on a CPU (smoke
runs, not shipped plans).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface

from headwise.attention import attention_implementation
from headwise.models import LoadedModel
from headwise.policies.streaming import Streaming
from headwise.profile.probe import allowed_mask

DUO_NAME = "headwise-duo"


class DuoGates(torch.nn.Module):
    """alpha: [layers, kv_heads] gates, initialised to 1 (all heads full, as in the paper)."""

    def __init__(self, num_layers: int, num_kv_heads: int, sink: int = 64, window: int = 64):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.ones(num_layers, num_kv_heads))
        self.sink = sink
        self.window = window

    def clamp_(self) -> None:
        with torch.no_grad():
            self.alpha.clamp_(0.0, 1.0)


def duo_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Mixed attention of a whole sequence (no cache). query: [B, Hq, T, D]; key, value: [B, Hkv, T, D].
    Returns ([B, T, Hq, D], None)."""
    gates: DuoGates = kwargs["headwise_gates"]
    layer = int(module.layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    T = query.shape[2]
    pos = torch.arange(T, device=query.device)
    full_mask = allowed_mask(pos, pos, kwargs.get("sliding_window"))
    # The streaming side is exactly the ``streaming`` policy's pattern, inside the layer's own window.
    stream_mask = full_mask & Streaming(sink=gates.sink, window=gates.window).allowed(pos[:, None], pos[None, :])
    group = query.shape[1] // key.shape[1]
    full = F.scaled_dot_product_attention(query, key, value, attn_mask=full_mask, scale=scale, enable_gqa=group > 1)
    stream = F.scaled_dot_product_attention(query, key, value, attn_mask=stream_mask, scale=scale,
                                            enable_gqa=group > 1)
    a = gates.alpha[layer].to(query.dtype).repeat_interleave(group).view(1, -1, 1, 1)
    out = a * full + (1 - a) * stream
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(DUO_NAME, duo_attention)


@dataclass
class DuoResult:
    alpha: torch.Tensor
    """[layers, kv_heads] trained gates in [0, 1]."""
    losses: list[float]
    steps: int
    seq_len: int
    seconds: float


def train_gates(lm: LoadedModel, steps: int = 40, seq_len: int = 1024, n_keys: int = 4, sink: int = 64,
                window: int = 64, lr: float = 0.02, l1: float = 0.05, seed: int = 0, batch: int = 1,
                progress: bool = True, time_limit_s: float | None = None) -> DuoResult:
    """Optimise the gates; every model parameter stays frozen (and is restored to its requires_grad after).

    Each step draws ``batch`` sequences of one length (uniform in ``[3/4 seq_len, seq_len]``) from
    ``probes.gate_sequence``: ``n_keys`` facts in a random haystack, value kind and wording, then every fact
    recalled; the loss is taken on the recall tokens."""
    from headwise.probes import gate_sequence

    spec = lm.spec
    model = lm.model
    decoder = model.get_decoder()  # the transformer without the LM head: its last_hidden_state is what we match
    device = next(model.parameters()).device
    gates = DuoGates(spec.num_layers, spec.num_kv_heads, sink, window).to(device)
    opt = torch.optim.Adam(gates.parameters(), lr=lr)
    rng = random.Random(seed)
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    losses: list[float] = []
    t0 = time.perf_counter()
    done = 0
    try:
        bar = tqdm(range(steps), desc="duo gates", unit="step", disable=not progress)
        for _ in bar:
            length = rng.randint(3 * seq_len // 4, seq_len)
            keys = max(1, min(n_keys, length // 160))  # a fact and its recall take ~40 tokens: leave a haystack
            seqs = [gate_sequence(lm.tokenizer, length, keys, rng) for _ in range(batch)]
            n_recall = min(s.recall_tokens for s in seqs)
            ids = torch.tensor([s.ids for s in seqs], device=device)
            with torch.no_grad():
                ref = decoder(input_ids=ids).last_hidden_state[:, -n_recall:].float()
            with attention_implementation(model, DUO_NAME):
                mixed = decoder(input_ids=ids, headwise_gates=gates).last_hidden_state[:, -n_recall:].float()
            distill = ((mixed - ref) ** 2).sum(-1).mean() / (ref**2).sum(-1).mean()
            loss = distill + l1 * gates.alpha.abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            gates.clamp_()
            losses.append(float(loss.item()))
            done += 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}", mean_alpha=f"{float(gates.alpha.detach().mean()):.2f}")
            if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
                break
    finally:
        for p, s in zip(model.parameters(), saved):
            p.requires_grad_(s)
    return DuoResult(gates.alpha.detach().cpu().clone(), losses, done, seq_len, time.perf_counter() - t0)
