"""Baselines run outside headwise (kvpress in its own environment) on ``headwise eval``'s own samples.

    headwise eval smollm2-135m --tasks passkey,needle --lengths 1k,2k --samples 100 --export-prompts prompts.jsonl
    .venv-kvpress/bin/python bench/kvpress/run_presses.py prompts.jsonl --presses snapkv --kv-fraction 0.5 ...
    python bench/kvpress/import_outputs.py eval-out/smollm2-135m outputs.jsonl   # adds kvpress:snapkv@0.5

``export_prompts`` writes one JSON line per sample of an eval configuration: the same (task, length, depth, seed,
idx) samples ``run_eval`` runs (``job_order``, ``make_sample``, ``sample_seed``), with the prompt text, its token ids
as headwise's engine encodes them, the answers, the scoring rule and the answer length. Another program (another
transformers) feeds the ids, generates greedily and writes one output line per sample and method
(``OUTPUT_FIELDS``). ``merge_outputs`` scores those outputs with headwise's scoring and adds them to a
``results.json`` as plans of their own, keyed by the same sample fields so the report's accuracy table and its
paired "kept of dense" table (``report.retention``) put them beside headwise's plans.

KV memory of an external method is counted from the token slots its cache holds after the prompt (summed over
layers and KV heads, ``kv_tokens``), so the fraction of dense does not depend on the dtype either side ran in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from headwise.errors import InputError
from headwise.eval import runner
from headwise.eval.runner import DEFAULT_DEPTHS, FIDELITY, job_order, sample_seed, score_tables
from headwise.eval.scoring import score
from headwise.eval.tasks import make_sample, task_info
from headwise.spec import ModelSpec

PROMPTS_FORMAT = "headwise-prompts"
OUTPUTS_FORMAT = "headwise-external-outputs"
FORMAT_VERSION = 1

OUTPUT_FIELDS = ("format", "label", "method", "task", "length", "depth", "seed", "idx", "output", "prompt_tokens",
                 "new_tokens", "kv_tokens")
"""What every output line must carry (``run_presses.py`` also writes ``method_version``, ``dtype``, ``device``,
``prefill_s``, ``decode_s``, ``kv_fraction_target`` and ``kv_tokens_peak``, used when present)."""


def model_key(lm: Any) -> str:
    """The model part of ``run_eval``'s sample keys (at the default prefill chunk: another environment's rows)."""
    spec = lm.spec
    return runner.model_key(lm.name, spec.num_layers, spec.num_kv_heads, spec.head_dim)


def export_prompts(lm: Any, path: Path, tasks: Sequence[str], lengths: Sequence[int],
                   depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 4, seed: int = 0,
                   model_dir: Path | None = None) -> int:
    """Write the samples ``run_eval`` would run for this configuration (fidelity, which generates nothing, is
    left out) as JSON lines to ``path``; return how many. ``model_dir``: the Hugging Face directory another
    program should load (the converted copy of a GGUF model, ``models.local_dir``), recorded on every line."""
    gen = [t for t in tasks if t != FIDELITY]
    if not gen:
        raise InputError("--export-prompts needs at least one generation task (fidelity generates nothing)")
    for t in gen:
        task_info(t)
    if samples < 1:
        raise InputError(f"--samples must be at least 1, got {samples}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        for L, t, d, i in job_order(lengths, gen, depths, samples):
            sample = make_sample(t, lm.tokenizer, L, d, sample_seed(seed, i))
            ids = lm.tokenizer(sample.prompt, add_special_tokens=True).input_ids  # as Engine.encode
            fh.write(json.dumps({
                "format": PROMPTS_FORMAT, "version": FORMAT_VERSION, "model": lm.name, "model_key": model_key(lm),
                "model_dir": str(model_dir) if model_dir is not None else None,
                "task": t, "length": L, "depth": d, "seed": seed, "idx": i,
                "prompt": sample.prompt, "input_ids": list(ids), "answers": sample.answers,
                "scoring": sample.meta["scoring"], "max_new_tokens": sample.max_new_tokens,
            }) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per non-empty line; a bad line is an ``InputError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {n} is not JSON ({exc.msg}): is it a {what} file?") from None
    return rows


def sample_key(r: dict[str, Any]) -> tuple[Any, ...]:
    """A sample's identity across environments: (task, length, depth, seed, index)."""
    return r["task"], r["length"], r["depth"], r["seed"], r["idx"]


