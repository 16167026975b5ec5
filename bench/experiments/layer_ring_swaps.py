"""Plans that differ from a base plan in chosen layers or heads only: the base's policies there replaced by a donor
plan's (whole layers) or by a ring of ``sink + window`` tokens (single heads). Run 28 of docs/quality.md used it to
find where SmolLM2's 0.15 menu plan (which finds more 2K passkeys than dense) differs from the shipped plan in a way
that matters, with the evaluation's own prompts: a diagnostic, so no shipped plan is built from it.

    python bench/experiments/layer_ring_swaps.py plans/smollm2-135m.json DONOR.json OUT_DIR \\
        --layers 1-10,1-5,6-10,1-2,3-5,3-3,4-4,5-5,4-5 --heads 3:0,3:1,3:2 --ring 16/16

DONOR.json was `headwise profile smollm2-135m --budget 0.15 --target-len 2048 --method ablation --from-scores
bench/results/retrieval_plan_smollm2-135m_ablation2_spans2k_cpu_2026-12-03.json --full-share 0.9 --quantize
--quant-residual 32 --min-ring 32` (run 27's 0.15 plan). Writes OUT_DIR/<base>-hyb-l<a>-<b>.json and
OUT_DIR/<base>-hyb-l<layer>h<head>.json; with ``--together``, one plan with every head of ``--heads`` on its ring,
OUT_DIR/<base>-hyb-l<a>h<b>-...-r<sink>+<window>.json (session 38 widened the 32-token windows of Gemma 3's
select2bit plan to 128 tokens so: ``--heads 0:0,1:0,2:0,3:0,4:0,7:0,10:0 --ring 0/128 --together``).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path


def swapped(base: dict, donor: dict, first: int, last: int) -> dict:
    """``base`` with layers ``first``..``last`` (inclusive) taken from ``donor``."""
    if len(base["layers"]) != len(donor["layers"]):
        raise SystemExit("base and donor plans have different layer counts")
    plan = copy.deepcopy(base)
    for i in range(first, last + 1):
        plan["layers"][i] = copy.deepcopy(donor["layers"][i])
    plan["meta"] = {"note": f"experiment: {base['model'].get('name', 'base')} with layers {first}-{last} of a donor plan"}
    return plan


def ringed(base: dict, layer: int, head: int, sink: int, window: int) -> dict:
    """``base`` with one KV head streaming over ``sink`` first and ``window`` last tokens."""
    return ringed_all(base, [(layer, head)], sink, window)


def ringed_all(base: dict, spots: list[tuple[int, int]], sink: int, window: int) -> dict:
    """``base`` with every (layer, KV head) of ``spots`` streaming over ``sink`` first and ``window`` last tokens."""
    plan = copy.deepcopy(base)
    for layer, head in spots:
        plan["layers"][layer][head] = {"policy": "streaming",
                                       "params": {"sink": sink, "window": window, "compensation": False}}
    where = ", ".join(f"layer {layer} head {head}" for layer, head in spots)
    plan["meta"] = {"note": f"experiment: {where} a {sink + window}-token ring"}
    return plan


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("donor", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--layers", default="", help="comma-separated inclusive ranges, e.g. 1-10,3-3")
    ap.add_argument("--heads", default="", help="comma-separated LAYER:HEAD, each made a ring alone")
    ap.add_argument("--ring", default="16/16", help="SINK/WINDOW of --heads' rings")
    ap.add_argument("--together", action="store_true", help="one plan with every head of --heads on its ring")
    args = ap.parse_args(argv)
    base, donor = json.loads(args.base.read_text()), json.loads(args.donor.read_text())
    sink, window = (int(x) for x in args.ring.split("/"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.base.stem
    for span in filter(None, args.layers.split(",")):
        first, last = (int(x) for x in span.split("-"))
        out = args.out_dir / f"{stem}-hyb-l{first}-{last}.json"
        out.write_text(json.dumps(swapped(base, donor, first, last)))
        print(out)
    spots = [(int(a), int(b)) for a, _, b in (spot.partition(":") for spot in filter(None, args.heads.split(",")))]
    if args.together and spots:
        out = args.out_dir / f"{stem}-hyb-{'-'.join(f'l{a}h{b}' for a, b in spots)}-r{sink}+{window}.json"
        out.write_text(json.dumps(ringed_all(base, spots, sink, window)))
        print(out)
        return
    for layer, head in spots:
        out = args.out_dir / f"{stem}-hyb-l{layer}h{head}.json"
        out.write_text(json.dumps(ringed(base, layer, head, sink, window)))
        print(out)


if __name__ == "__main__":
    main()
