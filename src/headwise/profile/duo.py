"""DuoAttention gate optimisation (Xiao et al., 2024, https://arxiv.org/abs/2410.10819, section 3.2).

One gate ``alpha`` in [0, 1] per (layer, KV head); every model weight is frozen. Each layer's attention output
is ``alpha * full + (1 - alpha) * streaming(sink, window)`` (the gate of a KV head applies to all its query
heads). The gates are trained on synthetic passkey data (long filler with several pass keys, the keys recalled
at the end) with the distillation loss between the last hidden states of the dense model and of the mixed
model on the final recall tokens, plus an L1 push of the gates towards 0. Heads whose gate stays high need
the whole context (retrieval heads); the others can stream.

The mixed attention is the attention function ``"headwise-duo"`` registered in transformers'
``AttentionInterface``; the gates travel as the forward keyword ``headwise_gates`` (an ``nn.Module`` whose
``alpha`` is an ``nn.Parameter`` ``[layers, kv_heads]``).

Where this differs from the paper (to fit a CPU in minutes; the code itself runs on a GPU with larger
settings): the paper trains Llama-scale models on sequences of ~1K-32K tokens for 2,000 steps with
sink 64 / window 256; here the defaults are sequences of 1,024 tokens, sink 16 / window 64 (the same
"window much shorter than the distances to recall" regime, scaled down), 4 pass keys, 40 steps of Adam
(lr 0.05), and the distillation loss is the squared error *relative* to the dense hidden state's squared
norm (so one L1 weight serves models with different hidden scales); lambda = 0.05 on the mean gate.
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

    def __init__(self, num_layers: int, num_kv_heads: int, sink: int = 16, window: int = 64):
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


def passkey_batch(tokenizer: Any, length: int, n_keys: int, rng: random.Random) -> tuple[torch.Tensor, int]:
    """One synthetic sequence: filler with ``n_keys`` pass keys at random depths, then all keys recalled.

    Returns (ids [1, length], recall_tokens): the last ``recall_tokens`` tokens are the recall section the
    loss is computed on.
    """
    keys = [str(rng.randint(10000, 99999)) for _ in range(n_keys)]
    recall = " What are the pass keys? " + " ".join(f"The pass key number {i + 1} is {k}." for i, k in enumerate(keys))
    recall_ids = tokenizer(recall, add_special_tokens=False).input_ids
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    filler_ids = tokenizer(filler, add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room = length - len(bos) - len(recall_ids)
    needles = [tokenizer(f" The pass key number {i + 1} is {k}. Remember it. ", add_special_tokens=False).input_ids
               for i, k in enumerate(keys)]
    n_fill = room - sum(len(n) for n in needles)
    if n_fill < n_keys:
        raise ValueError(f"a sequence of {length} tokens is too short for {n_keys} pass keys")
    fill = (filler_ids * (n_fill // len(filler_ids) + 1))[:n_fill]
    cuts = sorted(rng.sample(range(n_fill), n_keys))
    body: list[int] = []
    prev = 0
    for cut, needle in zip(cuts, needles):
        body += fill[prev:cut] + needle
        prev = cut
    body += fill[prev:]
    ids = bos + body + recall_ids
    return torch.tensor([ids]), len(recall_ids)


@dataclass
class DuoResult:
    alpha: torch.Tensor
    """[layers, kv_heads] trained gates in [0, 1]."""
    losses: list[float]
    steps: int
    seq_len: int
    seconds: float


def train_gates(lm: LoadedModel, steps: int = 40, seq_len: int = 1024, n_keys: int = 4, sink: int = 16,
                window: int = 64, lr: float = 0.05, l1: float = 0.05, seed: int = 0,
                progress: bool = True, time_limit_s: float | None = None) -> DuoResult:
    """Optimise the gates; every model parameter stays frozen (and is restored to its requires_grad after)."""
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
            ids, n_recall = passkey_batch(lm.tokenizer, seq_len, n_keys, rng)
            ids = ids.to(device)
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
