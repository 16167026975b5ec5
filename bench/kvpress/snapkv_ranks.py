"""Where SnapKV ranks a passkey's digits, head by head: why it loses passkeys that KNorm keeps.

For one exported passkey prompt, runs kvpress's ``SnapKVPress`` over the prefill (the whole prompt but its last
token, as ``run_presses.py`` does), records the score it gives every cached token in every layer and KV head, and
reports, per head, the rank of each of the passkey's digit tokens (0 = the most attended by the observation window)
and how many survive at a kept fraction. Runs in kvpress's environment:

    .venv-kvpress/bin/python bench/kvpress/snapkv_ranks.py /tmp/p.jsonl --index 1 --kept 0.9 --out ranks.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_presses import load, read_prompts


def digit_positions(tok, ids: list[int], answer: str) -> list[int]:
    """Token positions spelling ``answer`` wherever it occurs (a digit a token, as SmolLM2's tokenizer has it)."""
    pieces = [tok.decode([i]).strip() for i in ids]
    n = len(answer)
    starts = [i for i in range(len(ids) - n + 1) if "".join(pieces[i:i + n]) == answer]
    return sorted({q for s in starts for q in range(s, s + n)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", type=Path)
    ap.add_argument("--index", type=int, default=0, help="which passkey prompt of the file")
    ap.add_argument("--kept", type=float, default=0.9, help="the fraction of the cache the press keeps")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import kvpress
    from transformers import DynamicCache

    p = [q for q in read_prompts(args.prompts) if q["task"] == "passkey"][args.index]
    model, tok = load(Path(p["model_dir"]), "cpu", torch.float32)
    ids = p["input_ids"]
    digits = digit_positions(tok, ids, p["answers"][0])
    if not digits:
        print(f"error: {p['answers'][0]} is not spelt one digit a token in prompt {args.index}", file=sys.stderr)
        return 2
    press = kvpress.SnapKVPress(compression_ratio=round(1 - args.kept, 6))
    scores: dict[int, torch.Tensor] = {}
    score = press.score

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        s = score(module, hidden_states, keys, values, attentions, kwargs)
        scores[module.layer_idx] = s.detach()[0]
        return s

    press.score = recording
    with torch.no_grad(), press(model):
        model.model(input_ids=torch.tensor([ids[:-1]]), past_key_values=DynamicCache())
    heads = []
    for layer, s in sorted(scores.items()):
        n = s.shape[-1]
        kept = s.topk(int(n * args.kept), dim=-1).indices
        rank = s.argsort(dim=-1, descending=True).argsort(dim=-1)
        for h in range(s.shape[0]):
            keep = set(kept[h].tolist())
            heads.append({"layer": layer, "kv_head": h, "digits_kept": sum(d in keep for d in digits),
                          "digit_ranks": [int(rank[h, d]) for d in digits], "tokens": n})
    lost = [f"{x['layer']}.{x['kv_head']}" for x in heads if x["digits_kept"] < len(digits)]
    doc = {"command": "python " + " ".join(sys.argv), "prompt": {k: p[k] for k in ("task", "length", "depth", "idx")},
           "answer": p["answers"][0], "digit_positions": digits, "kept_fraction": args.kept,
           "heads_losing_digits": lost, "heads": heads}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(lost)} of {len(heads)} KV heads drop some of the {len(digits)} digit tokens at {args.kept:.0%} kept: "
          f"{', '.join(lost)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
