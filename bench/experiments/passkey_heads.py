"""Diagnostic: which KV heads look at the needle when the model answers, and what the plans did with them.

For eval-format prompts (passkey, needle; dense model), the attention mass each query head puts on the needle's
tokens from the last prompt position (the query that writes the first answer token), max over the query heads
of each KV head, averaged over prompts. Printed beside each plan's policy for the head and the profiler's scores
from the plan's metadata. A look at why a plan loses a task, not a result: the plan is never fitted to it.

    PYTHONPATH=src python bench/experiments/passkey_heads.py OUT.json PLAN.json [PLAN.json ...]
"""

from __future__ import annotations

import json
import sys

import torch

from headwise.bench.record import result_doc, write_result
from headwise.eval.tasks import make_sample
from headwise.models import load_model
from headwise.plan import HeadPlan
from headwise.profile.probe import Probe, probing


class NeedleMass(Probe):
    def __init__(self, layers: int, heads: int, span: tuple[int, int]):
        self.mass = torch.zeros(layers, heads)
        self.span = span

    def rows(self, layer: int, q_len: int) -> slice:
        return slice(q_len - 1, q_len)

    def observe(self, layer, weights, q_pos, k_pos):
        inside = (k_pos >= self.span[0]) & (k_pos < self.span[1])
        self.mass[layer] = weights[0, :, -1][:, inside].sum(-1).cpu()


def main() -> None:
    out, plan_paths = sys.argv[1], sys.argv[2:]
    lm = load_model("smollm2-135m", device="cpu")
    spec = lm.spec
    result: dict = {"command": " ".join(["python", *sys.argv]), "device": "cpu", "tasks": {}}
    for task in ("passkey", "needle"):
        total = torch.zeros(spec.num_layers, spec.num_q_heads)
        n = 0
        for depth in (0.1, 0.5, 0.9):
            for seed in range(2):
                s = make_sample(task, lm.tokenizer, 1024, depth, seed)
                ids = lm.tokenizer(s.prompt, return_tensors="pt").input_ids
                span = tuple(s.meta["needles"][0]["token_span"])
                probe = NeedleMass(spec.num_layers, spec.num_q_heads, span)
                with torch.no_grad(), probing(lm.model):
                    lm.model(input_ids=ids, headwise_probe=probe, use_cache=False, logits_to_keep=1)
                total += probe.mass
                n += 1
        kv = (total / n).view(spec.num_layers, spec.num_kv_heads, spec.group_size).amax(-1)
        result["tasks"][task] = [[round(float(v), 4) for v in row] for row in kv]
    plans = {p: HeadPlan.load(p) for p in plan_paths}
    rows = []
    for i in range(spec.num_layers):
        for j in range(spec.num_kv_heads):
            row = {"head": [i, j], **{t: result["tasks"][t][i][j] for t in result["tasks"]}}
            for p, plan in plans.items():
                row[p] = plan.policies()[i][j].short()
                for k in ("duo_kv", "retrieval_kv", "razor_kv"):
                    sc = plan.meta.get("scores", {}).get(k)
                    if sc is not None:
                        row[f"{k}@{p}"] = sc[i][j]
            rows.append(row)
    rows.sort(key=lambda r: -r["passkey"])
    result["heads_by_passkey_mass"] = rows
    write_result(result_doc("PYTHONPATH=src python bench/experiments/passkey_heads.py " + " ".join(sys.argv[1:]),
                            result), out)
    for r in rows[:20]:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
