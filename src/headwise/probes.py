"""Retrieval probes for the profiler: many formats, none of them shared with the evaluation tasks.

The profiler decides which heads must see the whole context from the model's behaviour on retrieval probes
(DuoAttention's gate training, the retrieval score). A plan fitted to one probe wording keeps that wording and
little else (issue 19: a plan that kept the project's own passkey kept 0.44-0.67 of dense on other needle
formats). So the probes here vary everything a retrieval prompt is made of, and the evaluation's tasks
(``eval/tasks.py``: RULER-style passkey, magic-number needles in Shakespeare, variable tracking, MQAR) use
none of it: evaluating on those measures how a plan does on formats its profile never saw.

What varies, each drawn per probe from a seeded ``random.Random``:

- the haystack (``HAYSTACKS``): word-salad sentences, log lines, inventory records, short code lines —
  never Shakespeare and never the eval's "The grass is green." filler;
- the value (``VALUES``): 4-, 6- or 8-digit numbers, hexadecimal ids, letter-digit codes, single words;
- the fact's wording, its question and the answer prefix (``TEMPLATES``).

``gate_sequence`` builds DuoAttention's training data (several facts, then all of them recalled, the loss
taken on the recall tokens); ``retrieval_probe`` builds one question about one fact (the retrieval score's
prompts, and the eval task ``probe``, which reports accuracy on the profiler's own formats beside the
held-out tasks).
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from headwise.errors import InputError

# --------------------------------------------------------------------------- ingredients
_WORDS = (
    "apple", "border", "candle", "desert", "engine", "forest", "glove", "hammer", "island", "jacket", "ladder",
    "magnet", "needle", "ocean", "pencil", "quartz", "rabbit", "saddle", "tomato", "umbrella", "valley", "window",
    "yellow", "zebra", "anchor", "basket", "cactus", "dolphin", "eagle", "feather", "garlic", "helmet", "igloo",
    "jungle", "kitten", "lemon", "mirror", "nickel", "orange", "parrot", "quiver", "rocket", "silver", "tunnel",
    "violet", "walrus", "oyster", "yogurt", "bridge", "cobalt", "drum", "ember", "fabric", "granite", "harbor",
    "ivory", "jasmine", "kernel", "lantern", "meadow", "nectar", "onion", "pepper", "quilt", "ribbon", "spruce",
    "thunder", "velvet", "willow", "breeze", "copper", "dune", "falcon", "glacier", "hazel", "indigo", "juniper",
)
_VERBS = ("moves", "holds", "drops", "finds", "keeps", "turns", "lifts", "shows", "bends", "opens", "fills", "marks")
_SERVICES = ("auth", "billing", "cache", "gateway", "indexer", "mailer", "queue", "scheduler", "search", "storage")
_LEVELS = ("INFO", "DEBUG", "WARN", "INFO", "INFO", "TRACE")


def _salad(rng: random.Random) -> str:
    a, b, c = rng.sample(_WORDS, 3)
    return f"The {a} {rng.choice(_VERBS)} the {b} near the {c}. "


def _log(rng: random.Random) -> str:
    return (f"{rng.randint(10, 23)}:{rng.randint(10, 59)}:{rng.randint(10, 59)} {rng.choice(_LEVELS)} "
            f"{rng.choice(_SERVICES)} worker {rng.randint(1, 64)} handled {rng.randint(1, 999)} requests\n")


def _inventory(rng: random.Random) -> str:
    return f"Shelf {rng.randint(1, 40)} stores {rng.randint(2, 90)} boxes of {rng.choice(_WORDS)}s. "


def _code(rng: random.Random) -> str:
    a, b = rng.sample(_WORDS, 2)
    return f"    {a}_count = {b}_count + {rng.randint(1, 9)}\n"


HAYSTACKS: dict[str, Callable[[random.Random], str]] = {
    "salad": _salad, "log": _log, "inventory": _inventory, "code": _code, "cycle": _salad,
}
"""Haystack units: each call returns one sentence or line. ``cycle`` repeats a few word-salad sentences over and
over (the regime of repeated-filler passkey tests, in sentences of its own), where the others never repeat."""


def _hex(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(8))


def _code_value(rng: random.Random) -> str:
    return "-".join(rng.choice(string.ascii_uppercase) + str(rng.randint(0, 9)) for _ in range(3))


VALUES: dict[str, Callable[[random.Random], str]] = {
    "digits4": lambda r: str(r.randint(1000, 9999)),
    "digits6": lambda r: str(r.randint(100000, 999999)),
    "digits8": lambda r: str(r.randint(10000000, 99999999)),
    "hex": _hex,
    "code": _code_value,
    "word": lambda r: r.choice(_WORDS),
}


@dataclass(frozen=True)
class Template:
    """How a fact is written, asked and answered (``{key}`` / ``{value}`` placeholders)."""

    fact: str
    question: str
    answer: str
    """The answer prefix the prompt ends with; the model continues it with the value."""


TEMPLATES: tuple[Template, ...] = (
    Template("The access code for {key} is {value}. ", "What is the access code for {key}?",
             "The access code for {key} is"),
    Template("Note: {key} -> {value}\n", "Which value does {key} point to?", "{key} ->"),
    Template("[record] name={key} value={value}\n", "Find the record named {key}.",
             "The record {key} has value="),
    Template("Remember that the {key} token equals {value}. ", "Recall the {key} token.",
             "The {key} token equals"),
    Template("setting {key} := {value};\n", "What was {key} set to?", "{key} :="),
)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_WORDS)}-{rng.randint(10, 99)}"


@dataclass
class ProbeFormat:
    haystack: str
    value: str
    template: Template


def random_format(rng: random.Random) -> ProbeFormat:
    return ProbeFormat(rng.choice(sorted(HAYSTACKS)), rng.choice(sorted(VALUES)), rng.choice(TEMPLATES))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []


@dataclass
class Fact:
    key: str
    value: str
    span: tuple[int, int]
    """Token positions ``[start, end)`` of the whole fact in the sequence."""
    value_span: tuple[int, int]
    """Token positions of the value inside it."""


def _fact_ids(tokenizer: Any, tpl: Template, key: str, value: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of one fact and the span of its value inside them (the value tokenized in context)."""
    before, after = tpl.fact.split("{value}")
    head = _ids(tokenizer, before.format(key=key))
    whole = _ids(tokenizer, (before + "{value}" + after).format(key=key, value=value))
    with_value = _ids(tokenizer, (before + "{value}").format(key=key, value=value))
    # The prefix's last token may merge with the value's first; the value starts where the ids first differ.
    start = next((i for i, (a, b) in enumerate(zip(head, with_value)) if a != b), len(head))
    return whole, (start, len(with_value))


