"""kvpress's presses on ``headwise eval``'s own prompts, run by kvpress itself in its own environment.

    headwise eval smollm2-135m --tasks passkey,needle --lengths 1k,2k --samples 100 --export-prompts prompts.jsonl
    .venv-kvpress/bin/python bench/kvpress/run_presses.py prompts.jsonl --presses streaming,snapkv,knorm \\
        --kv-fraction 0.5 --out kvpress-outputs.jsonl
    python bench/kvpress/import_outputs.py eval-out/smollm2-135m kvpress-outputs.jsonl --prompts prompts.jsonl

This file imports kvpress and transformers < 5.3, never headwise (which needs transformers >= 5.3): it reads the
exported JSON lines (token ids as headwise's engine encodes them) and writes one output line per press and sample
in the format ``headwise.eval.external`` merges (``headwise-external-outputs``).

How a sample runs, as kvpress's ``KVPressTextGenerationPipeline`` does (``_forward`` + ``generate_answer``): the
prompt but its last token is prefilled by ``model.model(...)`` inside ``with press(model):`` (the press's hooks
compress each layer's cache once, at prefill); the last prompt token then goes through the model at its position,
and greedy decoding continues token by token with explicit ``position_ids``, up to the sample's
``max_new_tokens`` or an end-of-sequence id of the model's generation config. The pipeline splits "context" from
"question" and compresses only the context; headwise's prompts are one text ending in the question and answer
prefix, and headwise's plans see it whole, so here the whole prompt is the context (question-aware presses such as
SnapKV see the question in their observation window, as in the SnapKV paper).

KV memory: after the prompt, the token slots the cache's tensors hold, summed over layers and KV heads
(``kv_tokens``, and per layer); the most they held at any moment while the prompt ran (``kv_tokens_peak``,
``PeakSlots``: the press cuts layer by layer inside the prefill forward, so its peak is its cut cache plus about one
layer's whole context, not dense's); their bytes (``kv_bytes``) and, on CUDA, what the allocator gave out from before the
cache was made to after the prompt, less the last logits (``kv_bytes_allocator``). kvpress's uniform presses
really shorten the cache tensors; presses that mask instead (DuoAttention, AdaKV) would hold dense-sized tensors,
and are counted so.

Matching memory: ``--kv-fraction F`` (or ``1024=F1,2048=F2``, or ``--match RESULTS.json:PLAN`` for a headwise plan's
measured KV fraction at each length) sets each press's ``compression_ratio = 1 - F``: a scorer press keeps
``int(n * (1 - ratio))`` tokens in every layer and KV head of an ``n``-token prompt, so on a model whose layers all
attend globally (SmolLM2) the cache holds F of dense.

Gemma 3 (``gemma3_text``, the text-only ``Gemma3ForCausalLM``) is refused unless ``--allow-gemma3``: kvpress 0.5.5
only knows ``Gemma3ForConditionalGeneration``, for which it leaves the sliding-window layers alone. Tested on
gemma-3-270m with transformers 4.57.6 (tests/test_kvpress_runner.py): in the cache kvpress's pipeline makes
(``DynamicCache()``, no config) the 15 sliding layers hold every prompt token instead of their 512-token window (more
memory than the model's own dense cache), the press cuts them by the same ratio as the 3 global layers, and kvpress
installs the global RoPE (theta 1e6) as every layer's ``rotary_emb``, which ExpectedAttentionPress uses on sliding
layers (theta 1e4). Nothing raises an error, and the dense model answers as headwise's does; the compressed numbers
are not kvpress's intended Gemma 3 behaviour.

The last stdout line is one JSON document (counts and seconds per press).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

OUTPUTS_FORMAT = "headwise-external-outputs"
PROMPTS_FORMAT = "headwise-prompts"

# name on the command line -> kvpress class name; each takes ``compression_ratio`` (kvpress's README presses).
PRESSES = {
    "streaming": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "expected_attention": "ExpectedAttentionPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
    "pyramidkv": "PyramidKVPress",
}
NO_PRESS = "none"
"""No press: the model dense in kvpress's environment, to check it answers as headwise's dense does."""
UNAVAILABLE = {
    "duo": "kvpress 0.5.5's DuoAttentionPress takes its head scores from the DuoAttention repository's patterns "
           "(downloaded from GitHub, and only for the 9 checkpoints in its PATTERNS_DICT, neither bundled model among "
           "them) or, with on_the_fly_scoring=True, computes them from 50 samples of the kmfoda/booksum dataset "
           "(downloaded from the Hugging Face hub); the GPU machine has no network, and it masks rather than evicts "
           "(no memory saved). headwise's own DuoAttention gates are in `headwise profile`.",
}


class UsageError(Exception):
    """Bad input to this script: printed in one line, exit code 2."""


# ------------------------------------------------------------------------------------------ inputs
def read_prompts(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UsageError(f"{path} does not exist: write it with `headwise eval MODEL ... --export-prompts {path}`")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path} line {n} is not JSON: is it an --export-prompts file?") from None
        if row.get("format") != PROMPTS_FORMAT:
            raise UsageError(f"{path} line {n} is not a {PROMPTS_FORMAT} line: write it with `headwise eval "
                             "--export-prompts`")
        rows.append(row)
    if not rows:
        raise UsageError(f"{path} holds no prompts")
    return rows


def parse_fractions(text: str) -> tuple[dict[int, float] | float, str]:
    """``"0.5"`` -> (0.5, ``"0.5"``); ``"1024=0.82,2048=0.44"`` -> ({1024: 0.82, 2048: 0.44}, ``"equal"``)."""
    try:
        if "=" not in text:
            f = float(text)
            fractions: dict[int, float] | float = f
            tag = f"{f:g}"
        else:
            fractions = {int(k): float(v) for k, v in (p.split("=") for p in text.split(","))}
            tag = "equal"
    except ValueError:
        raise UsageError(f"cannot read --kv-fraction '{text}': give F (0 < F <= 1) or LENGTH=F,LENGTH=F") from None
    for f in [fractions] if isinstance(fractions, float) else fractions.values():
        if not 0.0 < f <= 1.0:
            raise UsageError(f"a KV fraction must be in (0, 1], got {f}")
    return fractions, tag


def fractions_from_results(spec: str) -> dict[int, float]:
    """``RESULTS.json:PLAN`` -> the plan's measured KV fraction of dense per length in a ``headwise eval`` results
    file (``kv_fraction_measured``, else the per-sample ``kv_fraction``)."""
    path, _, label = spec.rpartition(":")
    if not path or not label:
        raise UsageError(f"--match takes RESULTS.json:PLAN_LABEL, got '{spec}'")
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    out = {}
    for r in results.get("performance", []):
        if r["plan"] == label:
            f = r.get("kv_fraction_measured") or r.get("kv_fraction")
            if f is not None:
                out[int(r["length"])] = min(1.0, float(f))
    if not out:
        plans = sorted({r["plan"] for r in results.get("performance", [])})
        raise UsageError(f"{path} has no KV fraction for plan '{label}'; its plans: {', '.join(plans)}")
    return out


# ------------------------------------------------------------------------------------------ model
def transformers4_config(config: Any) -> Any:
    """Carry a transformers-5 ``rope_parameters`` (what headwise's converted copies hold) into the fields
    transformers 4.x reads: without it 4.57 silently uses its defaults (SmolLM2: rope_theta 10000 instead of
    100000)."""
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict):
        return config
    if "full_attention" in rp:  # per layer type (Gemma 3)
        config.rope_theta = rp["full_attention"]["rope_theta"]
        if "sliding_attention" in rp:
            config.rope_local_base_freq = rp["sliding_attention"]["rope_theta"]
        scaling = rp["full_attention"]
    else:
        config.rope_theta = rp["rope_theta"]
        scaling = rp
    if scaling.get("rope_type", "default") != "default":
        config.rope_scaling = dict(scaling)
    return config


def load(model_dir: Path, device: str, dtype: torch.dtype, allow_gemma3: bool = False) -> tuple[Any, Any]:
    """The model and tokenizer of a Hugging Face directory (headwise's converted GGUF copies included: their
    safetensors may lack the ``format`` metadata 4.x's ``from_pretrained`` asks for, so the weights are read with
    safetensors directly)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    config = transformers4_config(AutoConfig.from_pretrained(model_dir))
    check_model(config, allow_gemma3)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir} has no .safetensors weights")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", torch_dtype=torch.float32)
    missing: set[str] = set()
    for f in files:
        m, _unexpected = load_model(model, str(f), strict=False)
        missing = (missing & set(m)) if missing else set(m)
    model.tie_weights()
    if missing - {"lm_head.weight"}:
        raise UsageError(f"{model_dir}: weights missing for {sorted(missing)[:5]}")
    model = model.to(device=device, dtype=dtype).eval()
    with contextlib.suppress(OSError):  # a folder without generation_config.json keeps the config's own
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except ValueError:  # saved by transformers 5 ("TokenizersBackend"): its tokenizer.json is all decoding needs
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    return model, tok