def _digest(label: str, method: dict[str, Any], length: int, mkey: str) -> str:
    blob = json.dumps({"label": label, "method": method, "length": length, "model": mkey}, sort_keys=True)
    return "ext-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def merge_outputs(results: dict[str, Any], outputs: Iterable[dict[str, Any]],
                  prompts: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``results`` (a ``run_eval`` document) with the external ``outputs`` added: scored by headwise's rules, as
    plans labelled by their ``label`` (``kvpress:snapkv@0.5``), in ``plans``, ``rows``, ``accuracy``,
    ``accuracy_by_depth`` and ``performance``. ``prompts`` (the exported lines) supply the answers and scoring
    rule; without them the outputs' own ``answers`` and ``scoring`` are used. A label already in ``results`` is
    replaced. Outputs of another model, seed, task or length than ``results`` holds are refused, and so is an
    output whose prompt length differs from the one headwise's row of the same sample records (another tokenizer
    or task generator made it)."""
    outputs = list(outputs)
    if not outputs:
        raise InputError("no external outputs to merge")
    spec_d = dict(results["spec"])
    spec_d["layer_windows"] = tuple(spec_d.get("layer_windows") or ())
    spec = ModelSpec(**spec_d)
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(results.get("dtype", ""), 2)
    by_sample = {}
    for p in prompts or []:
        by_sample[sample_key(p)] = p
    headwise_tokens = {sample_key(r): r.get("prompt_tokens") for r in results.get("rows", [])}
    gen_tasks = {t for t in results["tasks"] if t != FIDELITY}

    new_rows: list[dict[str, Any]] = []
    methods: dict[str, dict[int, tuple[str, dict[str, Any]]]] = {}
    for n, o in enumerate(outputs, 1):
        missing = [f for f in OUTPUT_FIELDS if f not in o]
        if missing or o["format"] != OUTPUTS_FORMAT:
            raise InputError(f"external output {n} is not a {OUTPUTS_FORMAT} line (missing {', '.join(missing) or 'format'})")
        model = o.get("model")
        if model is not None and model != results["model"]:
            raise InputError(f"external output {n} is of model '{model}', the results of '{results['model']}': "
                             "merge outputs of prompts exported for the same model")
        if o["seed"] != results["seed"]:
            raise InputError(f"external output {n} has seed {o['seed']}, the results seed {results['seed']}: "
                             "export the prompts with the eval's --seed")
        if o["task"] not in gen_tasks or o["length"] not in results["lengths"]:
            raise InputError(f"external output {n} is {o['task']} at {o['length']} tokens, which the results do not "
                             f"hold (tasks {sorted(gen_tasks)}, lengths {results['lengths']})")
        key = sample_key(o)
        seen = headwise_tokens.get(key)
        if seen is not None and seen != o["prompt_tokens"]:
            raise InputError(f"external output {n} ({o['task']} {o['length']} depth {o['depth']} idx {o['idx']}) read "
                             f"{o['prompt_tokens']} prompt tokens where headwise's row of that sample has {seen}: "
                             "not the same prompt")
        src = by_sample.get(key, o)
        if "answers" not in src or "scoring" not in src:
            raise InputError(f"external output {n} carries no answers: pass the exported prompts file too")
        dense_tokens = spec.dense_kv_tokens(o["prompt_tokens"])
        label = o["label"]
        digest = _digest(label, o["method"], o["length"], o.get("model_key", results["model"]))
        had = methods.setdefault(label, {}).get(o["length"])
        if had is not None and had[0] != digest:
            raise InputError(f"external outputs labelled '{label}' at {o['length']} tokens ran two methods "
                             f"({had[1]['method']} and {o['method']}): give each its own label")
        methods[label][o["length"]] = (digest, o)
        new_rows.append({
            "plan": label, "digest": digest, "task": o["task"], "length": o["length"], "depth": o["depth"],
            "seed": o["seed"], "idx": o["idx"], "output": o["output"], "answers": src["answers"],
            "score": score(src["scoring"], o["output"], src["answers"]), "prompt_tokens": o["prompt_tokens"],
            "stats": {
                "kv_bytes": o["kv_tokens"] * 2 * spec.head_dim * itemsize,
                "dense_kv_bytes": dense_tokens * 2 * spec.head_dim * itemsize,
                "kv_fraction": o["kv_tokens"] / dense_tokens,
                "prompt_tokens": o["prompt_tokens"], "new_tokens": o["new_tokens"],
                "prefill_s": o.get("prefill_s"), "decode_s": o.get("decode_s"),
                "kv_bytes_allocator": o.get("kv_bytes_allocator"),
                # the most its cache held while the prompt ran (``kv_tokens_peak``; outputs written before
                # 2026-12-07 did not count it)
                **({"kv_fraction_peak": o["kv_tokens_peak"] / dense_tokens} if "kv_tokens_peak" in o else {}),
            },
        })

    out = dict(results)
    labels = set(methods)
    out["plans"] = [p for p in results["plans"] if p["label"] not in labels]
    for label, per_len in methods.items():
        any_o = next(iter(per_len.values()))[1]
        source = f"{any_o['method'].get('name', '?')} {any_o.get('method_version', '')}".strip()
        out["plans"].append({
            "label": label, "source": source, "external": True,
            "digest": {str(L): d for L, (d, _) in per_len.items()},
            "summary": {str(L): json.dumps(o["method"], sort_keys=True) for L, (_, o) in per_len.items()},
        })
    rows = [r for r in results.get("rows", []) if r["plan"] not in labels] + new_rows
    out["rows"] = rows
    acc, by_depth = score_tables(new_rows)
    out["accuracy"] = [a for a in results["accuracy"] if a["plan"] not in labels] + acc
    out["accuracy_by_depth"] = [a for a in results.get("accuracy_by_depth", []) if a["plan"] not in labels] + by_depth
    perf = [r for r in results["performance"] if r["plan"] not in labels]
    for label, per_len in methods.items():
        for L in sorted(per_len):
            st = [r["stats"] for r in new_rows if r["plan"] == label and r["length"] == L]
            frac = sum(s["kv_fraction"] for s in st) / len(st)
            target = per_len[L][1].get("kv_fraction_target")
            times = [s for s in st if s["prefill_s"] is not None and s["decode_s"] is not None]
            alloc = [s["kv_bytes_allocator"] for s in st if s["kv_bytes_allocator"] is not None]
            peaks = [s["kv_fraction_peak"] for s in st if "kv_fraction_peak" in s]
            pre = sum(s["prefill_s"] for s in times)
            dec = sum(s["decode_s"] for s in times)
            perf.append({
                "plan": label, "length": L,
                "kv_bytes": round(sum(s["kv_bytes"] for s in st) / len(st)),
                "dense_kv_bytes": round(sum(s["dense_kv_bytes"] for s in st) / len(st)),
                "kv_fraction": round(frac, 4),
                "planned_kv_fraction": None if target is None else round(float(target), 4),
                "measured_tokens": None, "kv_bytes_tensors": None,
                # the runner's CUDA allocator reading, where it ran on a GPU (its dtype, not the results')
                "kv_bytes_allocator": round(sum(alloc) / len(alloc)) if alloc else None,
                # the held cache's tensors, counted after each prompt by the external runner
                "kv_fraction_measured": round(frac, 4),
                # and the most they held while the prompt ran (kvpress cuts layer by layer inside the prefill
                # forward: its cut cache plus about one layer's whole context)
                "kv_fraction_peak": round(sum(peaks) / len(peaks), 4) if len(peaks) == len(st) else None,
                "planned_kv_bytes": None,
                "prefill_s": round(pre / len(times), 4) if times else None,
                "decode_s": round(dec / len(times), 4) if times else None,
                "prefill_tokens_per_s": round(sum(s["prompt_tokens"] for s in times) / pre, 2) if pre > 0 else None,
                "decode_tokens_per_s": round(sum(s["new_tokens"] for s in times) / dec, 2) if dec > 0 else None,
                "runs": len(st),
            })
    out["performance"] = perf
    notes = [n for n in results.get("notes", []) if not any(n.startswith(f"{lb}:") for lb in labels)]
    for label, per_len in methods.items():
        o = next(iter(per_len.values()))[1]
        notes.append(f"{label}: run outside headwise ({o.get('method_version', '?')}, {o.get('dtype', '?')} on "
                     f"{o.get('device', '?')}), merged from its outputs; KV counted from the token slots its cache held")
    out["notes"] = notes
    return out
