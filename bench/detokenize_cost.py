"""Host time per generated token spent turning tokens into text: the engine's incremental detokenization
(``Sequence._detokenized``, through ``Sequence.accept`` with its stop-string check) against decoding every generated
token at every step, as the engine did before. A batched decode step pays this once per sequence on the host, where
the GPU waits for it.

    PYTHONPATH=src python3 bench/detokenize_cost.py [--model smollm2-135m] [--lengths 256,512,1024] [--out-dir bench/results]

Writes ``detokenize_cost_<date>.json``: per generation length, microseconds per token (mean over the generation)
both ways, on Shakespeare's tokens.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

from headwise.bench.record import save_result
from headwise.data import shakespeare
from headwise.models import load_model
from headwise.sequence import SamplingParams, Sequence


def measure(tokenizer: Any, ids: list[int], reps: int) -> dict[str, float]:
    def detokenize(window: list[int]) -> str:
        return tokenizer.decode(window, skip_special_tokens=True)

    inc, full = [], []
    for _ in range(reps):
        seq = Sequence("s", [1], SamplingParams(max_new_tokens=len(ids) + 1, stop=["</never>"]), set(), None)  # type: ignore[arg-type]
        t = time.perf_counter()
        for token in ids:
            seq.accept(token, detokenize)
        inc.append((time.perf_counter() - t) / len(ids))
        if seq.text != detokenize(ids):
            raise AssertionError("incremental text differs from decoding every token")
        t = time.perf_counter()
        for i in range(len(ids)):
            detokenize(ids[: i + 1])
        full.append((time.perf_counter() - t) / len(ids))
    return {"incremental_accept_us_per_token": round(1e6 * min(inc), 1),
            "decode_all_us_per_token": round(1e6 * min(full), 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="256,512,1024")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    tokenizer = load_model(args.model, device="cpu").tokenizer
    lengths = [int(x) for x in args.lengths.split(",")]
    ids = tokenizer(shakespeare(40_000), add_special_tokens=False)["input_ids"]
    results = {"model": args.model, "by_length": {n: measure(tokenizer, ids[:n], args.reps) for n in lengths}}
    for n, r in results["by_length"].items():
        print(f"{n:6d} tokens: {r['incremental_accept_us_per_token']:7.1f} us/token incremental (accept), "
              f"{r['decode_all_us_per_token']:7.1f} us/token decoding all", flush=True)
    command = "python3 bench/detokenize_cost.py " + " ".join(shlex.quote(a) for a in argv)
    print("wrote", save_result(command, results, args.out_dir, "detokenize_cost"))
    return results


if __name__ == "__main__":
    main()