def _filled(tokenizer: Any, rng: random.Random, haystack: str, n_tokens: int,
            inserts: list[tuple[float, list[int]]]) -> tuple[list[int], list[int]]:
    """Haystack units up to ``n_tokens`` with each ``(depth, ids)`` insert placed between units at that relative
    depth. Returns the ids and each insert's start offset (in the order given)."""
    unit = HAYSTACKS[haystack]
    if haystack == "cycle":
        few = [unit(rng) for _ in range(rng.randint(3, 6))]
        turn = itertools.count()
        unit = lambda r: few[next(turn) % len(few)]  # noqa: E731
    pieces: list[list[int]] = []
    total = sum(len(ids) for _, ids in inserts)
    while total < n_tokens:
        # Units are tokenized in batches (one call of the fast tokenizer for many): data for gate training is
        # drawn at every step.
        for ids in tokenizer([unit(rng) for _ in range(64)], add_special_tokens=False).input_ids:
            if total >= n_tokens:
                break
            pieces.append(list(ids))
            total += len(ids)
    if pieces and total > n_tokens:  # trim the last unit to land on the length
        pieces[-1] = pieces[-1][: len(pieces[-1]) - (total - n_tokens)]
    slots: dict[int, list[int]] = {}
    for i, (depth, _) in enumerate(inserts):
        slots.setdefault(round(depth * len(pieces)), []).append(i)
    out: list[int] = []
    starts = [0] * len(inserts)
    for k in range(len(pieces) + 1):
        for i in slots.get(k, []):
            starts[i] = len(out)
            out += inserts[i][1]
        if k < len(pieces):
            out += pieces[k]
    return out, starts


