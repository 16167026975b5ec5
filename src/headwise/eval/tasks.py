"""Long-context tasks, generated offline from a seed and sized in the model's own tokenizer.

    sample = make_sample("needle", tokenizer, length=4096, depth=0.5, seed=3)
    sample.prompt        # ends with an answer prefix ("... the special magic number for X ... is")
    sample.answers       # what a right answer contains
    sample.meta["needles"][0]["token_span"]   # prompt tokens [start, end) of the needle

Every prompt is built around a *filler* whose size is searched (bisection on a count of characters, sentences
or words) until the whole prompt, tokenized as the engine tokenizes it (``add_special_tokens=True``), is
within 2% of the requested length (in practice within a few tokens). Each prompt ends with an answer prefix
("The pass key is"), so base and instruct models both answer by continuing the text.

Tasks (``TASKS``):

- ``passkey``: a five-digit pass key in repeated filler sentences ("The grass is green. ..."), as in the
  Landmark Attention and DuoAttention passkey tests. Depth = where in the filler the key sits.
- ``needle``: one key-value fact ("One of the special magic numbers for silver-lantern is: 4726193.") in a
  Shakespeare haystack at a depth (Needle in a Haystack; wording of RULER's ``niah_single``).
- ``multikey_needle``: the queried needle plus 3 distractor needles with other keys (RULER ``niah_multikey``).
- ``multivalue_needle``: one key with 4 values; all must be recalled (RULER ``niah_multivalue``).
- ``multiquery_needle``: 4 needles, all 4 keys queried (RULER ``niah_multiquery``).
- ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... spread through filler; name every
  variable holding the value (RULER ``vt``, one chain of 4 hops).
- ``common_words``: a numbered word list where 10 words repeat often; name them (RULER ``cwe``). RULER
  fixes 30 repeats of each common word and 3 of the others; here the common words repeat ``max(3, entries/33)``
  times and the others once, so the task keeps its shape at 1K tokens, where 300 repeats do not fit.
- ``frequent_words``: coded words drawn with Zipf (alpha 2) frequencies; name the 3 most frequent (RULER
  ``fwe``). Counts are set from the Zipf weights rather than sampled, so the top 3 are never tied.
- ``probe``: one of the profiler's retrieval probes (``probes.py``: other haystacks, values and wordings than
  every task above). The profiler never sees the tasks above; this one is what it was fitted on.
- ``mqar``: Multi-Query Associative Recall (Arora et al., Zoology, https://arxiv.org/abs/2312.04927) in
  words: a list of ``key = value`` pairs, then 4 queried keys; the model continues "k1 =" and must give each
  value in turn. Zoology feeds token ids to models trained on the task; a pretrained LM reads the pairs as
  text, and recall is scored on the generated continuation.

Needle-type samples (passkey and the ``*needle`` tasks) record each needle in ``meta["needles"]``: its
character span and token span in the prompt, the span of the value inside it, its relative depth, and the
token ids of the answer as the model would generate them (``answer_token_ids``), for the profiler's
retrieval scores. ``meta["needle_token_span"]`` / ``meta["needle_char_span"]`` name the queried needle.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from headwise.errors import InputError

LENGTH_TOLERANCE = 0.02
"""Prompts are sized to the requested token count within this fraction (the target is closer: see ``_fit``)."""


@dataclass
class Sample:
    task: str
    prompt: str
    answers: list[str]
    length: int
    """Requested length in tokens (the prompt's own count is ``meta["n_tokens"]``)."""
    depth: float | None
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def max_new_tokens(self) -> int:
        """Tokens to generate for a complete answer (set by the task)."""
        return int(self.meta.get("max_new_tokens", 32))


@dataclass(frozen=True)
class TaskInfo:
    name: str
    build: Callable[[Any, int, float | None, random.Random], tuple[str, list[str], dict[str, Any]]]
    uses_depth: bool
    scoring: str
    """``contains`` (one answer must appear) or ``recall`` (fraction of answers that appear)."""
    max_new_tokens: int
    description: str


# --------------------------------------------------------------------------- text sources
_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
_ADJECTIVES = (
    "silver", "amber", "quiet", "rapid", "golden", "hollow", "bitter", "gentle", "frozen", "crimson", "ancient",
    "humble", "velvet", "bright", "narrow", "distant", "hidden", "scarlet", "wooden", "silent", "rusty", "lucky",
    "stormy", "noble", "purple", "tender", "wild", "copper", "shallow", "clever",
)
_NOUNS = (
    "lantern", "harbor", "meadow", "falcon", "compass", "orchard", "anchor", "violin", "glacier", "kettle", "river",
    "beacon", "castle", "pepper", "thistle", "walnut", "ribbon", "canyon", "marble", "lizard", "feather", "bridge",
    "tunnel", "garden", "saddle", "mirror", "rocket", "pillow", "basket", "dragon",
)


@lru_cache(maxsize=1)
def _shakespeare() -> str:
    from headwise.data import shakespeare

    return shakespeare(10**9)


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words of 4-9 letters from Shakespeare, sorted (a stable word pool)."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,9}\b", _shakespeare()))))


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True).input_ids)


