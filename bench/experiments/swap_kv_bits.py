"""A plan with every quantized head's key and value bits swapped: 4-bit keys over 2-bit values become 2-bit keys
over 4-bit values, at the same bytes. A diagnostic of which side a task needs: on the CPU (session 36 of
docs/quality.md) SmolLM2's 0.2 plan with 4-bit keys over 2-bit values on 53 heads found 3 of 40 2K passkeys (dense
22) at a text KL of 0.054; the same plan with the bits swapped found 28 at 0.098. On the GPU (run 31, H100, n = 100)
the swapped 0.2 plan found 94% of the 2K passkeys (dense 76) at a KL of 0.096 but 76% of the needles (dense 100) and
28% of the multi-key needles (dense 46), and the 0.25 one less of everything: 2-bit keys on many heads misdirect
attention, so the solver does not offer them (``profile/solver.py``'s ``TWO_BIT_OPTIONS``) and this stays a
diagnostic.

    python bench/experiments/swap_kv_bits.py PLAN.json OUT.json [--from 4/2]

``--from K/V`` names the heads to swap by their key / value bits (default 4/2: ``key_bits`` 4 over ``bits`` 2).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path


def swapped(plan: dict, key_bits: int, value_bits: int) -> tuple[dict, int]:
    """``plan`` with every quantized head of ``key_bits`` keys over ``value_bits`` values given ``value_bits`` keys
    over ``key_bits`` values; and how many heads changed."""
    out, n = copy.deepcopy(plan), 0
    for row in out["layers"]:
        for head in row:
            p = head.get("params", {})
            if head["policy"] != "quantized" or p.get("bits") != value_bits or (p.get("key_bits") or p["bits"]) != key_bits:
                continue
            p["bits"], p["key_bits"] = key_bits, value_bits
            if p["key_bits"] == p["bits"]:
                del p["key_bits"]
            n += 1
    out["meta"] = {**plan.get("meta", {}), "note": f"experiment: {n} heads of {key_bits}-bit keys over {value_bits}-bit "
                   f"values swapped to {value_bits}-bit keys over {key_bits}-bit values (bench/experiments/swap_kv_bits.py)"}
    return out, n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--from", dest="bits", default="4/2", help="key/value bits of the heads to swap (default 4/2)")
    args = ap.parse_args(argv)
    k, _, v = args.bits.partition("/")
    if not (k.isdigit() and v.isdigit()) or k == v:
        raise SystemExit(f"--from takes two different bit widths as K/V, e.g. 4/2; got {args.bits!r}")
    plan, n = swapped(json.loads(args.plan.read_text()), int(k), int(v))
    if not n:
        raise SystemExit(f"{args.plan}: no quantized head with {k}-bit keys over {v}-bit values")
    args.out.write_text(json.dumps(plan, indent=1) + "\n")
    print(f"wrote {args.out}: {n} heads swapped")


if __name__ == "__main__":
    main()