def check_model(config: Any, allow_gemma3: bool) -> None:
    """Refuse what kvpress 0.5.5 does not handle (a ``UsageError`` saying why)."""
    if config.model_type == "gemma3_text" and not allow_gemma3:
        raise UsageError(
            "kvpress 0.5.5 does not handle Gemma 3's text model: it skips the sliding-window layers only for "
            "Gemma3ForConditionalGeneration; on Gemma3ForCausalLM its pipeline cache keeps every token in the sliding "
            "layers, its presses cut them like the global ones, and every layer gets the global RoPE (wrong for "
            "ExpectedAttentionPress on sliding layers). Pass "
            "--allow-gemma3 to run it anyway (labels get '-untested')")


def make_press(name: str, fraction: float | None) -> tuple[Any, dict[str, Any]]:
    """The kvpress press for ``name`` at a compression ratio keeping ``fraction`` of the cache, and its description
    (class and arguments) for the output lines."""
    if name in UNAVAILABLE:
        raise UsageError(f"press '{name}' cannot run here: {UNAVAILABLE[name]}")
    if name == NO_PRESS:
        return None, {"name": "none"}
    if name not in PRESSES:
        raise UsageError(f"unknown press '{name}'; known: {', '.join([*PRESSES, NO_PRESS])}")
    import kvpress

    assert fraction is not None
    ratio = round(max(0.0, 1.0 - fraction), 6)
    press = getattr(kvpress, PRESSES[name])(compression_ratio=ratio)
    fields = {k: v for k, v in vars(press).items() if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}
    return press, {"name": PRESSES[name], **fields}