@dataclass
class GateSequence:
    ids: list[int]
    """The whole sequence: BOS, haystack with facts, then every fact recalled."""
    recall_tokens: int
    """The last ``recall_tokens`` ids are the recall section (where the distillation loss is taken)."""
    format: ProbeFormat


def gate_sequence(tokenizer: Any, length: int, n_facts: int, rng: random.Random) -> GateSequence:
    """DuoAttention training data in a random format: ``n_facts`` facts at random depths in ``length`` tokens,
    then each fact asked and answered in turn (the answers copy values from far back)."""
    fmt = random_format(rng)
    tpl = fmt.template
    keys = list(dict.fromkeys(_key(rng) for _ in range(n_facts * 2)))[:n_facts]
    values = [VALUES[fmt.value](rng) for _ in keys]
    recall_text = "".join(f"\n{tpl.question.format(key=k)} {tpl.answer.format(key=k)} {v}."
                          for k, v in zip(keys, values))
    recall = _ids(tokenizer, recall_text)
    facts = [(rng.random(), _fact_ids(tokenizer, tpl, k, v)[0]) for k, v in zip(keys, values)]
    room = length - len(_bos(tokenizer)) - len(recall)
    if room < sum(len(f) for _, f in facts) + 16:
        raise InputError(f"a gate-training sequence of {length} tokens is too short for {n_facts} facts")
    body, _ = _filled(tokenizer, rng, fmt.haystack, room, facts)
    return GateSequence(_bos(tokenizer) + body + recall, len(recall), fmt)


@dataclass
class RetrievalProbe:
    ids: list[int]
    """BOS, haystack with the facts, the question and the answer prefix."""
    answer: str
    fact: Fact
    """The asked fact (token spans in ``ids``)."""
    distractors: int
    format: ProbeFormat

    @property
    def max_new_tokens(self) -> int:
        return 16


def retrieval_probe(tokenizer: Any, length: int, depth: float, seed: int, distractors: int = 2) -> RetrievalProbe:
    """One question about one fact at ``depth`` among ``distractors`` other facts of the same format, in
    ``length`` tokens (within a few tokens), in a format drawn from ``seed``."""
    rng = random.Random(f"headwise-probe:{length}:{depth}:{seed}")
    fmt = random_format(rng)
    tpl = fmt.template
    keys = list(dict.fromkeys(_key(rng) for _ in range(2 * (distractors + 1))))[: distractors + 1]
    values = [VALUES[fmt.value](rng) for _ in keys]
    tail = _ids(tokenizer, f"\n\n{tpl.question.format(key=keys[0])} {tpl.answer.format(key=keys[0])}")
    facts = [_fact_ids(tokenizer, tpl, k, v) for k, v in zip(keys, values)]
    depths = [depth] + [rng.random() for _ in keys[1:]]
    room = length - len(_bos(tokenizer)) - len(tail)
    if room < sum(len(f) for f, _ in facts) + 16:
        raise InputError(f"a retrieval probe of {length} tokens is too short; use a longer length")
    body, starts = _filled(tokenizer, rng, fmt.haystack, room, [(d, f) for d, (f, _) in zip(depths, facts)])
    off = len(_bos(tokenizer))
    ids0, vspan = facts[0]
    s = off + starts[0]
    fact = Fact(keys[0], values[0], (s, s + len(ids0)), (s + vspan[0], s + vspan[1]))
    return RetrievalProbe(_bos(tokenizer) + body + tail, values[0], fact, distractors, fmt)
