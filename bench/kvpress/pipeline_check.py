"""kvpress's own pipeline on exported prompts: is a press's result on ``headwise eval``'s prompts an artefact of
``run_presses.py`` driving kvpress's hooks itself?

``run_presses.py`` compresses the whole prompt (question included) after a dense prefill; kvpress's
``KVPressTextGenerationPipeline`` splits context from question, compresses the context only, and answers the
question over the compressed cache. This runs the second on the same prompts (split at the question), with and
without each press, and prints how many answers contain the passkey. Runs in kvpress's environment (transformers
4.x), like ``run_presses.py``:

    headwise eval smollm2-135m --tasks passkey --lengths 1k --depths 0.1,0.5,0.9 --samples 6 \\
        --export-prompts /tmp/p.jsonl
    .venv-kvpress/bin/python bench/kvpress/pipeline_check.py /tmp/p.jsonl --fractions 0.3,0.9 \\
        --presses none,SnapKVPress,KnormPress --out check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_presses import load, read_prompts

QUESTION = "\n\nWhat is the pass key?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", type=Path, help="a `headwise eval ... --export-prompts` file of passkey prompts")
    ap.add_argument("--fractions", default="0.3,0.9", help="fractions of the context's KV each press keeps")
    ap.add_argument("--presses", default="none,SnapKVPress,KnormPress", help="kvpress class names, or none")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import kvpress
    from transformers import pipeline

    prompts = [p for p in read_prompts(args.prompts) if p["task"] == "passkey"]
    if not prompts:
        print(f"error: no passkey prompts in {args.prompts}", file=sys.stderr)
        return 2
    model, tok = load(Path(prompts[0]["model_dir"]), args.device, torch.float32)
    if tok.bos_token is None:  # a tokenizer read from tokenizer.json alone; the pipeline prepends bos_token
        tok.bos_token = tok.convert_ids_to_tokens(1)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device=args.device)
    runs = []
    for name in args.presses.split(","):
        for frac in ([None] if name == "none" else [float(f) for f in args.fractions.split(",")]):
            press = None if name == "none" else getattr(kvpress, name)(compression_ratio=round(1 - frac, 6))
            t0, rows = time.time(), []
            for p in prompts:
                cut = p["prompt"].rindex(QUESTION)
                out = pipe(p["prompt"][:cut], question=p["prompt"][cut:], press=press,
                           max_new_tokens=args.max_new_tokens)["answer"]
                rows.append({"depth": p["depth"], "idx": p["idx"], "answers": p["answers"], "output": out,
                             "score": float(any(a in out for a in p["answers"]))})
            runs.append({"press": name, "kept_fraction": frac, "answered": sum(r["score"] for r in rows),
                         "n": len(rows), "seconds": round(time.time() - t0, 1), "rows": rows})
            print(name, frac, f"{runs[-1]['answered']:.0f}/{len(rows)}", flush=True)
    doc = {"command": "python " + " ".join(sys.argv), "device": args.device, "prompts": str(args.prompts),
           "flow": "kvpress KVPressTextGenerationPipeline: context compressed, question not", "runs": runs}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