# ------------------------------------------------------------------------------------------ run
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slots(layer: Any) -> int:
    """Token slots (KV heads x tokens) a cache layer's keys hold; 0 before its first update."""
    keys = getattr(layer, "keys", None)
    return int(keys.shape[1] * keys.shape[2]) if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0


class PeakSlots:
    """The most token slots the cache holds while the context is prefilled, counted from its tensors.

    kvpress cuts each layer's cache in that layer's forward hook, during the one prefill forward: when layer ``i``'s
    attention has run, the layers before it hold their cut caches, layer ``i`` the whole context, and the press's cut
    copy of layer ``i`` is made while the whole is still held. So the peak is about the cut cache plus one layer's
    whole context (``kept / n + 1 / layers`` of dense for a uniform press), not dense's KV. ``before`` registers a hook
    on every attention layer ahead of the press's (it sees the layer whole); ``after``, registered behind them, adds the
    cut copy (``cut``: a press ran)."""

    def __init__(self, cache: Any, cut: bool) -> None:
        self.cache, self.cut, self.held, self.peak = cache, cut, 0, 0

    @contextlib.contextmanager
    def _hooks(self, model: Any, hook: Any) -> Any:
        handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def before(self, model: Any) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            self.held = sum(_slots(layer) for layer in self.cache.layers)
            self.peak = max(self.peak, self.held)
        return self._hooks(model, hook)

    def after(self, model: Any) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            if self.cut:
                self.peak = max(self.peak, self.held + _slots(self.cache.layers[module.layer_idx]))
        return self._hooks(model, hook)


