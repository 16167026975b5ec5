"""Scoring generated text against a task's answers.

Two rules, as in RULER's ``string_match_part`` / ``string_match_all``:

- ``contains`` (passkey, needle, multikey_needle): 1.0 if any answer appears in the output, else 0.0.
- ``recall`` (multi-value, multi-query, variable tracking, word extraction, MQAR): the fraction of answers
  that appear in the output.

"Appears" is stricter than RULER's substring test: the answer must stand as a whole word (``71432`` is
not found in ``714329``, ``fair`` not in ``affair``), so listing long digit strings earns nothing. Matching is
case-insensitive and whitespace-insensitive (runs of whitespace count as one space, and digits split by
spaces, as small models sometimes write ``7 1 4 3 2``, are joined).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from headwise.errors import InputError

_SPACES = re.compile(r"\s+")
_SPLIT_DIGITS = re.compile(r"(?<=\d)\s+(?=\d)")


def normalize(text: str) -> str:
    """Lowercase, whitespace runs collapsed to one space, stripped."""
    return _SPACES.sub(" ", text).strip().lower()


def found(answer: str, output: str) -> bool:
    """Whether ``answer`` appears in ``output`` as a whole word (case and whitespace insensitive)."""
    a = normalize(answer)
    if not a:
        return False
    pattern = re.compile(r"(?<![0-9a-z])" + re.escape(a) + r"(?![0-9a-z])")
    out = normalize(output)
    if pattern.search(out):
        return True
    return a.isdigit() and bool(pattern.search(_SPLIT_DIGITS.sub("", out)))


def score(rule: str, output: str, answers: Sequence[str]) -> float:
    """Score in [0, 1] of ``output`` under ``rule`` (``contains`` or ``recall``)."""
    if not answers:
        raise InputError("a sample with no answers cannot be scored")
    hits = [found(a, output) for a in answers]
    if rule == "contains":
        return 1.0 if any(hits) else 0.0
    if rule == "recall":
        return sum(hits) / len(hits)
    raise InputError(f"unknown scoring rule '{rule}'; known: contains, recall")


def score_task(task: str, output: str, answers: Sequence[str]) -> float:
    """Score ``output`` by the rule of ``task`` (see ``tasks.TASKS``)."""
    from headwise.eval.tasks import task_info

    return score(task_info(task).scoring, output, answers)


def paired_ratio(both: int, only_plan: int, only_ref: int, neither: int, z: float = 1.96) -> dict[str, Any]:
    """A plan's accuracy as a share of a reference's on the same prompts (paired): ``(both + only_plan) / (both +
    only_ref)``, with the adjusted log interval of Bonett & Price (2006) for a ratio of paired proportions
    (one pseudo-success added to each margin: exp(log ratio +- z sqrt((b + c + 2) / ((a + b + 1)(a + c + 1))))),
    and the exact McNemar p-value of the discordant pairs (is the plan different from the reference at all?).

    "Keeps 0.95 of dense accuracy" is this ratio. It credits prompts the plan answers and dense does not, which
    "kept of dense" (``report.retention``: of dense's answers, the share the plan also answers) does not: where the
    model is on an edge (SmolLM2's 2K passkey at depth 0.9, dense 45%), both flip answers either way."""
    n = both + only_plan + only_ref + neither
    a, b, c = both, only_plan, only_ref
    ref = a + c
    out: dict[str, Any] = {"pairs": n, "both": a, "only_plan": b, "only_ref": c,
                           "ratio": round((a + b) / ref, 4) if ref else None, "ratio_ci95": None}
    if n:
        p1, p2 = (a + b + 1) / (n + 2), (a + c + 1) / (n + 2)
        se = math.sqrt((b + c + 2) / ((a + b + 1) * (a + c + 1)))
        centre = math.log(p1 / p2)
        out["ratio_ci95"] = [round(math.exp(centre - z * se), 4), round(math.exp(centre + z * se), 4)]
    k, m = min(b, c), b + c
    out["mcnemar_p"] = round(min(1.0, 2 * half_binomial_tail(k, m)), 4) if m else 1.0
    return out


def half_binomial_tail(k: int, m: int) -> float:
    """P(X <= k) for X ~ Binomial(m, 1/2): the tail of the exact sign test (McNemar's on ``m`` discordant pairs); 1.0
    when ``m`` is 0."""
    return sum(math.comb(m, i) for i in range(k + 1)) / 2**m


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a proportion ``p`` observed over ``n`` samples. For tasks scored by
    recall (fractions of answers per sample), ``p`` is the mean score and ``n`` the samples: the interval treats
    each sample as one trial, which is wider than counting answers as independent trials."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
