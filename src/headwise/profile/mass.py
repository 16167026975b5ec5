"""Sink and locality mass per query head, and how much attention mass elastic streaming spans keep.

Over real text (Shakespeare), for queries near several lengths ``N`` (the last ``BIN`` queries before ``N``):

* ``sink``: attention share on the first ``SINK_TOKENS`` tokens (StreamingLLM's attention sinks);
* ``local``: share on the recent ``LOCAL_WINDOW`` tokens (the query's own included; the first 64 tokens excluded);
* ``span_recall[option, bin]``: share kept by ``streaming(sink, window)`` for each elastic span option ``(a, b)``
  of ``SPAN_OPTIONS`` (MoA's span = a + b*N, https://arxiv.org/abs/2406.14909).

Which window an option stands for: a plan stores fixed windows, chosen for a target length ``T``
(``solver.py``), so the recall that the solver trades against cost must be measured with the window the plan
will hold, ``a + b*T``, over queries spread across the whole ``[0, T)`` (``mass_scores(..., target_len=T)``:
eight bins up to ``T``). Measuring ``a + b*N`` at short profiling lengths ``N`` instead credits an option
with the recall of a smaller window than it costs (what the first version did; docs/profiling.md shows what
that cost in next-token agreement). Without ``target_len`` the probe measures ``a + b*N`` per bin (MoA's own
profile, used to look at how spans should scale).

* ``span_error[kv_head, option]`` (with ``target_len`` and a model whose attention has ``o_proj``): what the
  window does to the layer's output. For each KV head, the attention output of its query heads restricted to
  the option's sink + window (softmax renormalised over the kept keys, as the ``streaming`` policy computes
  it), pushed through their slice of ``o_proj``, minus the dense one: the squared norm of that change in the
  residual stream, summed over the bins' queries and divided by the squared norm of the layer's whole
  attention output over the same queries. Mass is a poor proxy for this: a head that spreads its attention
  over similar values loses mass under a window but barely changes its output, and a head whose ``o_proj``
  slice is small hardly matters. Measured on SmolLM2 at 4K (docs/profiling.md): spans picked by this error
  beat uniform streaming on next-token agreement at equal memory; spans picked by mass did not.

* ``layer_sensitivity``: the output error is relative to its own layer, and layers differ in how much the
  model's prediction moves when their attention changes. So each layer is calibrated once end to end: the KL
  from dense of the next-token distribution when that layer alone streams (``CALIB_WINDOW``), over the same
  text, divided by the summed ``span_error`` of that window in the layer, gives the layer's KL per unit of
  error; every span error of the layer is scaled by it (``weighted_span_error``). On SmolLM2 this factor
  ranges over more than 10x between layers (docs/profiling.md). The solver then minimises a predicted total KL.

* ``quant_error[kv_head, (key bits, value bits)]``: the same relative output error, for a head whose keys and
  values are held as KIVI codes (``QUANT_PROBE``, group ``Quantized.group``, residual ``QUANT_PROBE_RESIDUAL``):
  the keys of each bin older than its first query's residual are quantized and dequantized as the store does
  (``policies.quantized.fake_quantize``), the weights recomputed from them and the output from the quantized
  values. Weighted by the same per-layer KL factor (``weighted_span_error(..., other=)``), it puts every quantized
  option on the spans' scale. Recorded in a plan's meta (``quant_error_kv``), not traded by the solver (whole heads
  are chosen by score, ``solver.py``): on SmolLM2 at 2K it does not see what 2-bit values cost passkeys
  (docs/quality.md).

The solver trades ``1 - weighted span_error`` (else the mass recall) against cost; ``1 - recall`` of the default
streaming span is the ``mass`` head score (what a head loses if it streams).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from headwise.models import LoadedModel
from headwise.policies import Full, Policy, Quantized, Streaming
from headwise.policies.quantized import fake_quantize
from headwise.profile.probe import Probe, Rescore, probing
from headwise.profile.select import text_kl

SINK_TOKENS = 4
"""StreamingLLM's 4 initial tokens."""
LOCAL_WINDOW = 256
"""Recent window for the locality score (DuoAttention's streaming window)."""
STREAM_SINK = 64
"""Sink kept by the streaming options searched (DuoAttention's 64)."""
SPAN_OPTIONS: tuple[tuple[int, float], ...] = tuple(
    (a, b) for a in (64, 128, 256, 512) for b in (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
)
"""(a, b) of window = a + b*N: fixed windows (b = 0) and windows growing with the input length."""
QUANT_PROBE: tuple[tuple[int, int], ...] = ((2, 2), (4, 2), (4, 4), (8, 4), (8, 8))
"""(key bits, value bits) of the quantized options whose output error the probe measures (every option the
solver's menus offer, ``solver.QUANT_OPTIONS`` and ``TWO_BIT_OPTIONS``)."""
QUANT_PROBE_RESIDUAL = 64
"""Full-precision residual of the measured quantized options: the shortest a shipped menu uses (``--quant-residual
64``); a longer residual keeps more recent tokens exact, so it errs no more than this."""
QUANT_GROUP = Quantized().group
"""KIVI's group of the measured options (``Quantized``'s default, as every menu's)."""
CALIB_WINDOW = 256
"""Window of the streaming span that ``layer_sensitivity`` applies to one layer at a time."""
BIN = 128
"""Queries per length bin (the ``BIN`` positions just before ``N``)."""


def span_window(option: tuple[int, float], n: int) -> int:
    a, b = option
    return round(a + b * n)


def streaming_option(native: int | None, window: int) -> Streaming:
    """The streaming policy a span of ``window`` tokens stands for: sink 64 + window on a global layer; on a layer
    with a native sliding window (trained without sinks) the same slots as one window, no sink."""
    return Streaming(sink=0, window=window + STREAM_SINK) if native is not None else Streaming(sink=STREAM_SINK,
                                                                                               window=window)


class MassProbe(Probe):
    """Accumulates, per layer and query head, the mass statistics for queries in each length bin."""

    def __init__(self, num_layers: int, num_q_heads: int, bins: Sequence[int], target_len: int | None = None,
                 num_kv_heads: int | None = None, layer_windows: Sequence[int | None] = ()):
        self.bins = list(bins)
        self.target_len = target_len
        """If set, option ``(a, b)`` is measured with the window ``a + b*target_len`` in every bin."""
        self.sink = torch.zeros(num_layers, num_q_heads, len(self.bins))
        self.local = torch.zeros_like(self.sink)
        self.recall = torch.zeros(num_layers, num_q_heads, len(SPAN_OPTIONS), len(self.bins))
        self.count = torch.zeros(num_layers, len(self.bins))
        # output error of each window (needs target_len: the windows are those of the plan)
        self.wants_values = target_len is not None and num_kv_heads is not None
        self.num_kv_heads = num_kv_heads or num_q_heads
        self.layer_windows = list(layer_windows)
        self.windows = sorted({span_window(o, target_len) for o in SPAN_OPTIONS}) if target_len else []
        self.err = torch.zeros(num_layers, self.num_kv_heads, len(self.windows))
        self.out_norm = torch.zeros(num_layers)
        self.quant_err = torch.zeros(num_layers, self.num_kv_heads, len(QUANT_PROBE))
        self.quant_seen = False

    def rows(self, layer: int, q_len: int) -> slice | None:
        first = self.q_start
        lo = max(0, min(b - BIN for b in self.bins) - first)
        return slice(lo, q_len) if lo < q_len else None

    def observe(self, layer: int, weights: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> None:
        # weights: [B, Hq, Lq, S]; sums over batch and queries of each bin
        is_sink = k_pos < STREAM_SINK
        for i, n in enumerate(self.bins):
            sel = (q_pos >= n - BIN) & (q_pos < n)
            if not bool(sel.any()):
                continue
            w = weights[:, :, sel]  # [B, Hq, l, S]
            qp = q_pos[sel]
            self.sink[layer, :, i] += w[..., k_pos < SINK_TOKENS].sum(dim=(0, 2, 3)).cpu()
            # mass by distance d = q - k of the non-sink keys: by_dist[..., d]; then windows are prefix sums
            rest = w.masked_fill(is_sink, 0)
            dmax = int(qp.max() - k_pos[0]) + 1
            d = torch.arange(dmax, device=w.device)
            idx = (qp[:, None] - k_pos[0]) - d[None, :]  # [l, dmax] key index at distance d
            valid = idx >= 0
            by_dist = rest.gather(-1, idx.clamp(min=0).expand(*rest.shape[:2], -1, -1)) * valid
            cum = by_dist.sum(dim=(0, 2)).cumsum(-1)  # [Hq, dmax]
            sink_mass = w[..., is_sink].sum(dim=(0, 2, 3))
            self.local[layer, :, i] += cum[:, min(LOCAL_WINDOW, dmax) - 1].cpu()
            for o, option in enumerate(SPAN_OPTIONS):
                win = min(span_window(option, self.target_len or n), dmax)
                self.recall[layer, :, o, i] += (sink_mass + cum[:, win - 1]).cpu()
            self.count[layer, i] += float(w.shape[0] * w.shape[2])

    def observe_values(self, layer: int, weights: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, module: torch.nn.Module, keys: torch.Tensor | None = None,
                       rescore: Rescore | None = None) -> None:
        o_proj = getattr(module, "o_proj", None)
        if not isinstance(getattr(o_proj, "weight", None), torch.Tensor):
            self.wants_values = False  # no o_proj to measure through: the solver falls back to mass recall
            return
        B, Hq, _, D = weights.shape[0], weights.shape[1], weights.shape[2], values.shape[-1]
        H = self.num_kv_heads
        w_o = o_proj.weight.float().view(-1, Hq, D)  # [hidden, Hq, D]: each query head's slice of o_proj
        native = self.layer_windows[layer] if layer < len(self.layer_windows) else None
        policies = [streaming_option(native, win) for win in self.windows]
        coded: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # each QUANT_PROBE option's keys and values
        v_kv = values[:, :: Hq // H]  # [B, H, S, D]: each KV head's values (the first query head of its group)

        def error(out: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
            """[H] squared norm of the change ``out - dense`` makes in the residual stream, per KV head."""
            res = torch.einsum("bhld,ehd->bhle", out - dense, w_o)  # [B, Hq, l, hidden]
            res = res.view(B, H, Hq // H, *res.shape[2:]).sum(2)  # a KV head's query heads act together
            return res.pow(2).sum(dim=(0, 2, 3)).cpu()

        for n in self.bins:
            sel = (q_pos >= n - BIN) & (q_pos < n)
            if not bool(sel.any()):
                continue
            w = weights[:, :, sel]  # [B, Hq, l, S]
            dense = w @ values  # [B, Hq, l, D]
            self.out_norm[layer] += torch.einsum("bhld,ehd->ble", dense, w_o).pow(2).sum().cpu()
            for a, policy in enumerate(policies):
                kept = w * policy.allowed(q_pos[sel][:, None], k_pos[None, :])  # the keys the policy keeps
                out = (kept @ values) / kept.sum(-1, keepdim=True).clamp(min=1e-30)
                self.err[layer, :, a] += error(out, dense)
            if keys is None or rescore is None:
                continue
            self.quant_seen = True
            if coded is None:
                coded = self._coded(keys, v_kv)
            # the keys already held as codes when the bin's first query is decoded: whole groups, oldest first
            cut = max(0, int(q_pos[sel][0]) + 1 - QUANT_PROBE_RESIDUAL - int(k_pos[0])) // QUANT_GROUP * QUANT_GROUP
            if cut == 0:
                continue
            for o, (kq, vq) in enumerate(coded):
                k = torch.cat([kq[:, :, :cut], keys[:, :, cut:]], dim=2)
                v = torch.cat([vq[:, :, :cut], v_kv[:, :, cut:]], dim=2).repeat_interleave(Hq // H, dim=1)
                self.quant_err[layer, :, o] += error(rescore(k, sel) @ v, dense)

    @staticmethod
    def _coded(keys: torch.Tensor, values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each ``QUANT_PROBE`` option's dequantized keys and values ``[B, Hkv, n, D]`` of the whole groups of
        ``keys, values: [B, Hkv, S, D]`` (a group's codes depend on its own tokens only)."""
        n = keys.shape[2] // QUANT_GROUP * QUANT_GROUP
        return [fake_quantize(keys[:, :, :n], values[:, :, :n], Quantized(bits=vb, key_bits=kb))
                for kb, vb in QUANT_PROBE]

    def quant_error(self) -> torch.Tensor | None:
        """[layers, kv_heads, len(QUANT_PROBE)] relative output error of each quantized option (None if not
        measured)."""
        if not self.wants_values or not self.quant_seen or not bool((self.out_norm > 0).all()):
            return None
        return self.quant_err / self.out_norm[:, None, None]

    def span_error(self) -> torch.Tensor | None:
        """[layers, kv_heads, len(SPAN_OPTIONS)] relative output error of each option's window (None if not measured)."""
        if not self.wants_values or not self.windows or not bool((self.out_norm > 0).all()):
            return None
        rel = self.err / self.out_norm[:, None, None]
        return torch.stack([rel[:, :, self.windows.index(span_window(o, self.target_len or 0))]
                            for o in SPAN_OPTIONS], dim=-1)


@dataclass
class MassResult:
    bins: list[int]
    sink: torch.Tensor
    """[layers, q_heads] share of attention on the first SINK_TOKENS tokens (mean over bins)."""
    local: torch.Tensor
    """[layers, q_heads] share on the last LOCAL_WINDOW tokens (mean over bins)."""
    span_recall: torch.Tensor
    """[layers, q_heads, len(SPAN_OPTIONS), len(bins)] share kept by each elastic streaming span."""
    span_error: torch.Tensor | None = None
    """[layers, kv_heads, len(SPAN_OPTIONS)] relative output error of each span at the target length, or None."""
    quant_error: torch.Tensor | None = None
    """[layers, kv_heads, len(QUANT_PROBE)] relative output error of each quantized option, or None."""

    def streaming_loss(self, window: int = LOCAL_WINDOW) -> torch.Tensor:
        """[layers, q_heads] mass lost by ``streaming(STREAM_SINK, window)`` at the longest bin."""
        o = SPAN_OPTIONS.index((window, 0.0)) if (window, 0.0) in SPAN_OPTIONS else 0
        return 1 - self.span_recall[:, :, o, -1]


def mass_scores(lm: LoadedModel, length: int = 2048, bins: Sequence[int] | None = None, chunk: int = 1024,
                progress: bool = True, target_len: int | None = None) -> MassResult:
    """Run ``length`` tokens of Shakespeare through the probe and collect the mass statistics.

    With ``target_len`` the span recalls are those of the windows a plan for ``target_len`` holds, and the
    default bins are eight, centred in eighths of ``length`` (every query position counts alike in next-token
    agreement, so the recall should too)."""
    spec = lm.spec
    if bins is None:
        bins = ([min(length, (2 * k + 1) * length // 16 + BIN // 2) for k in range(8)] if target_len
                else [length // 4, length // 2, length])
    bins = sorted(b for b in bins if b >= BIN)
    ids = text_for_profile(lm, length)
    probe = MassProbe(spec.num_layers, spec.num_q_heads, bins, target_len, spec.num_kv_heads, spec.layer_windows)
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    device = next(lm.model.parameters()).device
    with torch.inference_mode(), probing(lm.model):
        for s in tqdm(range(0, length, chunk), desc="sink/locality mass", unit="chunk", disable=not progress):
            probe.q_start = s
            part = ids[:, s : s + chunk].to(device)
            pos = torch.arange(s, s + part.shape[1], device=device)[None]
            lm.model(input_ids=part, position_ids=pos, past_key_values=cache, use_cache=True,
                     headwise_probe=probe, logits_to_keep=1)
    count = probe.count.clamp(min=1)
    sink = (probe.sink / count[:, None]).mean(-1)
    local = (probe.local / count[:, None]).mean(-1)
    recall = probe.recall / count[:, None, None]
    return MassResult(bins, sink, local, recall, probe.span_error(), probe.quant_error())


def text_for_profile(lm: LoadedModel, length: int) -> torch.Tensor:
    """``[1, length]`` ids of the profiling text (Shakespeare from the start of Hamlet)."""
    from headwise.data import shakespeare

    return lm.tokenizer(shakespeare(length * 8), return_tensors="pt").input_ids[:, :length]


@torch.inference_mode()
def layer_sensitivity(lm: LoadedModel, length: int, window: int = CALIB_WINDOW, progress: bool = True,
                      max_positions: int = 1024) -> torch.Tensor:
    """[layers] mean KL(dense || plan) in nats of the next-token distribution, where the plan streams every KV
    head of one layer (``window``, the solver's option for it) and keeps the others full; over ``length`` tokens of
    the profiling text, at up to ``max_positions`` evenly spaced positions (memory: vocabulary x positions)."""
    from headwise.engine import Engine
    from headwise.plan import HeadPlan

    spec = lm.spec
    ids = text_for_profile(lm, length)
    positions = torch.arange(0, ids.shape[1], max(1, ids.shape[1] // max_positions))
    dense = Engine(lm).logits(ids, positions).float().log_softmax(-1)
    kl = torch.zeros(spec.num_layers)
    for layer in tqdm(range(spec.num_layers), desc="layer sensitivity", unit="layer", disable=not progress):
        native = spec.native_window(layer)
        if native is not None and window + STREAM_SINK >= min(native, length):
            continue  # the option keeps the whole native window: nothing to measure
        pols: list[list[Policy]] = [[Full()] * spec.num_kv_heads for _ in range(spec.num_layers)]
        pols[layer] = [streaming_option(native, window)] * spec.num_kv_heads
        out = Engine(lm, HeadPlan.from_policies(spec, pols, lm.name)).logits(ids, positions).float().log_softmax(-1)
        kl[layer] = max(0.0, text_kl(dense, out))
    return kl


def weighted_span_error(span_error: torch.Tensor, layer_kl: torch.Tensor, window: int = CALIB_WINDOW,
                        other: torch.Tensor | None = None) -> torch.Tensor:
    """Scale each layer's span errors [layers, kv_heads, options] by its KL per unit of error (the calibration
    window's error summed over the layer's heads); a layer whose calibration error is zero keeps weight 0. With
    ``other`` (errors [layers, kv_heads, k] on the same relative scale, e.g. ``quant_error``), ``other`` is scaled
    by the same factors instead."""
    calib = span_error[:, :, SPAN_OPTIONS.index((window, 0.0))].sum(-1)
    per_unit = torch.where(calib > 1e-12, layer_kl / calib.clamp(min=1e-12), torch.zeros_like(layer_kl))
    return (span_error if other is None else other) * per_unit[:, None, None]
