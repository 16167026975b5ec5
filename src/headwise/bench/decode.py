"""Decode attention benchmark (CUDA) and decode fidelity on a real model (CPU or CUDA).

Regime: one decode step (one new token per sequence) of one attention layer of Llama-3-8B (32 query / 8 KV
heads, head_dim 128, bf16) over a long cache. Decode attention is memory-bound: it reads every K/V byte it
attends once, so the speed-up of a sparse pattern is bounded by the share of K/V bytes it reads, and fixed
costs (kernel launches, page selection) matter at batch 1.

Workloads (random Gaussian q/k/v; page selection is data-driven, so on random keys its picks are arbitrary but
its cost is the real one):
- ``dense``: ``F.scaled_dot_product_attention`` over the whole cache, in two forms (``enable_gqa`` with one
  query row per head, and the GQA-packed form with the 4 query heads of a KV head as 4 query rows); the
  faster one is the baseline. FlexAttention (compiled) over the same cache, without a mask.
- ``plan_a``: KV heads 0-1 full (25% of heads, their cache at full length), KV heads 2-7 streaming (sink 64 +
  window 1024, their cache a 1088-slot ring buffer, as ``HeadwiseCache`` stores them): our kernel over all
  pages of both groups in one launch (``second=``; also timed as one call per group). FlexAttention gets the
  same mask over a dense cache (it skips masked blocks).
- ``page_topk``: every KV head Quest with a 4096-token budget over the full cache: Triton page scoring (from
  the page bounds ``PagedStore`` keeps), then either our kernel selecting the top pages itself
  (``topk_sparse_decode``) or Triton top-k + our kernel, whichever tunes faster at that batch size, all
  included in the time (also timed: the other path, the three-kernel path with ``torch.topk``, the parts).
  Our kernels' settings are tuned per batch size first (``TUNING``; every candidate's time is in the results).
- ``page_topk_e4m3``: the same with the page bounds in 8 bits (``PageTopK(bounds="e4m3")``, ``quantize_bounds``):
  half the bytes the scoring kernel reads; tuned separately.

Timing: each measurement is the median over repetitions of CUDA-event-timed calls after warm-up, with the
L2 cache flushed before each repetition (a decode step's K/V are not in L2: other layers ran in between) by
reading a 256 MB buffer, so L2 holds clean lines, as after the weight reads of a real layer. The headline rows
are also timed after a writing flush (``l2_flush: "write"`` rows, the method before 2026-11-23c), which leaves
L2 full of dirty lines the timed kernel must write back: 6-10 us more per step, dense and sparse alike, on an
H100 (bench/results/decode_explore2_2026-11-23.json), which weighs more on the short sparse steps.
"eager" times include Python launch overhead as a plain PyTorch loop pays it; "graph" times replay the same
work captured in a CUDA graph, as serving engines run decode. Also: ours vs reference max error on the GPU at
the benchmark shapes, and the KV bytes a real ``HeadwiseCache`` holds for a 32K-token prompt under plan_a.

``decode_logits`` + ``agreement`` measure fidelity instead: top-1 next-token agreement with dense over teacher-forced
decode steps of a real model (``bench/decode_quality.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from headwise.bench.timing import Timer
from headwise.policies.stores import quantize_bounds

HQ, HKV, D = 32, 8, 128  # Llama-3-8B attention
GROUP = HQ // HKV


def _both(timer: Timer, fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        out: dict[str, Any] = {"eager_ms": timer.eager(fn)}
    except Exception as exc:  # a workload that fails is reported in the results, the others still run
        return {"error": repr(exc)[:300]}
    try:
        out["graph_ms"] = timer.graph(fn)
    except RuntimeError as exc:  # a path that cannot be captured is reported, not hidden
        out["graph_ms"] = float("nan")
        out["graph_error"] = str(exc).splitlines()[0][:200]
    return out


# ------------------------------------------------------------------------------------------------ workloads
def page_bounds(k: torch.Tensor, page_size: int) -> torch.Tensor:
    """What ``PagedStore`` holds for a full cache: [B, H, S / page, 2, D] min/max keys per page."""
    B, H, S, Dh = k.shape
    pages = k.view(B, H, S // page_size, page_size, Dh)
    return torch.stack([pages.amin(dim=3), pages.amax(dim=3)], dim=3).contiguous()


def random_decode_layer(batch: int, seq_len: int, page_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """One layer's random bf16 decode inputs on CUDA, ``q [B, HQ, D]``, ``k, v [B, HKV, S, D]``, and what a
    ``PagedStore`` holds for them: exact page bounds, and their e4m3 codes and scales (``bounds="e4m3"``)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, HKV, seq_len, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, HKV, seq_len, D, device="cuda", dtype=torch.bfloat16, generator=g)
    bounds = page_bounds(k, page_size)
    codes, scales = quantize_bounds(bounds)
    return q, k, v, bounds, codes, scales


