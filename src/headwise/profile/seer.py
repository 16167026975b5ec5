"""Training SeerAttention gates by self-distillation, and measuring what they keep (``policies/seer.py``).

SeerAttention (https://arxiv.org/abs/2410.13276, section 3.2; ``distillation.py`` in its code): the model is frozen;
for every layer, the target is the model's own attention map max-pooled over (block x block) tiles and renormalised
per query block (``block_targets``), and the gate is fitted to it with KL(target || softmax(gate scores)), the first
quarter of the query blocks left out (the authors' code does so "for training stability": early rows see few
blocks). Only the gates learn (Adam). Every global layer's gate trains from one forward of the model per step, so
a step costs one forward plus the gates' own small products.

Data: windows of ``seq_len`` tokens of Shakespeare at random offsets (the paper distils on RedPajama at 64K tokens;
here the profiling text, at the lengths the bundled models profile at). ``gate_recall`` measures the attention mass
a gate's top-k index keeps (``metrics.attention_recall``) and the index's block density on held-out text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from headwise.kernels.prefill_index import density
from headwise.metrics import attention_recall
from headwise.models import LoadedModel
from headwise.policies.seer import LayerGate, Seer, SeerGates
from headwise.profile.probe import QKProbe, probing

ROW_BLOCK = 512
"""Query rows whose attention map is materialised at once for the targets."""


@torch.no_grad()
def block_targets(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    """The distillation target: causal attention of ``q: [B, Hq, L, D]`` over ``k: [B, Hkv, L, D]`` (same positions),
    max-pooled over (block x block) tiles and renormalised per query block: fp32 ``[B, Hq, n, n]``."""
    B, Hq, L = q.shape[:3]
    Hkv = k.shape[1]
    n = -(-L // block_size)
    kf = k.float().repeat_interleave(Hq // Hkv, dim=1)
    out = torch.zeros(B, Hq, n, n, device=q.device)
    rows = max(block_size, ROW_BLOCK // block_size * block_size)
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        s = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale
        causal = torch.arange(L, device=q.device)[None, :] <= torch.arange(r0, r1, device=q.device)[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        p = torch.nn.functional.pad(p, (0, n * block_size - L, 0, -(r1 - r0) % block_size))
        tiles = p.view(B, Hq, -1, block_size, n, block_size).amax(dim=(3, 5))
        out[:, :, r0 // block_size : r0 // block_size + tiles.shape[2]] = tiles
    return out / out.sum(-1, keepdim=True).clamp(min=1e-30)


def distill_loss(gate: LayerGate, q: torch.Tensor, k: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(gate)) summed over key blocks, mean over the rows from the first quarter on."""
    logp = torch.log_softmax(gate.logits(q, k, 0), dim=-1)
    first = target.shape[2] // 4
    t, lp = target[:, :, first:], logp[:, :, first:]
    kl = torch.where(t > 0, t * (torch.log(t.clamp(min=1e-30)) - lp), torch.zeros_like(t))
    return kl.sum(-1).mean()


@dataclass
class GateTraining:
    gates: SeerGates
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def train_gates(lm: LoadedModel, texts: torch.Tensor, steps: int, block_size: int = 64, hidden: int | None = None,
                lr: float = 1e-3, seed: int = 0, progress: bool = True, time_limit_s: float | None = None,
                gates: SeerGates | None = None) -> GateTraining:
    """Fit a gate per global layer to the model's block attention maps on ``texts: [N, L]`` token ids (step ``s``
    uses row ``s % N``). Starts from ``gates`` or a random init (``SeerGates.init``)."""
    spec = lm.spec
    layers = [i for i in range(spec.num_layers) if spec.native_window(i) is None]
    device = next(lm.model.parameters()).device
    if gates is None:
        gates = SeerGates.init(layers, spec.num_q_heads, spec.num_kv_heads, spec.head_dim, block_size, hidden, seed)
    gates = gates.on(device)
    params = [w for g in gates.layers.values() for w in (g.wq, g.wk)]
    for w in params:
        w.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    probe = QKProbe(set(layers))
    out = GateTraining(gates)
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc="SeerAttention gates", unit="step", disable=not progress):
        ids = texts[step % texts.shape[0]][None].to(device)
        with torch.inference_mode(), probing(lm.model):
            lm.model(input_ids=ids, headwise_probe=probe, use_cache=False, logits_to_keep=1)
        opt.zero_grad()
        loss = torch.zeros((), device=device)
        for i in layers:
            q, k, scale = probe.qk[i]
            q, k = q.clone(), k.clone()  # out of inference mode, so autograd may use them
            loss = loss + distill_loss(gates.layers[i], q, k, block_targets(q, k, scale, block_size))
        (loss / len(layers)).backward()
        opt.step()
        out.losses.append(float(loss.detach()) / len(layers))
        out.steps = step + 1
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            break
    for w in params:
        w.requires_grad_(False)
    out.seconds = time.perf_counter() - t0
    gates.info.update(steps=out.steps, seq_len=int(texts.shape[1]), lr=lr, first_loss=out.losses[0],
                      last_loss=out.losses[-1], seconds=round(out.seconds, 2))
    return out


@torch.no_grad()
def gate_recall(lm: LoadedModel, gates: SeerGates, ids: torch.Tensor, topk: int) -> dict[int, tuple[float, float]]:
    """Per gated layer: (attention recall, block density) of ``Seer(topk)``'s index on ``ids: [1, L]``, recall the mean
    over the layer's query heads."""
    probe = QKProbe(set(gates.layers))
    device = next(lm.model.parameters()).device
    with torch.inference_mode(), probing(lm.model):
        lm.model(input_ids=ids.to(device), headwise_probe=probe, use_cache=False, logits_to_keep=1)
    pol = Seer(topk=topk, block_size=gates.block_size)
    out = {}
    for i, gate in gates.on(device).layers.items():
        q, k, scale = probe.qk[i]
        idx, count = pol.build_index(q, k, 0, scale, gate=gate)
        rec = attention_recall(q, k, (idx, count, gates.block_size), scale, q_offset=0)
        out[i] = (float(rec.mean()), density(count, gates.block_size, q.shape[2], k.shape[2]))
    return out


def profile_texts(lm: LoadedModel, seq_len: int, n: int, offset: int = 0) -> torch.Tensor:
    """``[n, seq_len]`` token ids: consecutive windows of Shakespeare starting ``offset`` windows in."""
    from headwise.data import shakespeare

    need = (n + offset) * seq_len
    ids = lm.tokenizer(shakespeare(need * 6), return_tensors="pt").input_ids[0]
    if ids.shape[0] < need:
        raise ValueError(f"profiling text has {ids.shape[0]} tokens, {need} needed")
    return ids[offset * seq_len : need].view(n, seq_len)
