"""Issue 16 on a GPU: SeerAttention gates, HyperAttention, against dense and the MInference patterns.

    PYTHONPATH=src python3 bench/learned_sparse_prefill.py PART [--out bench/results] [options]

Parts (each writes ``<out>/learned_sparse_<part>_<date>.json``; the last stdout line is the JSON document):

* ``gates``: for each bundled model (``--models``), train SeerAttention gates on the GPU exactly as
  ``headwise profile --train-gates`` does on a GPU (``Settings.gpu()``: 300 steps of 4096 tokens, block 64),
  timed; then on held-out Shakespeare (``--eval-len`` tokens, 8192, a window training never saw) every global layer's
  attention recall and block density for ``seer`` (top-k), ``block_topk``, ``vertical_slash`` and ``a_shape`` over
  a grid of budgets, and each method's recall interpolated at block densities 0.1, 0.2, 0.3 (equal density).
* ``prefill``: one attention layer at Llama-3-8B shapes (32 query / 8 KV heads, head_dim 128, bf16, random q/k/v)
  at ``--seq-len`` (128K): dense SDPA (flash), the A-shape plan on our block-sparse kernel, and ``seer`` (gate +
  index + the same kernel; gate weights random: the cost does not depend on them) with the top-k whose density
  matches the A-shape's; index ("plan") time reported with each and included in its total.
* ``hyper``: HyperAttention (``policies/hyper.py``, the authors' defaults: blocks 256, 256 samples, 7 bits,
  exact below 4096) against dense SDPA (bf16, flash) at 32K/64K/128K Llama-3-8B shapes: time, relative output error
  per head (``||hyper - dense|| / ||dense||``), and the error per row over the RMS value-row norm (the scale of the
  paper's bound); random Gaussian q/k/v, and a "clustered" variant whose keys come from 64 centroids so attention
  has heavy entries.
* ``hyper-agreement``: next-token top-1 agreement and KL against each bundled model's shipped plan when its full
  heads on global layers prefill with HyperAttention instead (against the dense plan, every global-layer head swapped,
  when the shipped plan has no full head: SmolLM2's) (``--min-seq-len`` 1024 so that the approximation
  runs at the bundled models' lengths; one-shot prefill of ``--agreement-len`` tokens: with 512-token chunks every
  HyperAttention sub-problem is below ``min_seq_len`` and exact).

Device time on one H200 (estimates): gates 2 models x ~3 min training + ~1 min measuring; prefill ~1 min; hyper
~2 min; hyper-agreement ~2 min. ``all`` runs every part (~12 min).

``--device cpu`` with small sizes is a smoke run of the script itself (wall-clock times, the block-sparse reference
instead of the kernel): ``--device cpu --models smollm2-135m --seer-steps 2 --seer-len 256 --eval-len 512
--seq-len 1024 --local 256 --hyper-lens 2048 --hyper-min-seq-len 256 --agreement-len 1024 --min-seq-len 256 all``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from headwise.bench.record import result_doc, result_path, write_result

HQ, HKV, D = 32, 8, 128  # Llama-3-8B attention
DENSITIES = (0.1, 0.2, 0.3)
DEVICE = "cuda"


def time_ms(fn: Any, warmup: int = 2, reps: int = 10) -> float:
    """Median milliseconds: CUDA events on the GPU (``bench.prefill.cuda_time``), wall clock on the CPU (smoke)."""
    from headwise.bench.prefill import cuda_time
    from headwise.bench.timing import Timer

    return cuda_time(fn, warmup, reps) if DEVICE == "cuda" else Timer.wall(fn, reps=1)


def sparse_attention(*args: Any) -> torch.Tensor:
    """The block-sparse kernel on the GPU, its reference on the CPU (smoke runs)."""
    from headwise.kernels import block_sparse

    fn = block_sparse.block_sparse_attention if DEVICE == "cuda" else block_sparse.block_sparse_attention_ref
    return fn(*args)


def interpolate(curve: list[tuple[float, float]], at: float) -> float | None:
    """Recall at density ``at`` on a (density, recall) curve, linearly between measured points (None outside)."""
    pts = sorted(curve)
    for (d0, r0), (d1, r1) in itertools.pairwise(pts):
        if d0 <= at <= d1:
            return r0 if d1 == d0 else r0 + (r1 - r0) * (at - d0) / (d1 - d0)
    return None


# ---------------------------------------------------------------------------------------------- gates
def part_gates(args: argparse.Namespace) -> dict[str, Any]:
    from headwise.kernels.prefill_index import density
    from headwise.metrics import attention_recall
    from headwise.models import load_model
    from headwise.policies import AShape, BlockTopK, Seer, VerticalSlash
    from headwise.profile.patterns import BLOCK
    from headwise.profile.probe import QKProbe, probing
    from headwise.profile.runner import Settings
    from headwise.profile.seer import profile_texts, train_gates

    out: dict[str, Any] = {}
    s = Settings.gpu()
    steps, seq_len = args.seer_steps or s.seer_steps, args.seer_len or s.seer_seq_len
    for name in args.models.split(","):
        lm = load_model(name, device=DEVICE)
        spec = lm.spec
        seq = min(seq_len, spec.max_context or seq_len)
        sync()
        t0 = time.perf_counter()
        fit = train_gates(lm, profile_texts(lm, seq, 8, offset=1), steps, BLOCK, time_limit_s=s.seer_time_limit_s)
        sync()
        train_s = time.perf_counter() - t0
        L = min(args.eval_len, spec.max_context or args.eval_len)
        ids = profile_texts(lm, L, 1, offset=0)  # window 0: training used windows 1-8
        probe = QKProbe(set(fit.gates.layers))
        with torch.inference_mode(), probing(lm.model):
            lm.model(input_ids=ids.to(DEVICE), headwise_probe=probe, use_cache=False, logits_to_keep=1)
        n = L // BLOCK
        ks = sorted({max(1, round(f * n)) for f in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)})
        methods: dict[str, list[Any]] = {
            "seer": [Seer(topk=k, block_size=BLOCK) for k in ks],
            "block_topk": [BlockTopK(topk=k, block_size=BLOCK) for k in ks],
            "vertical_slash": [VerticalSlash(vertical_size=k * BLOCK // 2, slash_size=k * BLOCK // 2, block_size=BLOCK)
                               for k in ks],
            "a_shape": [AShape(sink=BLOCK, local=BLOCK * k, block_size=BLOCK) for k in ks],
        }
        curves: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
        rows = []
        for layer, gate in fit.gates.layers.items():
            q, k, scale = probe.qk[layer]
            for m, pols in methods.items():
                for pol in pols:
                    if m == "seer":
                        idx, count = pol.build_index(q, k, 0, scale, gate=gate)
                    else:
                        idx, count = pol.build_index(q, k, 0, scale)
                    rec = float(attention_recall(q, k, (idx, count, BLOCK), scale, q_offset=0).mean())
                    dens = density(count, BLOCK, L, L)
                    rows.append({"layer": layer, "method": m, "policy": pol.to_spec(), "recall": rec, "density": dens})
        for m, pols in methods.items():
            for pol in pols:
                sel = [r for r in rows if r["method"] == m and r["policy"] == pol.to_spec()]
                curves[m].append((sum(r["density"] for r in sel) / len(sel), sum(r["recall"] for r in sel) / len(sel)))
        out[name] = {
            "train_s": round(train_s, 1), "steps": fit.steps, "seq_len": seq, "first_loss": fit.losses[0],
            "last_loss": fit.losses[-1], "eval_len": L, "layers": sorted(fit.gates.layers),
            "curves": {m: [{"density": round(d, 4), "recall": round(r, 4)} for d, r in c] for m, c in curves.items()},
            "recall_at_density": {str(d): {m: interpolate(c, d) for m, c in curves.items()} for d in DENSITIES},
            "per_layer": rows,
        }
        print(f"{name}: gates trained in {train_s:.0f} s; recall at density " + ", ".join(
            f"{d}: " + " ".join(f"{m}={v:.3f}" for m, v in out[name]["recall_at_density"][str(d)].items() if v)
            for d in DENSITIES), file=sys.stderr)
        del lm
        empty_cache()
    return out


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- prefill
def _inputs(L: int, seed: int = 0, clustered: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dt = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(1, HQ, L, D, device=DEVICE, generator=g)
    k = torch.randn(1, HKV, L, D, device=DEVICE, generator=g)
    v = torch.randn(1, HKV, L, D, device=DEVICE, generator=g)
    if clustered:  # keys and queries near 64 centroids: each query has heavy entries on its cluster's keys
        cent = torch.randn(1, HKV, 64, D, device=DEVICE, generator=g) * 2.0
        ck = torch.randint(64, (1, HKV, L), device=DEVICE, generator=g)
        cq = torch.randint(64, (1, HKV, L * (HQ // HKV)), device=DEVICE, generator=g)
        k = cent.gather(2, ck[..., None].expand(-1, -1, -1, D)) + 0.5 * k
        q = cent.gather(2, cq[..., None].expand(-1, -1, -1, D)).view(1, HQ, L, D) + 0.5 * q
    return q.to(dt), k.to(dt), v.to(dt)


def part_prefill(args: argparse.Namespace) -> dict[str, Any]:
    from headwise.kernels.prefill_index import density
    from headwise.policies import AShape, Seer
    from headwise.policies.seer import SeerGates

    L, bs = args.seq_len, args.block_size
    q, k, v = _inputs(L)
    scale = D**-0.5
    ash = AShape(sink=bs, local=args.local, block_size=bs)
    a_idx = ash.build_index(q, k, 0, scale)
    a_dens = density(a_idx[1], bs, L, L)
    gate = SeerGates.init([0], HQ, HKV, D, bs).on(DEVICE).layer(0)
    assert gate is not None
    lo, hi = 1, L // bs
    while lo < hi:  # the smallest seer top-k whose density reaches the A-shape's (density grows with top-k)
        mid = (lo + hi) // 2
        if density(Seer(topk=mid, block_size=bs).build_index(q, k, 0, scale, gate=gate)[1], bs, L, L) >= a_dens:
            hi = mid
        else:
            lo = mid + 1
    seer = Seer(topk=lo, block_size=bs)

    def dense() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    res: dict[str, Any] = {"seq_len": L, "block_size": bs, "dense_ms": time_ms(dense)}
    for label, pol, builder in (
        ("a_shape", ash, lambda: ash.build_index(q, k, 0, scale)),
        ("seer", seer, lambda: seer.build_index(q, k, 0, scale, gate=gate)),
    ):
        idx, count = builder()
        res[label] = {
            "policy": pol.to_spec(), "density": density(count, bs, L, L),
            "index_ms": time_ms(builder),
            "kernel_ms": time_ms(lambda idx=idx, count=count: sparse_attention(q, k, v, idx, count, bs, 0, scale)),
        }
        res[label]["total_ms"] = res[label]["index_ms"] + res[label]["kernel_ms"]
        res[label]["speedup_vs_dense"] = res["dense_ms"] / res[label]["total_ms"]
    print(json.dumps(res), file=sys.stderr)
    return res


# ---------------------------------------------------------------------------------------------- hyper
def part_hyper(args: argparse.Namespace) -> dict[str, Any]:
    from headwise.policies import Hyper
    from headwise.policies.hyper import relative_error

    pol = Hyper(min_seq_len=args.hyper_min_seq_len)
    scale = D**-0.5
    rows = []
    for L in (int(x) for x in args.hyper_lens.split(",")):
        for clustered in (False, True):
            q, k, v = _inputs(L, clustered=clustered)

            def dense(q=q, k=k, v=v) -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

            def hyper(q=q, k=k, v=v) -> torch.Tensor:
                return pol.approximate(q, k, v, 0, scale)

            approx, exact = hyper(), dense()
            err = relative_error(approx, exact)
            # HyperAttention's guarantee is relative to ||V||, not to the output (which averaging shrinks): also the
            # error per query row in units of the RMS value-row norm
            v_rms = v.float().pow(2).sum(-1).mean().sqrt()
            per_row = (approx.float() - exact.float()).pow(2).sum(-1).mean().sqrt() / v_rms
            row = {"seq_len": L, "inputs": "clustered" if clustered else "gaussian", "dense_ms": time_ms(dense, 1, 5),
                   "hyper_ms": time_ms(hyper, 1, 5), "rel_error_mean": float(err.mean()),
                   "rel_error_max": float(err.max()), "row_error_over_value_rms": float(per_row)}
            del approx, exact
            row["speedup"] = row["dense_ms"] / row["hyper_ms"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            del q, k, v
            empty_cache()
    return {"policy": pol.to_spec(), "rows": rows}


def part_hyper_agreement(args: argparse.Namespace) -> dict[str, Any]:
    from headwise.bench.decode import agreement
    from headwise.data import shakespeare
    from headwise.engine import Engine
    from headwise.models import load_model
    from headwise.plan import HeadPlan
    from headwise.policies import Hyper
    from headwise.profile.act import global_full_heads

    out = {}
    for name in args.models.split(","):
        lm = load_model(name, device=DEVICE)
        spec = lm.spec
        base = HeadPlan.load(Path("plans") / f"{name}.json")
        against = f"plans/{name}.json"
        hyper = Hyper(min_seq_len=args.min_seq_len)

        pols = base.policies()
        swapped = global_full_heads(spec, pols)
        if not swapped:  # a shipped plan without full heads (SmolLM2's): every global-layer head of the dense plan
            base, against = HeadPlan.dense(spec, "dense"), "dense"
            pols = base.policies()
            swapped = global_full_heads(spec, pols)
        for i, j in swapped:
            pols[i][j] = hyper
        plan = HeadPlan.from_policies(spec, pols, name)
        L = min(args.agreement_len, (spec.max_context or args.agreement_len) - 1)
        ids = lm.tokenizer(shakespeare(L * 8), return_tensors="pt").input_ids[:, :L]
        positions = torch.arange(L // 2, L, max(1, L // 1024))
        ref = Engine(lm, base, chunk_size=L).logits(ids, positions)[0].float()
        got = Engine(lm, plan, chunk_size=L).logits(ids, positions)[0].float()
        out[name] = {"length": L, "positions": len(positions), "hyper_heads": len(swapped), "policy": hyper.to_spec(),
                     "against": against, **agreement(ref, got)}
        print(name, json.dumps(out[name]), file=sys.stderr)
        del lm
        empty_cache()
    return out


PARTS = {"gates": part_gates, "prefill": part_prefill, "hyper": part_hyper, "hyper-agreement": part_hyper_agreement}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=[*PARTS, "all"])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--eval-len", type=int, default=8192, help="held-out tokens for recall (within the context)")
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--local", type=int, default=4096, help="A-shape local band of the prefill comparison (tokens)")
    ap.add_argument("--hyper-lens", default="32768,65536,131072")
    ap.add_argument("--hyper-min-seq-len", type=int, default=4096, help="HyperAttention's exact threshold (part hyper)")
    ap.add_argument("--seer-steps", type=int, default=0, help="gate-training steps (default: Settings.gpu, 300)")
    ap.add_argument("--seer-len", type=int, default=0, help="gate-training sequence length (default: Settings.gpu)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of the script")
    ap.add_argument("--min-seq-len", type=int, default=1024)
    ap.add_argument("--agreement-len", type=int, default=8192)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("learned_sparse_prefill.py needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    command = "PYTHONPATH=src python3 " + " ".join(sys.argv)
    doc = None
    for part in (PARTS if args.part == "all" else [args.part]):
        t0 = time.perf_counter()
        results = PARTS[part](args)
        results = {"part": part, "wall_s": round(time.perf_counter() - t0, 1), **results}
        doc = result_doc(command, results, device=DEVICE)
        path = write_result(doc, result_path(args.out, f"learned_sparse_{part.replace('-', '_')}"))
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(doc, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
