"""Quest with 8-bit page bounds: how much decode fidelity does it cost? (CPU, SmolLM2; an experiment for issue 3)

Scoring reads the page bounds (min and max key per channel per page): half the bytes of a batch-1 Quest step at
128K tokens. Stored in 8 bits (float8 e4m3 with one scale per page row, absmax / 448) and rounded *outward*
(the min down, the max up to the next representable value), every score is still an upper bound of ``q . k``
over its page, only looser. This measures what the looser bound does to the chosen pages, as top-1 agreement
and KL against dense over teacher-forced decode steps (as bench/decode_quality.py), next to the exact bounds.

Only the bound values change (rounded in place, in the store's dtype); the kernel that would read 8-bit bounds
is not built.

    PYTHONPATH=src python3 bench/quest_bounds_precision.py [--prompt-len 4096] [--budget 512] [--samples 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from headwise.bench.decode import agreement, decode_logits
from headwise.bench.record import git_commit
from headwise.data import shakespeare
from headwise.engine import Engine
from headwise.models import load_model
from headwise.plan import HeadPlan
from headwise.policies.stores import PagedStore

_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3_VALUES = _E4M3[torch.isfinite(_E4M3)].unique()  # sorted, -448 .. 448
E4M3_MAX = 448.0


def round_outward_e4m3(bounds: torch.Tensor) -> torch.Tensor:
    """``bounds [..., 2, D]`` (min row, max row) -> the same shape with each row scaled to +-448 by its absmax,
    the min rounded down and the max rounded up to float8 e4m3 values, scaled back."""
    x = bounds.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / E4M3_MAX * (1 + 2**-10)  # headroom at +-448
    y = (x / scale).clamp(-E4M3_MAX, E4M3_MAX)
    table = E4M3_VALUES.to(y.device)
    lo_idx = (torch.searchsorted(table, y[..., 0, :].contiguous(), right=True) - 1).clamp(0, table.numel() - 1)
    hi_idx = torch.searchsorted(table, y[..., 1, :].contiguous(), right=False).clamp(0, table.numel() - 1)
    last = table.numel() - 1
    # x / scale was rounded: one step further out where the scaled-back value crossed x
    lo_idx = torch.where(table[lo_idx] * scale[..., 0, :] > x[..., 0, :], (lo_idx - 1).clamp(min=0), lo_idx)
    hi_idx = torch.where(table[hi_idx] * scale[..., 1, :] < x[..., 1, :], (hi_idx + 1).clamp(max=last), hi_idx)
    out = torch.stack([table[lo_idx], table[hi_idx]], dim=-2) * scale
    assert bool((out[..., 0, :] <= x[..., 0, :]).all() and (out[..., 1, :] >= x[..., 1, :]).all())
    return out.to(bounds.dtype)


_exact_refresh = PagedStore._refresh_bounds


def _refresh_fp8(self: PagedStore, start: int, end: int) -> None:
    _exact_refresh(self, start, end)
    if end > start and self.bounds is not None:
        first, last = start // self.page_size, (end - 1) // self.page_size + 1
        self.bounds[:, :, first:last] = round_outward_e4m3(self.bounds[:, :, first:last])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--page-sizes", default="16,32")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model("smollm2-135m", device="cpu")
    need = args.samples * (args.prompt_len + args.steps)
    ids = lm.tokenizer(shakespeare(6 * need), return_tensors="pt").input_ids[:, :need]
    slices = [ids[:, i * (args.prompt_len + args.steps) : (i + 1) * (args.prompt_len + args.steps)]
              for i in range(args.samples)]
    dense = torch.cat([decode_logits(Engine(lm), s, args.prompt_len, args.steps) for s in slices])
    rows = []
    for page in (int(p) for p in args.page_sizes.split(",")):
        plan = HeadPlan.uniform(lm.spec, {"policy": "page_topk", "params": {"page_size": page, "budget": args.budget}})
        for bounds in ("exact", "e4m3-outward"):
            PagedStore._refresh_bounds = _refresh_fp8 if bounds != "exact" else _exact_refresh  # type: ignore[method-assign]
            try:
                logits = torch.cat([decode_logits(Engine(lm, plan), s, args.prompt_len, args.steps) for s in slices])
            finally:
                PagedStore._refresh_bounds = _exact_refresh  # type: ignore[method-assign]
            rows.append({"page_size": page, "bounds": bounds, **agreement(dense, logits)})
            print(f"page {page:>3} bounds {bounds:<13} top-1 {rows[-1]['top1_agreement']:.3f}  KL {rows[-1]['kl']:.4f}",
                  file=sys.stderr, flush=True)
    doc = {
        "command": "PYTHONPATH=src python3 " + " ".join(sys.argv),
        "model": lm.name, "commit": git_commit(), "device": "cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "prompt_len": args.prompt_len, "steps": args.steps, "samples": args.samples, "budget_tokens": args.budget,
        "results": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quest_bounds_precision_{datetime.date.today().isoformat()}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