@torch.no_grad()
def run_sample(model: Any, press: Any, ids: list[int], max_new_tokens: int) -> dict[str, Any]:
    """Greedy generation of one prompt under ``press`` (None: dense), as kvpress's pipeline decodes."""
    from transformers import DynamicCache

    device = model.device
    context = torch.tensor([ids[:-1]], device=device)
    cuda = device.type == "cuda"
    _sync(device)
    m0 = torch.cuda.memory_allocated(device) if cuda else 0
    cache = DynamicCache()
    peak = PeakSlots(cache, cut=press is not None)
    t0 = time.perf_counter()
    with peak.before(model):  # registered ahead of the press's hooks: they see each layer whole, before its cut
        if press is None:
            model.model(input_ids=context, past_key_values=cache)
        else:
            with press(model), peak.after(model):
                model.model(input_ids=context, past_key_values=cache)
    position = torch.tensor([[len(ids) - 1]], device=device)
    out = model(input_ids=torch.tensor([ids[-1:]], device=device), past_key_values=cache, position_ids=position,
                logits_to_keep=1)
    _sync(device)
    t1 = time.perf_counter()
    # the whole prompt is in the cache now: what it holds is what this press keeps of the prompt
    per_layer = [int(layer.keys.shape[1] * layer.keys.shape[2]) for layer in cache.layers]
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    # what the allocator gave out since before the cache was made, the cache alive and the prefill's activations
    # freed, less the one row of logits still referenced (as headwise's eval measures its own caches)
    allocated = torch.cuda.memory_allocated(device) - m0 - out.logits.nbytes if cuda else None
    stop = model.generation_config.eos_token_id
    stop_ids = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
    generated = [int(out.logits[0, -1].argmax())]
    while len(generated) < max_new_tokens and generated[-1] not in stop_ids:
        position = position + 1
        out = model(input_ids=torch.tensor([[generated[-1]]], device=device), past_key_values=cache,
                    position_ids=position)
        generated.append(int(out.logits[0, -1].argmax()))
    _sync(device)
    t2 = time.perf_counter()
    return {"output_ids": generated, "kv_tokens": sum(per_layer), "kv_tokens_per_layer": per_layer,
            "kv_tokens_peak": max(peak.peak, sum(per_layer)),
            "kv_bytes": int(kv_bytes), "kv_bytes_allocator": allocated,
            "prefill_s": round(t1 - t0, 5), "decode_s": round(t2 - t1, 5)}