def _fit(tokenizer: Any, build: Callable[[int], str], target: int, hi: int, what: str) -> tuple[int, str]:
    """Bisection on the filler size ``n`` in ``[0, hi]`` for the prompt whose token count is closest to
    ``target``; returns ``(n, prompt)``; raises ``InputError`` if none is within ``LENGTH_TOLERANCE``."""
    best_n, best_text = 0, build(0)
    best_err = abs(_n_tokens(tokenizer, best_text) - target)
    lo_n, hi_n = 0, hi
    while lo_n <= hi_n:
        mid = (lo_n + hi_n) // 2
        text = build(mid)
        n = _n_tokens(tokenizer, text)
        if abs(n - target) < best_err:
            best_n, best_text, best_err = mid, text, abs(n - target)
        if n == target:
            break
        if n < target:
            lo_n = mid + 1
        else:
            hi_n = mid - 1
    if best_err > LENGTH_TOLERANCE * target:
        found = _n_tokens(tokenizer, best_text)
        raise InputError(
            f"cannot size a {what} prompt to {target} tokens (closest: {found}); "
            f"lengths this small leave no room for the filler — use a longer length"
        )
    return best_n, best_text


def _insert_at(parts: list[str], inserts: list[tuple[float, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Join filler ``parts`` and put each ``(depth, text)`` insert between parts at that relative depth.

    Parts that end a line (haystack words) take inserts only at line starts: an insert goes to the line
    boundary nearest its depth, so a needle never splits a verse line. Returns the text and each insert's
    character span, in the order given.
    """
    n = len(parts)
    lined = any(p.endswith("\n") for p in parts)
    starts = [k for k in range(n + 1) if k in (0, n) or parts[k - 1].endswith("\n")] if lined else None
    slots: dict[int, list[int]] = {}
    for i, (depth, _) in enumerate(inserts):
        k = round(depth * n)
        if starts is not None:
            k = min(starts, key=lambda s: (abs(s - k), s))
        slots.setdefault(k, []).append(i)
    out: list[str] = []
    pos = 0
    spans: list[tuple[int, int]] = [(0, 0)] * len(inserts)
    for k in range(n + 1):
        for i in slots.get(k, []):
            spans[i] = (pos, pos + len(inserts[i][1]))
            out.append(inserts[i][1])
            pos += len(inserts[i][1])
        if k < n:
            out.append(parts[k])
            pos += len(parts[k])
    return "".join(out), spans


def _haystack_lines(rng: random.Random, length: int) -> list[str]:
    """Shakespeare words from a seeded offset (line starts), enough for ``length`` tokens."""
    text = _shakespeare()
    need = length * 7 + 4000  # generous: old English runs ~3.5-4.5 characters per token
    if need >= len(text):
        raise InputError(f"the Shakespeare haystack holds about {len(text) // 5} tokens; {length} is too long")
    start = rng.randrange(0, len(text) - need)
    start = text.index("\n", start) + 1
    # Words (with their trailing space or newline) are the unit of size, so short prompts fit closely.
    return re.findall(r"\S+\s*", text[start : start + need])


def _words(rng: random.Random, k: int) -> list[str]:
    return rng.sample(_vocabulary(), k)


def _needle_keys(rng: random.Random, k: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in _ADJECTIVES for b in _NOUNS], k)
    return [f"{a}-{b}" for a, b in pairs]


# --------------------------------------------------------------------------- needles
def _needle_prompt(tokenizer: Any, length: int, rng: random.Random, head: str, parts: list[str],
                   needles: list[tuple[float, str]], tail: str, what: str) -> tuple[str, list[tuple[int, int]]]:
    """Fit ``head + filler(with needles) + tail`` to ``length``; returns the prompt and needle char spans."""
    def build(n: int) -> str:
        body, _ = _insert_at(parts[:n], needles)
        return head + body + tail

    n, prompt = _fit(tokenizer, build, length, len(parts), what)
    _, spans = _insert_at(parts[:n], needles)
    return prompt, [(s + len(head), e + len(head)) for s, e in spans]


def _token_span(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Tokens ``[first, last+1)`` whose characters overlap ``[start, end)``."""
    idx = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    return [idx[0], idx[-1] + 1] if idx else [0, 0]


def _needle_meta(tokenizer: Any, prompt: str, items: list[dict[str, Any]], query: int | None,
                 haystack: tuple[int, int]) -> dict[str, Any]:
    """Add token spans (and answer token ids) to needle records holding char spans; ``haystack`` is the char
    span of the filler with its needles (between the instruction and the question)."""
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    for it in items:
        it["token_span"] = _token_span(offsets, *it["char_span"])
        it["value_token_span"] = _token_span(offsets, *it["value_char_span"])
        it["answer_token_ids"] = tokenizer(" " + it["value"], add_special_tokens=False).input_ids
    meta: dict[str, Any] = {
        "needles": items,
        "n_tokens": len(enc["input_ids"]),
        "haystack_char_span": list(haystack),
        "haystack_token_span": _token_span(offsets, *haystack),
    }
    if query is not None:
        meta["needle_char_span"] = items[query]["char_span"]
        meta["needle_token_span"] = items[query]["token_span"]
    return meta


def _needle_records(prompt: str, spans: list[tuple[int, int]], texts: list[tuple[float, str]],
                    keys: list[str], values: list[str]) -> list[dict[str, Any]]:
    out = []
    for (s, e), (depth, _), key, value in zip(spans, texts, keys, values):
        v = prompt.index(value, s, e)
        out.append({"key": key, "value": value, "depth": depth, "char_span": [s, e],
                    "value_char_span": [v, v + len(value)]})
    return out


def _passkey(tokenizer: Any, length: int, depth: float | None, rng: random.Random):
    key = str(rng.randint(10000, 99999))
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n\n")
    parts = [_FILLER[i % len(_FILLER)] + " " for i in range(length)]  # a sentence is >= 3 tokens: enough
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    d = 0.5 if depth is None else depth
    tail = "\n\nWhat is the pass key? The pass key is"
    prompt, spans = _needle_prompt(tokenizer, length, rng, head, parts, [(d, needle)], tail, "passkey")
    items = _needle_records(prompt, spans, [(d, needle)], ["pass key"], [key])
    return prompt, [key], _needle_meta(tokenizer, prompt, items, 0, (len(head), len(prompt) - len(tail)))


_NIAH_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n\n")


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}.\n"


def _value(rng: random.Random, taken: set[str]) -> str:
    while True:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in taken:
            taken.add(v)
            return v


def _niah(tokenizer: Any, length: int, depth: float | None, rng: random.Random, n_keys: int, n_values: int,
          n_queries: int, what: str):
    """RULER's needle family: ``n_keys`` keys, ``n_values`` values per key, the first ``n_queries`` keys asked."""
    parts = _haystack_lines(rng, length)
    keys = _needle_keys(rng, n_keys)
    taken: set[str] = set()
    rec_keys, rec_values, texts = [], [], []
    for k in keys:
        for _ in range(n_values):
            rec_keys.append(k)
            rec_values.append(_value(rng, taken))
    n = len(rec_keys)
    if depth is not None:  # single needle: at the stated depth
        depths = [depth]
    else:  # several needles: seeded random depths, as RULER does
        depths = [rng.random() for _ in range(n)]
    texts = [(d, _magic(k, v)) for d, k, v in zip(depths, rec_keys, rec_values)]
    asked = keys[:n_queries]
    if n_values > 1:
        q = (f"What are all the special magic numbers for {asked[0]} mentioned in the provided text? "
             f"The special magic numbers for {asked[0]} mentioned in the provided text are")
    elif n_queries > 1:
        names = ", ".join(asked[:-1]) + f" and {asked[-1]}"
        q = (f"What are the special magic numbers for {names} mentioned in the provided text? "
             f"The special magic numbers for {names} mentioned in the provided text are")
    else:
        q = (f"What is the special magic number for {asked[0]} mentioned in the provided text? "
             f"The special magic number for {asked[0]} mentioned in the provided text is")
    tail = "\n" + q
    prompt, spans = _needle_prompt(tokenizer, length, rng, _NIAH_HEAD, parts, texts, tail, what)
    items = _needle_records(prompt, spans, texts, rec_keys, rec_values)
    answers = [it["value"] for it in items if it["key"] in asked]
    meta = _needle_meta(tokenizer, prompt, items, 0 if n_values == 1 and n_queries == 1 else None,
                        (len(_NIAH_HEAD), len(prompt) - len(tail)))
    meta["queried_keys"] = asked
    return prompt, answers, meta


def _needle(tokenizer, length, depth, rng):
    return _niah(tokenizer, length, 0.5 if depth is None else depth, rng, 1, 1, 1, "needle")


def _multikey(tokenizer, length, depth, rng):
    return _niah(tokenizer, length, None, rng, 4, 1, 1, "multikey_needle")


def _multivalue(tokenizer, length, depth, rng):
    return _niah(tokenizer, length, None, rng, 1, 4, 1, "multivalue_needle")


def _multiquery(tokenizer, length, depth, rng):
    return _niah(tokenizer, length, None, rng, 4, 1, 4, "multiquery_needle")


# --------------------------------------------------------------------------- aggregation tasks
def _variable_tracking(tokenizer: Any, length: int, depth: float | None, rng: random.Random):
    hops = 4
    names: list[str] = []
    while len(names) < hops + 1:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in names:
            names.append(v)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[i + 1]} = VAR {names[i]}. " for i in range(hops)]
    # Evenly spread, in order (a variable is assigned after the one it copies), with seeded jitter.
    depths = sorted((i + 0.2 + 0.6 * rng.random()) / len(chain) for i in range(len(chain)))
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    parts = [_FILLER[i % len(_FILLER)] + " " for i in range(length)]
    tail = (f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above. "
            f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
            f"are assigned the value {value}, they are:")
    prompt, spans = _needle_prompt(tokenizer, length, rng, head, parts, list(zip(depths, chain)), tail,
                                   "variable_tracking")
    meta = {"value": value, "chain_char_spans": [list(s) for s in spans], "n_tokens": _n_tokens(tokenizer, prompt)}
    return prompt, names, meta


def _common_words(tokenizer: Any, length: int, depth: float | None, rng: random.Random):
    n_common = 10
    entries = max(40, length // 4)  # a numbered entry "123. word " is ~4 tokens
    reps = max(3, entries // 33)  # common words fill ~30% of the list; the rest appear once
    pool = _words(rng, n_common + entries)
    common, rare = pool[:n_common], pool[n_common:]
    shuffle_seed = rng.random()
    head = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
    tail = ("\nQuestion: What are the 10 most common words in the above list? "
            "Answer: The top 10 words that appear most often in the list are:")

    def build(n: int) -> str:
        words = common * reps + rare[:n]
        random.Random(shuffle_seed + n).shuffle(words)
        return head + "".join(f"{i + 1}. {w}\n" for i, w in enumerate(words)) + tail

    _, prompt = _fit(tokenizer, build, length, len(rare), "common_words")
    return prompt, common, {"repeats": reps, "n_tokens": _n_tokens(tokenizer, prompt)}


def _coded_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))


def _frequent_words(tokenizer: Any, length: int, depth: float | None, rng: random.Random):
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < length:  # more distinct words than will ever be needed
        w = _coded_word(rng)
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    shuffle_seed = rng.random()

    def counts(total: int) -> list[int]:
        # Zipf alpha=2 weights; ranks 1-3 get floor(total * w_r), every other word at most c3 - 1 (no ties).
        z = sum(1 / r**2 for r in range(1, len(vocab) + 1))
        c = [max(1, int(total / (r**2 * z))) for r in range(1, 4)]
        c[1] = min(c[1], c[0] - 1)
        c[2] = min(c[2], c[1] - 1)
        rest = total - sum(c)
        cap = max(1, c[2] - 1)
        r = 3
        while rest > 0 and r < len(vocab):
            take = min(cap, rest, max(1, int(total / ((r + 1) ** 2 * z))))
            c.append(take)
            rest -= take
            r += 1
        return c

    head = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words.\n")
    tail = ("\nQuestion: Do not provide any explanation. What are the three most frequently appeared words in "
            "the above coded text? Answer: According to the coded text above, the three most frequently "
            "appeared words are:")

    def build(n: int) -> str:
        if n < 12:
            return head + tail
        words = [w for w, k in zip(vocab, counts(n)) for _ in range(k)]
        random.Random(shuffle_seed + n).shuffle(words)
        return head + " ".join(words) + tail

    _, prompt = _fit(tokenizer, build, length, length, "frequent_words")
    return prompt, vocab[:3], {"n_tokens": _n_tokens(tokenizer, prompt)}


def _mqar(tokenizer: Any, length: int, depth: float | None, rng: random.Random):
    n_queries = 4
    pool = _words(rng, max(64, length // 3))
    values = [str(rng.randint(1000, 9999)) for _ in pool]
    query_seed = rng.random()
    head = "Here is a list of keys and their values. Remember each key's value.\n\n"

    def parts(n: int) -> tuple[list[int], str]:
        asked = random.Random(query_seed + n).sample(range(n), min(n_queries, n))
        names = [pool[i] for i in asked]
        tail = ("\n\nLook up the values of these keys, in this order: " + ", ".join(names)
                + ".\nAnswer: " + (f"{names[0]} =" if names else ""))
        return asked, tail

    def build(n: int) -> str:
        _, tail = parts(n)
        return head + "".join(f"{pool[i]} = {values[i]}\n" for i in range(n)) + tail

    n, prompt = _fit(tokenizer, build, length, len(pool), "mqar")
    asked, _ = parts(n)
    if len(asked) < n_queries:
        raise InputError(f"an mqar prompt of {length} tokens holds too few pairs; use a longer length")
    meta = {"keys": [pool[i] for i in asked], "pairs": n, "n_tokens": _n_tokens(tokenizer, prompt)}
    return prompt, [values[i] for i in asked], meta


def _probe(tokenizer: Any, length: int, depth: float | None, rng: random.Random):
    """The profiler's own retrieval probe (``probes.retrieval_probe``): reported beside the held-out tasks, so a
    report shows both how a plan does on the formats it was profiled on and on formats it never saw. The probe
    is built in token ids; its text re-tokenizes shorter (tokens merge across its units), so the length asked
    of the probe is corrected until the prompt's own count is within ``LENGTH_TOLERANCE``."""
    from headwise.probes import retrieval_probe

    seed = rng.randrange(2**31)
    ask = length
    for _ in range(6):
        p = retrieval_probe(tokenizer, ask, 0.5 if depth is None else depth, seed)
        bos = 1 if getattr(tokenizer, "bos_token_id", None) is not None and p.ids[0] == tokenizer.bos_token_id else 0
        prompt = tokenizer.decode(p.ids[bos:])
        n = _n_tokens(tokenizer, prompt)
        if abs(n - length) <= LENGTH_TOLERANCE * length:
            break
        ask += length - n
    else:
        raise InputError(f"cannot size a probe prompt to {length} tokens (closest: {n})")
    fmt = p.format
    return prompt, [p.answer], {"format": {"haystack": fmt.haystack, "value": fmt.value,
                                           "template": fmt.template.fact}}


TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo("passkey", _passkey, True, "contains", 12, "five-digit pass key in repeated filler"),
        TaskInfo("needle", _needle, True, "contains", 16, "one key-value needle in Shakespeare"),
        TaskInfo("multikey_needle", _multikey, False, "contains", 16, "queried needle among 3 distractor keys"),
        TaskInfo("multivalue_needle", _multivalue, False, "recall", 48, "all 4 values of one key"),
        TaskInfo("multiquery_needle", _multiquery, False, "recall", 48, "values of 4 keys"),
        TaskInfo("variable_tracking", _variable_tracking, False, "recall", 32, "names on a 4-hop assignment chain"),
        TaskInfo("common_words", _common_words, False, "recall", 64, "the 10 most repeated words of a list"),
        TaskInfo("frequent_words", _frequent_words, False, "recall", 24, "the 3 most frequent coded words"),
        TaskInfo("mqar", _mqar, False, "recall", 40, "values of 4 keys from a key = value list"),
        TaskInfo("probe", _probe, True, "contains", 16, "the profiler's own retrieval probes (held-in formats)"),
    )
}


def task_info(task: str) -> TaskInfo:
    info = TASKS.get(task)
    if info is None:
        raise InputError(f"unknown task '{task}'; valid tasks: {', '.join(TASKS)}")
    return info


def make_sample(task: str, tokenizer: Any, length: int, depth: float | None = None, seed: int = 0) -> Sample:
    """Build one prompt of ``task`` with ``length`` tokens (±2%) in ``tokenizer``; ``depth`` in [0, 1] places
    the needle of ``passkey``/``needle`` (default 0.5); the same arguments always give the same sample."""
    info = task_info(task)
    if not isinstance(length, int) or length < 64:
        raise InputError(f"length must be at least 64 tokens, got {length!r}")
    if depth is not None:
        if not info.uses_depth:
            raise InputError(f"task '{task}' takes no depth (tasks with a depth: "
                             f"{', '.join(n for n, t in TASKS.items() if t.uses_depth)})")
        if not 0.0 <= depth <= 1.0:
            raise InputError(f"depth must be between 0 and 1, got {depth}")
    rng = random.Random(f"headwise:{task}:{length}:{depth}:{seed}")
    prompt, answers, meta = info.build(tokenizer, length, depth, rng)
    meta.setdefault("n_tokens", _n_tokens(tokenizer, prompt))
    meta["max_new_tokens"] = info.max_new_tokens
    meta["scoring"] = info.scoring
    if info.uses_depth and depth is None:
        depth = 0.5
    return Sample(task, prompt, answers, length, depth, seed, meta)
