"""Echo and induction scores per query head (RazorAttention, Tang et al., 2024, https://arxiv.org/abs/2407.15891).

Feed sequences of random tokens repeated ``repeats`` times. For a query at position ``i`` in a repeat, with
the same token at ``i - n``, ``i - 2n``, ... (``n`` = segment length):

* echo score: attention on the earlier occurrences of the current token (``i - r*n``);
* induction score: attention on the token right after an earlier occurrence (``i - r*n + 1``), the one
  an induction head copies as the next prediction.

Scores are means over the queries of the repeats (the first segment has no earlier occurrence) and over
``batch`` sequences. RazorAttention then keeps the full cache for the top heads by these scores (their
paper protects the top 15% induction and 1% echo heads); here the scores go to the solver like any other.
Differences: the paper's sequences are ~2.5K tokens of random tokens repeated; here ``n = 256`` tokens
repeated 3 times (768 tokens) by default, enough to separate the heads on the bundled models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from headwise.models import LoadedModel
from headwise.profile.probe import Probe, probing


class RepeatProbe(Probe):
    """Accumulates echo and induction mass for queries after the first segment."""

    def __init__(self, num_layers: int, num_q_heads: int, segment: int):
        self.n = segment
        self.echo = torch.zeros(num_layers, num_q_heads)
        self.induction = torch.zeros(num_layers, num_q_heads)
        self.count = 0.0

    def rows(self, layer: int, q_len: int) -> slice | None:
        return slice(self.n, q_len) if q_len > self.n else None

    def observe(self, layer: int, weights: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> None:
        # weights: [B, Hq, Lq, S]; an earlier occurrence of the query's token sits at distance r*n
        dist = q_pos[:, None] - k_pos[None, :]
        echo = (dist > 0) & (dist % self.n == 0)
        induction = (dist > 0) & ((dist + 1) % self.n == 0) & (dist + 1 >= self.n)
        self.echo[layer] += weights.masked_fill(~echo, 0).sum(dim=(0, 2, 3)).cpu()
        self.induction[layer] += weights.masked_fill(~induction, 0).sum(dim=(0, 2, 3)).cpu()
        if layer == 0:
            self.count += float(weights.shape[0] * weights.shape[2])


@dataclass
class RazorResult:
    echo: torch.Tensor
    """[layers, q_heads] mean attention on earlier occurrences of the current token."""
    induction: torch.Tensor
    """[layers, q_heads] mean attention on the token after an earlier occurrence."""

    @property
    def score(self) -> torch.Tensor:
        """[layers, q_heads] max(echo, induction): a head doing either needs the whole context."""
        return torch.maximum(self.echo, self.induction)


def repeated_random_tokens(vocab_size: int, segment: int, repeats: int, batch: int, seed: int = 0,
                           low: int = 1000) -> torch.Tensor:
    """[batch, segment*repeats] random ordinary tokens (ids >= ``low``, away from special tokens), each row
    one random segment repeated."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(low, vocab_size, (batch, segment), generator=g)
    return seg.repeat(1, repeats)


def razor_scores(lm: LoadedModel, segment: int = 256, repeats: int = 3, batch: int = 2, seed: int = 0,
                 progress: bool = True) -> RazorResult:
    spec = lm.spec
    vocab = int(lm.model.get_input_embeddings().weight.shape[0])
    ids = repeated_random_tokens(min(vocab, len(lm.tokenizer)), segment, repeats, batch, seed)
    probe = RepeatProbe(spec.num_layers, spec.num_q_heads, segment)
    device = next(lm.model.parameters()).device
    with torch.inference_mode(), probing(lm.model):
        for b in tqdm(range(batch), desc="echo/induction", unit="seq", disable=not progress):
            probe.q_start = 0
            lm.model(input_ids=ids[b : b + 1].to(device), headwise_probe=probe, use_cache=False, logits_to_keep=1)
    count = max(1.0, probe.count)
    return RazorResult(probe.echo / count, probe.induction / count)
