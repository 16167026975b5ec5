"""Rows of a saved evaluation (a ``headwise eval`` results JSON in bench/results/) as a sample file that a later
``headwise eval`` reuses instead of running them again: the GPU scripts copy ``.carry/samples-*.jsonl`` into their
output directory (bench/retrieval_quality.sh), so a call spends its minutes on the new rows only.

Each row gets back the cache key ``headwise eval`` gave it (``SampleCache.key``: model, layer shape, plan digest, task,
length, depth, seed, index, and the prefill chunk when it is not the default), rebuilt from the document's model,
shape, seed and command. Only generation rows are written (fidelity and memory rows are cheap and measured again).

    python3 bench/carry_rows.py bench/results/retrieval_kvpress_smollm2-135m_h200_run14_2026-12-03.json \\
        .carry/samples-smollm2-run14.jsonl --plans dense,smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from headwise.errors import InputError
from headwise.eval.runner import DEFAULT_CHUNK, SampleCache, dtype_tag, model_key


def doc_model_key(doc: dict[str, Any]) -> str:
    """The key's model part (``runner.model_key``) for the document's model, shape, prefill chunk and dtype (where it
    is not its device's default: ``runner.dtype_tag``; a document that names no dtype ran in the default)."""
    spec = doc.get("spec") or {}
    words = shlex.split(str(doc.get("command", "")))
    chunk = int(words[words.index("--chunk-size") + 1]) if "--chunk-size" in words[:-1] else DEFAULT_CHUNK
    on_gpu = not str(doc.get("device", "")).startswith("cpu")
    dtype = dtype_tag(str(doc["dtype"]), on_gpu) if doc.get("dtype") else None
    try:
        return model_key(doc["model"], spec["num_layers"], spec["num_kv_heads"], spec["head_dim"], chunk, dtype)
    except KeyError as exc:
        raise InputError(f"the document has no {exc.args[0]!r}: not a headwise eval results file") from exc


TOKENIZED_WELL_FROM = 2
"""The converted-cache format (``models.CACHE_FORMAT``) from which Gemma's GGUF tokenizer is checked and its BOS added:
rows of a Gemma run on an older conversion read mis-tokenized prompts (docs/quality.md) and are never reused."""


def check_tokenized_well(doc: dict[str, Any]) -> None:
    """Raise ``InputError`` for a Gemma document whose model came from a conversion older than
    ``TOKENIZED_WELL_FROM`` (its ``model_source`` names the converted cache, ``…-vN``); its sample keys would match
    today's and its rows be reused silently."""
    arch = str((doc.get("spec") or {}).get("architecture", ""))
    if not arch.startswith("gemma"):
        return
    m = re.search(r"-v(\d+)\)?$", str(doc.get("model_source", "")))
    if m is None or int(m.group(1)) < TOKENIZED_WELL_FROM:
        raise InputError(f"its Gemma model was converted before the tokenizer fix (cache format "
                         f"{m.group(1) if m else 'unknown'} < {TOKENIZED_WELL_FROM}): its prompts were mis-tokenized, "
                         "so its rows are not reused")


def carry_rows(doc: dict[str, Any], plans: set[str] | None = None) -> list[dict[str, Any]]:
    """The document's generation rows (of ``plans`` only, when given), each with its cache key; none of a Gemma run
    that read mis-tokenized prompts (``check_tokenized_well``)."""
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise InputError("the document has no 'rows': not a headwise eval results file")
    check_tokenized_well(doc)
    mk = doc_model_key(doc)
    out = []
    for r in rows:
        if plans is not None and r.get("plan") not in plans:
            continue
        if str(r.get("digest", "")).startswith("ext-"):
            continue  # another environment's rows (kvpress): not a headwise plan's
        key = SampleCache.key(mk, r["digest"], r["task"], r["length"], r["depth"], r["seed"], r["idx"])
        out.append(r | {"key": key})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="a headwise eval results JSON")
    p.add_argument("out", help="the JSONL file to write (e.g. .carry/samples-NAME.jsonl)")
    p.add_argument("--plans", default=None, help="comma-separated plan labels to keep (default: all)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        doc = json.loads(Path(args.results).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"carry_rows: cannot read {args.results}: {exc}") from exc
    plans = {s.strip() for s in args.plans.split(",") if s.strip()} if args.plans else None
    try:
        rows = carry_rows(doc, plans)
    except InputError as exc:
        raise SystemExit(f"carry_rows: {args.results}: {exc}") from exc
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print(f"{len(rows)} rows written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