def ring_cache(k: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """A streaming head's store after the whole cache was written: sinks + the last ``window`` tokens (ring
    order does not matter to decode attention)."""
    return torch.cat([k[:, :, :sink], k[:, :, -window:]], dim=2).contiguous()


def plan_a_fn(q, k_full, v_full, k_ring, v_ring, seq_len: int, full_kv: int, one_launch: bool = True, **tuning):
    """One layer's decode under plan_a (query heads of the full KV heads first, as the group order is):
    both groups in one launch (``second=``), or one kernel call per group writing its slice of the output."""
    from headwise.kernels.paged_decode import sparse_decode

    n_full_q = full_kv * GROUP
    q_full, q_stream = q[:, :n_full_q], q[:, n_full_q:]
    ring_len = k_ring.shape[2]

    def run() -> torch.Tensor:
        if one_launch:
            return sparse_decode(q, k_full, v_full, seq_len, None, page_size=64, second=(k_ring, v_ring, ring_len),
                                 **tuning)
        out = torch.empty_like(q)
        sparse_decode(q_full, k_full, v_full, seq_len, None, page_size=64, out=out[:, :n_full_q], **tuning)
        sparse_decode(q_stream, k_ring, v_ring, ring_len, None, page_size=64, out=out[:, n_full_q:], **tuning)
        return out

    return run


def page_topk_fn(q, k, v, bounds, seq_len: int, budget: int, page_size: int, stop: str = "",
                  fused: bool = True, topk_kernel: bool = True, block_p: int = 64, score_warps: int = 4,
                  select_bins: int = 0, scales: torch.Tensor | None = None, **tuning):
    """One layer's Quest decode step: Triton page scores, then either (``fused``) our kernel choosing the top
    pages itself and merging its splits (two launches in all), or top-k (Triton, or ``torch.topk`` with
    ``topk_kernel=False``) + our kernel over the chosen pages + the split merge. ``stop`` = "scores" or "topk"
    ends early, to time the parts; ``block_p``/``score_warps`` tune the scoring kernel, ``select_bins`` (0 =
    bisection, else the histogram selection with that many bins) the Triton top-k, ``scales`` means ``bounds``
    are 8-bit codes (``quantize_bounds``), ``tuning`` ours."""
    from headwise.kernels.paged_decode import sparse_decode, topk_sparse_decode
    from headwise.kernels.quest import quest_page_scores, select_pages

    n_pages = seq_len // page_size
    k_pages = budget // page_size

    def run() -> torch.Tensor:
        scores = quest_page_scores(q, bounds, n_pages, block_p=block_p, num_warps=score_warps, scales=scales)
        if stop == "scores":
            return scores
        if fused:
            return topk_sparse_decode(q, k, v, seq_len, scores, k_pages, page_size, select_bins=select_bins,
                                      **tuning)
        table = select_pages(scores, k_pages, use_kernel=topk_kernel, bins=select_bins)
        if stop == "topk":
            return table
        return sparse_decode(q, k, v, seq_len, table, None, page_size, **tuning)

    return run


def check_errors(seq_len: int, budget: int, page_size: int, full_kv: int, sink: int, window: int,
                 device: str = "cuda") -> dict[str, Any]:
    """Ours vs an fp32 reference at the benchmark shapes (batch 1), next to PyTorch-in-bf16's error."""
    from headwise.kernels.decode_reference import quest_page_scores_reference, sparse_decode_reference
    from headwise.kernels.paged_decode import sparse_decode
    from headwise.kernels.quest import quest_page_scores, select_pages

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, HQ, D, device=device, generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, seq_len, D, device=device, generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, HKV, seq_len, D, device=device, generator=g, dtype=torch.bfloat16)
    out: dict[str, Any] = {"seq_len": seq_len}

    def errs(name: str, ours: torch.Tensor, args: tuple, kw: dict) -> None:
        ref = sparse_decode_reference(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args), **kw)
        pt = sparse_decode_reference(*args, **kw)
        out[f"{name}_max_abs_err_ours"] = (ours.float() - ref).abs().max().item()
        out[f"{name}_max_abs_err_torch_bf16"] = (pt.float() - ref).abs().max().item()

    # Dense over all pages (the full heads' path), several splits.
    errs("all_pages", sparse_decode(q, k, v, seq_len, None, page_size=64), (q, k, v, seq_len), {"page_size": 64})
    # plan_a streaming group over its ring buffer.
    n_full_q = full_kv * GROUP
    kr, vr = ring_cache(k[:, full_kv:], sink, window), ring_cache(v[:, full_kv:], sink, window)
    errs("ring", sparse_decode(q[:, n_full_q:], kr, vr, sink + window, None, page_size=64),
         (q[:, n_full_q:], kr, vr, sink + window), {"page_size": 64})
    # plan_a in one launch: both groups against their references.
    one = sparse_decode(q, k[:, :full_kv], v[:, :full_kv], seq_len, None, page_size=64, second=(kr, vr, sink + window))
    ref_full = sparse_decode_reference(q[:, :n_full_q].float(), k[:, :full_kv].float(), v[:, :full_kv].float(), seq_len,
                                       page_size=64)
    ref_ring = sparse_decode_reference(q[:, n_full_q:].float(), kr.float(), vr.float(), sink + window, page_size=64)
    out["plan_a_one_launch_max_abs_err_ours"] = max((one[:, :n_full_q].float() - ref_full).abs().max().item(),
                                                    (one[:, n_full_q:].float() - ref_ring).abs().max().item())
    # page_topk: the same table for ours and the reference (scores compared separately).
    bounds = page_bounds(k, page_size)
    n_pages = seq_len // page_size
    scores = quest_page_scores(q, bounds, n_pages)
    scores_ref = quest_page_scores_reference(q, bounds, n_pages)
    finite = torch.isfinite(scores_ref)
    out["quest_score_max_rel_err"] = ((scores - scores_ref).abs()[finite] / scores_ref.abs()[finite].clamp(min=1)).max().item()
    table = select_pages(scores, budget // page_size, use_kernel=True)
    table_ref = torch.topk(scores_ref, budget // page_size, dim=-1).indices
    same = [len(set(a.tolist()) & set(b.tolist())) / a.numel() for a, b in zip(table[0], table_ref[0])]
    out["quest_selection_overlap"] = min(same)
    perm = table[..., torch.randperm(table.shape[-1], device=device)]  # any order must give the same answer
    errs("page_topk", sparse_decode(q, k, v, seq_len, perm, None, page_size), (q, k, v, seq_len, perm),
         {"page_size": page_size})
    return out


def kv_bytes_plan_a(seq_len: int = 32768, full_kv: int = 2, sink: int = 64, window: int = 1024,
                    device: str = "cuda") -> dict[str, Any]:
    """KV bytes a real ``HeadwiseCache`` holds after a ``seq_len``-token prompt under plan_a (Llama-3-8B, all
    32 layers), filled by committing random K/V chunks to every group's store as attention does."""
    from headwise.cache import HeadwiseCache
    from headwise.plan import HeadPlan
    from headwise.policies import Full, Streaming
    from headwise.spec import ModelSpec

    spec = ModelSpec("llama", 32, HQ, HKV, D, 131072, (None,) * 32)
    row = [Full()] * full_kv + [Streaming(sink=sink, window=window)] * (HKV - full_kv)
    plan = HeadPlan.from_policies(spec, [list(row) for _ in range(spec.num_layers)], name="llama-3-8b-plan-a")
    cache = HeadwiseCache(spec, plan, device=device, dtype=torch.bfloat16, batch=1)
    cache.reserve(seq_len)
    chunk = 8192
    data = torch.randn(1, HKV, chunk, D, device=device, dtype=torch.bfloat16)
    for layer in cache.layers:
        for grp in layer.groups:
            store = cache._ensure_store(grp)
            part = data[:, : len(grp.kv_heads)]
            for start in range(0, seq_len, chunk):
                n = min(chunk, seq_len - start)
                store.append(part[:, :, :n], part[:, :, :n])
    held = cache.kv_bytes()
    dense = spec.dense_kv_bytes(seq_len, 2)
    return {"seq_len": seq_len, "plan": plan.summary(spec, seq_len), "kv_bytes": held, "dense_kv_bytes": dense,
            "fraction": held / dense, "plan_kv_fraction": plan.kv_fraction(spec, seq_len)}


def run_decode_bench(
    seq_len: int = 131072,
    batches: tuple[int, ...] = (1, 4),
    budget: int = 4096,
    page_size: int = 16,
    full_kv: int = 2,
    sink: int = 64,
    window: int = 1024,
    flex: bool = True,
    tune: bool = True,
    kv_len: int = 32768,
    flex_deadline_s: float = 170.0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every measurement on the current CUDA device; one dict per row (``section``: check, kv, time)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the decode benchmark needs a CUDA GPU")
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    for section, fn in (("check", lambda: check_errors(seq_len, budget, page_size, full_kv, sink, window)),
                        ("kv", lambda: kv_bytes_plan_a(kv_len, full_kv, sink, window))):
        try:
            row = {"section": section, **fn()}
        except Exception as exc:  # keep the other measurements; the failure is in the results
            row = {"section": section, "error": repr(exc)[:300]}
        results.append(row)
        log(f"{section}: {row}")
        torch.cuda.empty_cache()
    timer = Timer("read")
    timer_w = Timer("write")
    flex_fn = None
    if flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex_fn = torch.compile(flex_attention, dynamic=False)
        except Exception as exc:  # reported in the results, never silent
            results.append({"section": "flex", "error": repr(exc)[:300]})
    tuning: dict[int, dict[str, dict[str, int]]] = {}
    for batch in batches:
        results += _time_batch(timer, flex_fn, batch, seq_len, budget, page_size, full_kv, sink, window, tune,
                               tuning, log, t0, flex_deadline_s, timer_w)
        torch.cuda.empty_cache()
    results.append({"section": "meta", "wall_s": round(time.perf_counter() - t0, 1), "budget": budget,
                    "page_size": page_size, "full_kv_heads": full_kv, "sink": sink, "window": window,
                    "score_tuning": SCORE_TUNING, "tuning": tuning})
    return results


# Candidate settings of our kernels, timed per batch size (CUDA-graph time) before the timed rows; the best
# is used. plan_a: the tile/occupancy knobs of ``sparse_decode`` (the last-program merge, ``fused_merge=1``,
# measured slower here: it lowers occupancy). page_topk: ``fused`` = the selection inside the attention
# kernel (score -> attend -> merge), else the three-kernel path (score -> Triton top-k -> attend -> merge).
# A top-k threshold search two bits per reduction measured no faster (bench_2026-11-23c.json's tune rows with
# ``radix4``, at 07ce7fb) and was removed. ``select_bins``: the histogram selection (``_top_k_mask_hist``);
# 256 bins saved ~1 us at batch 1 in exploration (decode_explore3_2026-11-23.json), 1024-2048 bins were slower
# than bisection (Triton's histogram gets slower with the bin count).
TUNING = {
    "plan_a": [
        {"tokens_per_iter": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 2},
        {"tokens_per_iter": 64, "num_warps": 4, "num_stages": 3, "programs_per_sm": 2},
        {"tokens_per_iter": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4},
        {"tokens_per_iter": 128, "num_warps": 4, "num_stages": 2, "programs_per_sm": 2},
        {"tokens_per_iter": 128, "num_warps": 4, "num_stages": 3, "programs_per_sm": 2},
        {"tokens_per_iter": 128, "num_warps": 8, "num_stages": 3, "programs_per_sm": 2},
    ],
    "page_topk": [  # also the candidates of page_topk_e4m3 (the same step with 8-bit page bounds)
        {"fused": 1, "tokens_per_iter": 64, "num_warps": 8, "num_stages": 2, "programs_per_sm": 1, "fused_merge": 0},
        {"fused": 1, "select_bins": 256, "tokens_per_iter": 64, "num_warps": 8, "num_stages": 2, "programs_per_sm": 1,
         "fused_merge": 0},
        {"fused": 1, "select_bins": 128, "tokens_per_iter": 64, "num_warps": 8, "num_stages": 2, "programs_per_sm": 1,
         "fused_merge": 0},
        {"fused": 1, "select_bins": 256, "tokens_per_iter": 64, "num_warps": 8, "num_stages": 2, "programs_per_sm": 2,
         "fused_merge": 0},
        {"fused": 1, "tokens_per_iter": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 1, "fused_merge": 1},
        {"fused": 1, "tokens_per_iter": 128, "num_warps": 8, "num_stages": 2, "programs_per_sm": 1, "fused_merge": 1},
        {"fused": 0, "tokens_per_iter": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4},
        {"fused": 0, "tokens_per_iter": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 8},
        {"fused": 0, "select_bins": 256, "tokens_per_iter": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4},
    ],
}
TUNING["page_topk_e4m3"] = TUNING["page_topk"]
SCORE_TUNING = {"block_p": 64, "score_warps": 8}  # the scoring kernel's best in a sweep of block_p x num_warps


def _tune(timer: Timer, factories: dict[str, Callable[[dict[str, int]], Callable[[], Any]]], batch: int,
          results: list[dict[str, Any]], log: Callable[[str], None]) -> dict[str, dict[str, int]]:
    """Pick our kernels' settings per workload at this batch size (CUDA-graph time; every candidate's time is
    kept in the results)."""
    best: dict[str, dict[str, int]] = {}
    for workload, make in factories.items():
        best_ms = float("inf")
        for cfg in TUNING[workload]:
            try:
                ms = timer.graph(make(cfg), reps=20)
            except Exception as exc:  # a config that does not compile is reported and skipped
                results.append({"section": "tune", "workload": workload, "batch": batch, **cfg,
                                "error": repr(exc)[:200]})
                continue
            results.append({"section": "tune", "workload": workload, "batch": batch, **cfg, "graph_ms": ms})
            if ms < best_ms:
                best[workload], best_ms = cfg, ms
        log(f"tune {workload} B={batch}: best {best.get(workload)} at {best_ms:.4f} ms")
    return best


def _time_batch(
    timer: Timer, flex_fn: Any, batch: int, seq_len: int, budget: int, page_size: int, full_kv: int,
    sink: int, window: int, tune: bool, tuning: dict[int, dict[str, dict[str, int]]], log: Callable[[str], None],
    started: float = 0.0, flex_deadline_s: float = float("inf"), timer_w: Timer | None = None,
) -> list[dict[str, Any]]:
    """All workloads at one batch size (our kernels tuned first when ``tune``, the picks stored in
    ``tuning[batch]``); one row per workload with speed-ups over the faster dense SDPA. With ``timer_w`` (a
    writing-flush timer), dense SDPA and our two headline workloads are timed again under it
    (``section: "time"``, ``l2_flush: "write"``, speed-ups against dense under the same flush)."""
    from headwise.kernels.paged_decode import sparse_decode

    q, k, v, bounds, codes, scales = random_decode_layer(batch, seq_len, page_size, seed=batch)
    q4 = q[:, :, None]
    q_packed = q.view(batch, HKV, GROUP, D)
    rows: dict[str, dict[str, Any]] = {}
    rows["dense_sdpa_gqa"] = _both(timer, lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
    rows["dense_sdpa_packed"] = _both(timer, lambda: F.scaled_dot_product_attention(q_packed, k, v))
    if flex_fn is not None and time.perf_counter() - started > flex_deadline_s:
        rows["flex_dense"] = {"error": f"skipped: past the {flex_deadline_s:.0f} s time guard for compiling"}
    elif flex_fn is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        for name, mask_mod in (("flex_dense", None), ("flex_plan_a", _plan_a_mask(seq_len, full_kv, sink, window))):
            try:
                tc = time.perf_counter()
                bm = None if mask_mod is None else create_block_mask(mask_mod, None, HQ, 1, seq_len, device="cuda")

                def flex_run(bm=bm):
                    return flex_fn(q4, k, v, block_mask=bm, enable_gqa=True)

                flex_run()
                torch.cuda.synchronize()
                rows[name] = _both(timer, flex_run)
                rows[name]["compile_s"] = round(time.perf_counter() - tc, 1)
            except Exception as exc:  # FlexAttention failing is a result too
                rows[name] = {"error": repr(exc)[:300]}
    # plan_a: our kernel per group over the real per-group layouts (full heads' cache, streaming ring).
    k_ring, v_ring = ring_cache(k[:, full_kv:], sink, window), ring_cache(v[:, full_kv:], sink, window)
    factories = {
        "plan_a": lambda cfg: plan_a_fn(q, k[:, :full_kv], v[:, :full_kv], k_ring, v_ring, seq_len, full_kv, **cfg),
        "page_topk": lambda cfg: page_topk_fn(q, k, v, bounds, seq_len, budget, page_size, **SCORE_TUNING, **cfg),
        "page_topk_e4m3": lambda cfg: page_topk_fn(q, k, v, codes, seq_len, budget, page_size, scales=scales,
                                                    **SCORE_TUNING, **cfg),
    }
    tune_rows: list[dict[str, Any]] = []
    tuning[batch] = _tune(timer, factories, batch, tune_rows, log) if tune else {}
    cfg_a, cfg_q = tuning[batch].get("plan_a", {}), dict(tuning[batch].get("page_topk", {"fused": 1}))
    cfg_q.update(SCORE_TUNING)
    # the three-kernel path, its default settings and the picked selection method (also for the parts' rows)
    cfg_q3 = {"fused": 0, "select_bins": cfg_q.get("select_bins", 0), **SCORE_TUNING}
    rows["ours_plan_a"] = _both(timer, plan_a_fn(q, k[:, :full_kv], v[:, :full_kv], k_ring, v_ring, seq_len,
                                                  full_kv, **cfg_a))
    rows["ours_plan_a_per_group"] = _both(timer, plan_a_fn(q, k[:, :full_kv], v[:, :full_kv], k_ring, v_ring,
                                                            seq_len, full_kv, one_launch=False, **cfg_a))
    # page_topk: scoring + selection + kernel (the tuned path; the other path; the parts alone).
    rows["ours_page_topk"] = _both(timer, page_topk_fn(q, k, v, bounds, seq_len, budget, page_size, **cfg_q))
    rows["ours_page_topk"]["fused"] = cfg_q["fused"]
    rows["ours_page_topk"]["select_bins"] = cfg_q.get("select_bins", 0)
    other = {"fused": 1, "select_bins": cfg_q.get("select_bins", 0), **SCORE_TUNING} if not cfg_q["fused"] else cfg_q3
    rows[f"ours_page_topk_{'fused' if other['fused'] else 'three_kernels'}"] = _both(
        timer, page_topk_fn(q, k, v, bounds, seq_len, budget, page_size, **other))
    for part in ("scores", "topk"):
        rows[f"ours_page_topk_until_{part}"] = _both(
            timer, page_topk_fn(q, k, v, bounds, seq_len, budget, page_size, stop=part, **cfg_q3))
    rows["ours_page_topk_torch_topk"] = _both(
        timer, page_topk_fn(q, k, v, bounds, seq_len, budget, page_size, topk_kernel=False, **cfg_q3))
    # page_topk with 8-bit page bounds (bounds="e4m3"): the same step reading half the scoring bytes
    cfg_e = dict(tuning[batch].get("page_topk_e4m3", cfg_q))
    cfg_e.update(SCORE_TUNING)
    rows["ours_page_topk_e4m3"] = _both(timer, page_topk_fn(q, k, v, codes, seq_len, budget, page_size,
                                                             scales=scales, **cfg_e))
    rows["ours_page_topk_e4m3"]["fused"] = cfg_e["fused"]
    # Our kernel as a dense decode (every head, every page): its bandwidth next to SDPA's.
    rows["ours_all_pages"] = _both(timer, lambda: sparse_decode(q, k, v, seq_len, None, page_size=64, **cfg_a))
    rows["ours_all_pages"]["note"] = "plan_a's tuned settings"
    fns_w = {"dense_sdpa_gqa": lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True),
             "ours_plan_a": plan_a_fn(q, k[:, :full_kv], v[:, :full_kv], k_ring, v_ring, seq_len, full_kv, **cfg_a),
             "ours_page_topk": page_topk_fn(q, k, v, bounds, seq_len, budget, page_size, **cfg_q)}
    rows_w = {name: {"graph_ms": timer_w.graph(fn)} for name, fn in fns_w.items()} if timer_w is not None else {}
    read = 2 * batch * HKV * seq_len * D * 2  # K and V bytes of a dense step
    dense = {m: min(rows["dense_sdpa_gqa"][m], rows["dense_sdpa_packed"][m]) for m in ("eager_ms", "graph_ms")}
    out: list[dict[str, Any]] = list(tune_rows)
    for name, r in rows.items():
        row: dict[str, Any] = {"section": "time", "workload": name, "batch": batch, "seq_len": seq_len,
                               "l2_flush": "read", **r}
        for m in ("eager_ms", "graph_ms"):
            if m in r and dense[m] == dense[m] and r[m] == r[m]:
                row[f"speedup_vs_dense_{m[:-3]}"] = dense[m] / r[m]
        if name in ("dense_sdpa_gqa", "dense_sdpa_packed", "ours_all_pages", "flex_dense") and "graph_ms" in r:
            row["dense_read_tb_s"] = read / (r["graph_ms"] * 1e-3) / 1e12
        out.append(row)
        log(f"B={batch} {name}: {r}")
    for name, r in rows_w.items():
        row = {"section": "time", "workload": name, "batch": batch, "seq_len": seq_len, "l2_flush": "write", **r,
               "speedup_vs_dense_graph": rows_w["dense_sdpa_gqa"]["graph_ms"] / r["graph_ms"]}
        out.append(row)
        log(f"B={batch} {name} (writing flush): {r}")
    return out


def _plan_a_mask(seq_len: int, full_kv: int, sink: int, window: int):
    """plan_a as a FlexAttention mask_mod over a dense cache (query heads of the first ``full_kv`` KV heads
    see everything; the others sinks + the window ending at the new token, position ``seq_len - 1``)."""
    n_full_q = full_kv * GROUP

    def mask_mod(b, h, q_idx, kv_idx):
        return (h < n_full_q) | (kv_idx < sink) | (kv_idx > seq_len - 1 - window)

    return mask_mod


def format_table(results: list[dict[str, Any]]) -> str:
    """Timing rows as a fixed-width table, then the check and KV rows."""
    lines = [f"{'workload':<19}{'B':>3}{'eager ms':>10}{'graph ms':>10}{'x dense eager':>15}{'x dense graph':>15}"]
    for r in results:
        if r.get("section") != "time" or "eager_ms" not in r:
            continue
        lines.append(
            f"{r['workload']:<19}{r['batch']:>3}{r['eager_ms']:>10.3f}{r['graph_ms']:>10.3f}"
            f"{r.get('speedup_vs_dense_eager', float('nan')):>15.2f}{r.get('speedup_vs_dense_graph', float('nan')):>15.2f}"
        )
    for r in results:
        if r.get("l2_flush") == "write":
            lines.append(f"{r['workload']:<19}{r['batch']:>3}{'':>10}{r['graph_ms']:>10.3f}{'write flush':>15}"
                         f"{r['speedup_vs_dense_graph']:>15.2f}")
    for r in results:
        if "error" in r:
            lines.append(f"{r.get('section')} {r.get('workload', '')}: error {r['error']}")
            continue
        if r.get("section") == "kv":
            lines.append(f"KV bytes at {r['seq_len']} tokens, plan_a: {r['kv_bytes']} = {100 * r['fraction']:.1f}% of dense")
        if r.get("section") == "check":
            lines.append("max abs error vs fp32 reference (ours / torch bf16): " + ", ".join(
                f"{n}: {r[n + '_max_abs_err_ours']:.2e} / {r[n + '_max_abs_err_torch_bf16']:.2e}"
                for n in ("all_pages", "ring", "page_topk")))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ fidelity
@torch.inference_mode()
def decode_logits(engine: Any, ids: torch.Tensor, prompt_len: int, steps: int) -> torch.Tensor:
    """Next-token logits ``[steps, vocab]`` (fp32, CPU) of ``steps`` teacher-forced decode steps.

    Prefill ``ids[:, :prompt_len]`` (``ids: [1, >= prompt_len + steps]``), then feed the true next tokens one at
    a time as decode steps (where decode-selection policies act), as ``Engine.generate`` does.
    """
    cache = engine.new_cache(1, reserve=prompt_len + steps)
    engine.prefill(ids[:, :prompt_len].to(engine.lm.device), cache)
    out = []
    for t in range(steps):
        cache.decode_step += 1
        tok = ids[:, prompt_len + t : prompt_len + t + 1].to(engine.lm.device)
        out.append(engine.forward(tok, cache).float().cpu())
    return torch.cat(out)


def agreement(dense: torch.Tensor, plan: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(dense || plan) in nats between two ``[steps, vocab]`` logit tensors."""
    kl = F.kl_div(plan.log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return {"top1_agreement": (dense.argmax(-1) == plan.argmax(-1)).float().mean().item(), "kl": kl}
