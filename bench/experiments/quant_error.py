"""Measured output error of each quantized option per KV head, on the spans' KL scale.

Runs the mass profile (``mass.mass_scores`` with ``target_len``) over the profiling text and puts each quantized
option's relative output error (``MassResult.quant_error``: keys and values as KIVI codes outside a residual of
``QUANT_PROBE_RESIDUAL`` tokens) on the scale the solver trades spans on, with the per-layer KL factors of a scores
file (``mass.weighted_span_error(..., other=)``). For each plan given, the summed weighted error of its quantized
heads by option, beside its streaming heads' weighted span errors. A measurement on text, not a quality result.

    PYTHONPATH=src python bench/experiments/quant_error.py OUT.json SCORES.json [PLAN.json ...]
"""

from __future__ import annotations

import json
import sys
import time

import torch

from headwise.bench.record import result_doc, write_result
from headwise.models import load_model
from headwise.plan import HeadPlan
from headwise.policies import Quantized, Streaming
from headwise.profile.mass import (
    QUANT_PROBE,
    QUANT_PROBE_RESIDUAL,
    SPAN_OPTIONS,
    mass_scores,
    weighted_span_error,
)


def main() -> None:
    out, scores_path, plan_paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(scores_path) as f:
        source = json.load(f)
    meta, target = source["meta"], int(source["meta"]["span_recall_target_len"])
    lm = load_model(source["model"]["name"], device="cpu", dtype="float32")
    t0 = time.perf_counter()
    mass = mass_scores(lm, target, progress=True, target_len=target)
    assert mass.quant_error is not None and mass.span_error is not None
    span_err, layer_kl = torch.tensor(meta["span_error_kv"]), torch.tensor(meta["layer_kl"])
    drift = float((mass.span_error - span_err).abs().max())
    wq = weighted_span_error(span_err, layer_kl, other=mass.quant_error)
    ws = weighted_span_error(span_err, layer_kl)
    plans = {}
    for path in plan_paths:
        plan = HeadPlan.load(path)
        by: dict[str, float] = {}
        streaming = 0.0
        for i, row in enumerate(plan.policies()):
            for j, pol in enumerate(row):
                if isinstance(pol, Quantized):
                    key = f"k{pol.k_bits}v{pol.bits}"
                    by[key] = by.get(key, 0.0) + float(wq[i, j, QUANT_PROBE.index((pol.k_bits, pol.bits))])
                elif isinstance(pol, Streaming):
                    streaming += float(ws[i, j, 0])  # the smallest span's error: a floor for rings below it
        plans[path] = {"quantized_weighted_error_by_option": {k: round(v, 5) for k, v in by.items()},
                       "streaming_heads_smallest_span_weighted_error": round(streaming, 5)}
    doc = result_doc(" ".join(["PYTHONPATH=src python bench/experiments/quant_error.py", *sys.argv[1:]]), dict(
        what="Measured relative output error of each quantized option per KV head (KIVI codes outside a residual of "
             f"{QUANT_PROBE_RESIDUAL} tokens, group 32) on {target} tokens of the profiling text, and on the spans' KL "
             "scale with the scores file's per-layer factors",
        scores=scores_path, target_len=target, seconds=round(time.perf_counter() - t0, 1),
        span_error_max_drift_from_scores_file=drift,
        options=[list(o) for o in QUANT_PROBE],
        unweighted_mean_by_option=[round(float(v), 6) for v in mass.quant_error.mean((0, 1))],
        weighted_sum_by_option=[round(float(v), 5) for v in wq.sum((0, 1))],
        weighted_sum_smallest_span=round(float(ws[:, :, 0].sum()), 5),
        weighted_sum_span_options={f"{a}+{b}N": round(float(ws[:, :, o].sum()), 5)
                                   for o, (a, b) in enumerate(SPAN_OPTIONS)},
        layer_kl_sum=round(float(layer_kl.sum()), 5),
        weighted_quant_error_kv=[[[round(float(v), 6) for v in h] for h in row] for row in wq.tolist()],
        plans=plans))
    write_result(doc, out)


if __name__ == "__main__":
    main()
