"""Retrieval score per query head (Wu et al., 2024, https://arxiv.org/abs/2404.15574, section 2).

The model greedily answers needle prompts; for every generated token ``w`` and every query head ``h``, if the
position ``j`` that ``h`` attends to most lies inside the needle and the prompt token at ``j`` is ``w``,
``h`` copy-pasted ``w``. A head's score on one prompt is the number of needle positions it copied from over
the number of tokens of the needle's value; the retrieval score is the mean over prompts (lengths x depths).

Differences from the paper: the paper normalises by the needle's token count and uses Llama-scale models on
lengths up to 100K+; here prompts are the profiler's retrieval probes (``probes.py``: many haystacks, value
kinds and wordings, none shared with the evaluation's tasks) at a few lengths (default 512-2K tokens), and the denominator is the value's token count (what an answer can
copy: with the whole needle in the denominator every score is scaled by the same ~1/4 and the ranking is
unchanged). Prompts the model answers wrongly still count (their copy events are real), as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from headwise.models import LoadedModel
from headwise.profile.probe import Probe, greedy_generate


class ArgmaxProbe(Probe):
    """Records, per layer, each query head's most-attended absolute position for the forward's last query."""

    def __init__(self, num_layers: int, num_q_heads: int):
        self.argmax = torch.full((num_layers, num_q_heads), -1, dtype=torch.long)

    def rows(self, layer: int, q_len: int) -> slice:
        return slice(q_len - 1, q_len)

    def observe(self, layer: int, weights: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> None:
        # weights: [1, Hq, 1, S]
        self.argmax[layer] = k_pos[weights[0, :, -1].argmax(dim=-1)].cpu()


def copy_events(argmax: torch.Tensor, token: int, prompt_ids: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """Which heads copy-pasted ``token`` from the needle at this step.

    argmax: [layers, q_heads] most-attended absolute positions; prompt_ids: [T]; span: needle tokens
    ``[start, end)``. Returns bool [layers, q_heads]: the head looked inside the needle at a copy of ``token``.
    """
    inside = (argmax >= span[0]) & (argmax < span[1])
    looked = prompt_ids[argmax.clamp(0, prompt_ids.numel() - 1)]
    return inside & (looked == token)


@dataclass
class RetrievalResult:
    scores: torch.Tensor
    """[layers, q_heads] mean retrieval score."""
    accuracy: float
    """Share of prompts the model answered correctly (dense, for reference)."""
    n_prompts: int


def retrieval_scores(lm: LoadedModel, lengths: Sequence[int] = (512, 1024, 2048),
                     depths: Sequence[float] = (0.1, 0.5, 0.9), tasks: Sequence[str] = ("needle", "passkey"),
                     seed: int = 0, progress: bool = True) -> RetrievalResult:
    """Score every query head over ``len(tasks) x lengths x depths`` retrieval probes (``probes.py``: each in
    its own haystack, value kind and wording; ``tasks`` only sets how many probes per length and depth)."""
    from headwise.probes import retrieval_probe

    spec = lm.spec
    total = torch.zeros(spec.num_layers, spec.num_q_heads)
    correct = 0
    jobs = [(t, n, d) for t in range(len(tasks)) for n in lengths for d in depths]
    stop = {lm.tokenizer.eos_token_id} if lm.tokenizer.eos_token_id is not None else set()
    bar = tqdm(jobs, desc="retrieval score", unit="prompt", disable=not progress)
    for i, (_, length, depth) in enumerate(bar):
        probe_ = retrieval_probe(lm.tokenizer, length, depth, seed + i)
        ids = torch.tensor([probe_.ids])
        span = probe_.fact.span
        n_value = max(1, probe_.fact.value_span[1] - probe_.fact.value_span[0])
        probe = ArgmaxProbe(spec.num_layers, spec.num_q_heads)
        copied: list[set[int]] = [set() for _ in range(spec.num_layers * spec.num_q_heads)]

        def on_step(token: int, probe: ArgmaxProbe = probe, ids: torch.Tensor = ids,
                    span: tuple[int, int] = span, copied: list[set[int]] = copied) -> None:
            hit = copy_events(probe.argmax, token, ids[0], span).flatten()
            flat = probe.argmax.flatten()
            for h in hit.nonzero().flatten().tolist():
                copied[h].add(int(flat[h]))

        out = greedy_generate(lm, ids, probe_.max_new_tokens, probe, stop_ids=stop, on_step=on_step)
        text = lm.tokenizer.decode(out, skip_special_tokens=True)
        correct += int(probe_.answer in text)
        total += torch.tensor([min(1.0, len(c) / n_value) for c in copied]).view(spec.num_layers, spec.num_q_heads)
        bar.set_postfix(acc=f"{correct}/{i + 1}")
    return RetrievalResult(total / len(jobs), correct / len(jobs), len(jobs))