def _done(path: Path) -> set[tuple[Any, ...]]:
    """(label, task, length, depth, seed, idx) of the lines already in ``path``: a cut run resumes there."""
    seen = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                seen.add((r["label"], r["task"], r["length"], r["depth"], r["seed"], r["idx"]))
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by an interrupt: that sample runs again
    return seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", type=Path, help="a `headwise eval ... --export-prompts` file")
    ap.add_argument("--presses", default="streaming,snapkv,expected_attention,knorm",
                    help=f"comma-separated: {', '.join([*PRESSES, NO_PRESS])} (default: the first four)")
    ap.add_argument("--kv-fraction", default=None, help="fraction of dense KV to keep: F, or LENGTH=F,LENGTH=F")
    ap.add_argument("--match", default=None, metavar="RESULTS.json:PLAN",
                    help="keep, at each length, the KV fraction a headwise plan measured in a `headwise eval` run "
                         "(labels end in @equal)")
    ap.add_argument("--model-dir", type=Path, default=None, help="default: the prompts' model_dir")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="default: bfloat16 on CUDA, float32 elsewhere (as headwise)")
    ap.add_argument("--tasks", default=None, help="only these tasks (comma-separated)")
    ap.add_argument("--lengths", default=None, help="only these lengths in tokens (comma-separated)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts (in the export's order)")
    ap.add_argument("--shard", default=None, metavar="I/N", help="only every N-th prompt from the I-th")
    ap.add_argument("--allow-gemma3", action="store_true", help="run Gemma 3 although kvpress does not handle it")
    ap.add_argument("--out", type=Path, default=Path("kvpress-outputs.jsonl"),
                    help="output JSON lines, appended to (a cut run resumes); default kvpress-outputs.jsonl")
    args = ap.parse_args(argv)
    try:
        return _main(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    import kvpress
    import transformers

    names = [n.strip() for n in args.presses.split(",") if n.strip()]
    for n in names:
        if n in UNAVAILABLE or (n not in PRESSES and n != NO_PRESS):
            make_press(n, 1.0)  # raises the reason
    needs_fraction = any(n != NO_PRESS for n in names)
    if needs_fraction and (args.kv_fraction is None) == (args.match is None):
        raise UsageError("give one of --kv-fraction F and --match RESULTS.json:PLAN")
    if args.match:
        fractions: dict[int, float] | float | None = fractions_from_results(args.match)
        tag = "equal"
    elif args.kv_fraction:
        fractions, tag = parse_fractions(args.kv_fraction)
    else:
        fractions, tag = None, ""

    prompts = read_prompts(args.prompts)
    if args.tasks:
        keep = set(args.tasks.split(","))
        prompts = [p for p in prompts if p["task"] in keep]
    if args.lengths:
        lens = {int(x) for x in args.lengths.split(",")}
        prompts = [p for p in prompts if p["length"] in lens]
    if args.shard:
        i, _, n = args.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
            raise UsageError(f"--shard takes I/N with 0 <= I < N, got '{args.shard}'")
        prompts = prompts[int(i)::int(n)]
    if args.limit is not None:
        prompts = prompts[: args.limit]
    if not prompts:
        raise UsageError("no prompt left after --tasks/--lengths/--shard/--limit")
    if isinstance(fractions, dict):
        missing = sorted({p["length"] for p in prompts} - set(fractions))
        if missing:
            raise UsageError(f"no KV fraction for length(s) {missing}: give LENGTH=F for each, or filter --lengths")

    model_dir = args.model_dir or (Path(prompts[0]["model_dir"]) if prompts[0].get("model_dir") else None)
    if model_dir is None:
        raise UsageError("the prompts name no model_dir: pass --model-dir")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    model, tok = load(model_dir, args.device, dtype, args.allow_gemma3)
    untested = "-untested" if model.config.model_type == "gemma3_text" else ""
    version = f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else _dist_version('kvpress')}, " \
              f"transformers {transformers.__version__}, torch {torch.__version__}"

    done = _done(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    with args.out.open("a") as fh:
        for name in names:
            label = f"kvpress:{name}{untested}" + (f"@{tag}" if name != NO_PRESS else "")
            t0, ran = time.perf_counter(), 0
            for p in prompts:
                key = (label, p["task"], p["length"], p["depth"], p["seed"], p["idx"])
                if key in done:
                    continue
                f = None if fractions is None else (fractions if isinstance(fractions, float)
                                                    else fractions[p["length"]])
                press, method = make_press(name, f)
                res = run_sample(model, press, p["input_ids"], int(p["max_new_tokens"]))
                fh.write(json.dumps({
                    "format": OUTPUTS_FORMAT, "label": label, "method": method, "method_version": version,
                    "model": p["model"], "model_key": p["model_key"], "model_dir": str(model_dir),
                    "task": p["task"], "length": p["length"], "depth": p["depth"], "seed": p["seed"], "idx": p["idx"],
                    "output": tok.decode(res["output_ids"], skip_special_tokens=True),
                    "output_ids": res["output_ids"], "prompt_tokens": len(p["input_ids"]),
                    "new_tokens": len(res["output_ids"]), "kv_tokens": res["kv_tokens"],
                    "kv_tokens_per_layer": res["kv_tokens_per_layer"], "kv_tokens_peak": res["kv_tokens_peak"],
                    "kv_bytes": res["kv_bytes"],
                    "kv_bytes_allocator": res["kv_bytes_allocator"],
                    "kv_fraction_target": f, "dtype": str(dtype).replace("torch.", ""), "device": args.device,
                    "prefill_s": res["prefill_s"], "decode_s": res["decode_s"],
                }) + "\n")
                fh.flush()
                ran += 1
            summary[label] = {"runs": ran, "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps({"out": str(args.out), "model_dir": str(model_dir), "versions": version, "presses": summary}))
    return 0


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
