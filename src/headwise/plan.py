"""Head plans: which attention policy each (layer, KV head) of a model uses.

File format (JSON, ``"format": "headwise-plan"``, ``"version": 1``)::

    {
      "format": "headwise-plan",
      "version": 1,
      "model": {"architecture": "llama", "num_layers": 30, "num_q_heads": 9,
                "num_kv_heads": 3, "head_dim": 64, "name": "smollm2-135m"},
      "layers": [                                   # num_layers lists of num_kv_heads entries
        [{"policy": "full"},
         {"policy": "streaming", "params": {"sink": 64, "window": 256}},
         {"policy": "vertical_slash", "params": {...}, "decode": {"policy": "page_topk", "params": {...}}}],
        ...
      ],
      "meta": {"created_by": "headwise profile ...", "budget": 0.25, ...},  # free-form, informational
      "placement": {"3": {"order": [[0, 2, 1], ...], "at": 8192}}             # optional, see below
    }

A plan with SeerAttention heads (policy ``seer``) carries learned gates (``HeadPlan.gates``): ``save`` writes them
beside the plan as ``<plan>.gates.safetensors`` and names the file and its sha256 in ``meta.seer_gates``; ``load``
reads them back (a missing or changed file is a ``PlanError``).

Policies are per *KV head*: with GQA, the query heads sharing a KV head share its cache, so they share its
policy. ``model`` is the fingerprint the plan was made for; loading it onto another model fails with the
first mismatch named.

``placement`` (optional) records, per tensor-parallel rank count, the order in which the KV heads of each layer
are laid out before the ranks split them (``placement.py``: ``order[l][p]`` is the KV head at position ``p`` of
layer ``l``; rank ``r`` of ``N`` holds positions ``r*k .. r*k + k - 1``). It is layout, not behaviour: the heads
of ``layers`` stay in the model's own order, the digest ignores it, and a run without tensor parallelism ignores
it. ``headwise plan balance`` writes it. Plans are saved atomically (temporary file + rename), so an interrupted save never
leaves a half-written plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from headwise.errors import PlanError
from headwise.policies import Policy, build_policy
from headwise.spec import ModelSpec

if TYPE_CHECKING:
    from headwise.policies.seer import SeerGates

FORMAT = "headwise-plan"
VERSION = 1
_FINGERPRINT_KEYS = ("architecture", "num_layers", "num_q_heads", "num_kv_heads", "head_dim")
T = TypeVar("T")


@dataclass
class HeadPlan:
    model: dict[str, Any]
    layers: list[list[dict[str, Any]]]
    meta: dict[str, Any] = field(default_factory=dict)
    placement: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per rank count (as a string key), ``{"order": [[kv head, ...] per layer], "at": tokens}``."""
    gates: SeerGates | None = field(default=None, repr=False, compare=False)
    """SeerAttention gates of the plan's ``seer`` heads (``policies/seer.py``); saved beside the plan file."""

    # ----------------------------------------------------------------- construction
    @classmethod
    def uniform(cls, spec: ModelSpec, head: dict[str, Any], name: str = "", **meta: Any) -> HeadPlan:
        build_policy(head)  # validate once
        return cls._every_layer(spec, [head] * spec.num_kv_heads, name, meta)

    @classmethod
    def _every_layer(cls, spec: ModelSpec, row: list[dict[str, Any]], name: str, meta: dict[str, Any]) -> HeadPlan:
        """``row`` (one head entry per KV head) in every layer, each entry its own copy."""
        layers = [[json.loads(json.dumps(h)) for h in row] for _ in range(spec.num_layers)]
        model = dict(spec.fingerprint())
        if name:
            model["name"] = name
        return cls(model, layers, dict(meta))

    @classmethod
    def dense(cls, spec: ModelSpec, name: str = "") -> HeadPlan:
        """Every head full attention (native sliding-window layers keep their window: see ``resolve``)."""
        return cls.uniform(spec, {"policy": "full"}, name, created_by="headwise plan dense")

    @classmethod
    def split(cls, spec: ModelSpec, share: float, first: dict[str, Any], rest: dict[str, Any], name: str = "",
              **meta: Any) -> HeadPlan:
        """In every layer, the first ``round(share * num_kv_heads)`` KV heads take ``first`` and the others ``rest``
        (a DuoAttention-shaped plan without profiling: which heads are full does not change a speed measurement)."""
        if not 0.0 <= share <= 1.0:
            raise PlanError(f"the share of heads taking the first policy must be within 0..1, got {share}")
        n = round(share * spec.num_kv_heads)
        if 0.0 < share < 1.0 and n in (0, spec.num_kv_heads):
            raise PlanError(f"a share of {share} of {spec.num_kv_heads} KV heads per layer rounds to {n}: every head "
                            "would take one policy; give a share that is at least one head and leaves one")
        build_policy(first)
        build_policy(rest)
        return cls._every_layer(spec, [first] * n + [rest] * (spec.num_kv_heads - n), name, meta)

    @classmethod
    def from_policies(cls, spec: ModelSpec, policies: list[list[Policy]], name: str = "", **meta: Any) -> HeadPlan:
        layers = [[p.to_spec() for p in row] for row in policies]
        model = dict(spec.fingerprint())
        if name:
            model["name"] = name
        plan = cls(model, layers, dict(meta))
        plan.check_shape()
        return plan

    # ----------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        out = {"format": FORMAT, "version": VERSION, "model": self.model, "layers": self.layers, "meta": self.meta}
        if self.placement:
            out["placement"] = self.placement
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> HeadPlan:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanError(f"{source} is not a headwise plan (expected \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise PlanError(f"{source} has plan version {data.get('version')!r}; this headwise reads version {VERSION}")
        model, layers = data.get("model"), data.get("layers")
        if not isinstance(model, dict) or any(k not in model for k in _FINGERPRINT_KEYS):
            raise PlanError(f"{source}: 'model' must give {', '.join(_FINGERPRINT_KEYS)}")
        if not isinstance(layers, list) or not all(isinstance(row, list) for row in layers):
            raise PlanError(f"{source}: 'layers' must be a list of per-layer lists of head entries")
        placement = data.get("placement") or {}
        if not isinstance(placement, dict):
            raise PlanError(f"{source}: 'placement' must map rank counts to {{\"order\": ..., \"at\": ...}}")
        plan = cls(model, layers, dict(data.get("meta") or {}))
        plan.check_shape()
        plan.policies()  # every entry must name a known policy with valid parameters
        for key, entry in placement.items():
            if not str(key).isdigit() or int(key) < 2 or int(model["num_kv_heads"]) % int(key):
                raise PlanError(f"{source}: placement key {key!r} must be a rank count of 2 or more that divides "
                                f"the {model['num_kv_heads']} KV heads")
            if not isinstance(entry, dict):
                raise PlanError(f"{source}: placement {key} must be an object with 'order' and 'at'")
            plan = plan.with_placement(int(key), entry.get("order"), entry.get("at", 0), where=f"{source}: placement {key}")
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeadPlan:
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise PlanError(f"plan file {p} does not exist") from None
        except OSError as exc:
            raise PlanError(f"cannot read plan file {p}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {p} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        plan = cls.from_dict(data, source=f"plan file {p}")
        named = plan.meta.get("seer_gates")
        if isinstance(named, dict) and "file" in named:
            from headwise.policies.seer import SeerGates

            plan.gates = SeerGates.load(p.parent / str(named["file"]), named.get("sha256"))
        return plan

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a crash or Ctrl-C leaves either the old file or the new one, never half of one. Gates
        (``self.gates``) are written first, beside the plan (``seer.gates_path``), and named in ``meta.seer_gates``."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if self.gates is not None:
            from headwise.policies.seer import gates_path

            gp = gates_path(p)
            self.meta["seer_gates"] = {"file": gp.name, "sha256": self.gates.save(gp),
                                       "block_size": self.gates.block_size, "layers": sorted(self.gates.layers)}
        else:
            self.meta.pop("seer_gates", None)  # no gates travel with this plan: name no file
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_dict(), fh, indent=1)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p

    # ----------------------------------------------------------------- checks
    def check_shape(self) -> None:
        n_layers, n_kv = int(self.model["num_layers"]), int(self.model["num_kv_heads"])
        if len(self.layers) != n_layers:
            raise PlanError(f"plan lists {len(self.layers)} layers but its model header says {n_layers}")
        for i, row in enumerate(self.layers):
            if len(row) != n_kv:
                raise PlanError(f"plan layer {i} lists {len(row)} KV heads but its model header says {n_kv}")

    def check_model(self, spec: ModelSpec) -> None:
        """Fail with the first difference between the plan's fingerprint and the model's."""
        fp = spec.fingerprint()
        for key in _FINGERPRINT_KEYS:
            if key == "architecture":
                continue  # same shapes, different arch names (gemma3 vs gemma3_text) are fine
            if int(self.model[key]) != int(fp[key]):
                name = self.model.get("name", "another model")
                raise PlanError(
                    f"plan was made for {name} with {key}={self.model[key]}, but this model has {key}={fp[key]}"
                )

    def policies(self) -> list[list[Policy]]:
        return [
            [build_policy(head, where=f"layer {i} KV head {j}") for j, head in enumerate(row)]
            for i, row in enumerate(self.layers)
        ]

    # ----------------------------------------------------------------- tensor parallelism (placement.py)
    def with_placement(self, tp: int, order: Any, at: int, where: str = "placement") -> HeadPlan:
        """A copy that records ``order`` as the KV-head placement for ``tp`` ranks, balanced at ``at`` tokens."""
        from headwise.placement import check_order, check_permutable

        checked = check_order(order, len(self.layers), int(self.model["num_kv_heads"]), where)
        check_permutable(self, checked)
        if not isinstance(at, int) or isinstance(at, bool) or at < 0:
            raise PlanError(f"{where}: 'at' must be a number of tokens, got {at!r}")
        placement = dict(self.placement) | {str(tp): {"order": checked, "at": at}}
        return HeadPlan(self.model, self.layers, dict(self.meta), placement, self.gates)

    def kv_order(self, tp: int) -> list[list[int]] | None:
        """The recorded placement for ``tp`` ranks (None: none recorded)."""
        entry = self.placement.get(str(tp))
        return None if entry is None else [list(row) for row in entry["order"]]

    def replaced(self, policy: str, head: dict[str, Any]) -> HeadPlan:
        """This plan with every head of ``policy`` (a policy name, e.g. ``"full"``) given ``head`` instead (validated
        once; each a copy); the other heads, the meta and the placement unchanged."""
        build_policy(head)
        layers = [[json.loads(json.dumps(head)) if h["policy"] == policy else h for h in row] for row in self.layers]
        return HeadPlan(self.model, layers, dict(self.meta), dict(self.placement), self.gates)

    def permuted(self, order: list[list[int]]) -> HeadPlan:
        """This plan for a model whose KV heads were re-indexed by ``order`` (``tp.permute_kv_heads``): position
        ``p`` of layer ``l`` gets head ``order[l][p]``'s entry. Same model fingerprint; no placement."""
        from headwise.placement import check_order, check_permutable

        checked = check_order(order, len(self.layers), int(self.model["num_kv_heads"]))
        check_permutable(self, checked)
        layers = [[row[h] for h in perm] for row, perm in zip(self.layers, checked)]
        return HeadPlan(self.model, layers, dict(self.meta), gates=self._gates_for(checked))

    def shard(self, rank: int, size: int) -> HeadPlan:
        """The heads rank ``rank`` of ``size`` holds under transformers' column-wise split (KV heads
        ``rank*k .. rank*k + k - 1`` with their query heads): a plan for a model with ``1/size`` of the heads."""
        n_kv, n_q = int(self.model["num_kv_heads"]), int(self.model["num_q_heads"])
        if size < 1 or n_kv % size or n_q % size or not 0 <= rank < size:
            raise PlanError(f"cannot give rank {rank} of {size} a share of {n_q} query / {n_kv} KV heads")
        k = n_kv // size
        model = dict(self.model) | {"num_kv_heads": k, "num_q_heads": n_q // size}
        gates = self._gates_for([list(range(rank * k, (rank + 1) * k))] * len(self.layers))
        return HeadPlan(model, [row[rank * k : (rank + 1) * k] for row in self.layers], dict(self.meta), gates=gates)

    def _gates_for(self, kv_heads: list[list[int]]) -> SeerGates | None:
        """The plan's SeerAttention gates for the KV heads ``kv_heads[layer]``, in that order (None without gates)."""
        if self.gates is None:
            return None
        return self.gates.for_heads(kv_heads, int(self.model["num_q_heads"]) // int(self.model["num_kv_heads"]))

    # ----------------------------------------------------------------- summaries
    def digest(self) -> str:
        """Short hash of the plan's heads (not its metadata): names a plan in results."""
        blob = json.dumps({"model": {k: self.model[k] for k in _FINGERPRINT_KEYS}, "layers": self.layers}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def counts(self) -> dict[str, int]:
        return dict(Counter(h["policy"] for row in self.layers for h in row))

    def kv_bytes(self, spec: ModelSpec, seq_len: int, dtype_bytes: int = 2, *, peak: bool = False) -> int:
        """KV bytes held (summed over layers and KV heads) after ``seq_len`` tokens, K/V in ``dtype_bytes``-byte
        elements (``Policy.kv_bytes``: a quantized head counts its codes, scales and residual). With ``peak``, the
        most held at any moment while a request of ``seq_len`` tokens is prefilled and decoded
        (``Policy.peak_kv_bytes``: a quantized head's largest residual): what budgets and summaries count."""
        def held(p: Policy) -> int:
            return (p.peak_kv_bytes if peak else p.kv_bytes)(seq_len, spec.head_dim, dtype_bytes)

        return sum(held(p) for row in resolve(self.policies(), spec) for p in row)

    def kv_tokens(self, spec: ModelSpec, seq_len: int, dtype_bytes: int = 2, *, peak: bool = False) -> int:
        """Token slots held (summed over layers and KV heads) after ``seq_len`` tokens (with ``peak``: at most, see
        ``kv_bytes``), in dense-equivalent slots: ``kv_bytes`` over the bytes of one dense slot (a key and a value),
        rounded up. The slots themselves for plans without quantized heads; a quantized head counts the slots its
        bytes would fill."""
        slot = 2 * spec.head_dim * dtype_bytes
        return -(-self.kv_bytes(spec, seq_len, dtype_bytes, peak=peak) // slot)

    def kv_fraction(self, spec: ModelSpec, seq_len: int, dtype_bytes: int = 2, *, peak: bool = False) -> float:
        """KV memory (bytes) of this plan over the dense plan's, after ``seq_len`` tokens (with ``peak``: the most
        this plan holds while a request of ``seq_len`` tokens runs, over dense at ``seq_len``; dense never cycles)."""
        held = self.kv_bytes(spec, seq_len, dtype_bytes, peak=peak)
        return held / max(1, spec.dense_kv_bytes(seq_len, dtype_bytes))

    def max_context(self, spec: ModelSpec) -> int | None:
        """The longest sequence this plan may run on the model: its trained context (``spec.max_context``; None:
        unknown), unless every head of every global-attention layer shows RoPE only distances within it
        (``Policy.position_span``, e.g. ``longheads``), in which case None: no limit (native sliding-window layers
        never look past their window)."""
        limit = spec.max_context
        if not limit:
            return None
        for row in resolve(self.policies(), spec):
            for p in row:
                span = p.position_span
                if span is None or span > limit:
                    return limit
        return None

    def summary(self, spec: ModelSpec | None = None, seq_len: int | None = None) -> str:
        parts = [f"{n}×{name}" for name, n in sorted(self.counts().items())]
        text = ", ".join(parts)
        if spec is not None and seq_len:
            text += f" — at most {100 * self.kv_fraction(spec, seq_len, peak=True):.1f}% of dense KV at {seq_len} tokens"
        return text


def resolve(policies: list[list[Policy]], spec: ModelSpec) -> list[list[Policy]]:
    """Apply the model's own sliding windows: on a layer with native window W, ``full`` means
    ``streaming(sink=0, window=W)`` (that is what the model computes, and all its cache needs); so do ``longheads``
    (keeping distances within the trained length: the window does) and ``retrieval_offload`` (a window's KV is small
    enough for the device). ``quantized`` keeps the window too, in codes and a residual, never holding more than the
    window's dense bytes (``Quantized.for_native_window``; a window a plan gives a quantized head on a global layer
    is checked the same way)."""
    from headwise.policies import Full, LongHeads, Quantized, RetrievalOffload, Streaming

    def windowed(p: Policy, window: int | None) -> Policy:
        if window is not None and isinstance(p, Full | LongHeads | RetrievalOffload):
            return Streaming(sink=0, window=window)
        if isinstance(p, Quantized) and (window is not None or p.window):
            # A window the plan set itself (a global layer) gets the same check against its dense bytes.
            return p.for_native_window(window or p.window, spec.head_dim)
        return p

    return [[windowed(p, spec.native_window(i)) for p in row] for i, row in enumerate(policies)]


def deal_heads(spec: ModelSpec, layers: list[list[T]], seed: str, tries: int = 100) -> list[list[T]]:
    """``layers``' per-head entries (policies or their specs) dealt to the KV heads in a random order seeded by the
    string ``seed``, global layers and native sliding layers apart (a policy means something else on a sliding
    layer; each native window its own group), so every deal holds the same KV bytes at every length as ``layers``.
    A deal that gives every head the entry it has in ``layers`` is drawn again (up to ``tries`` times) until some
    head differs, where any arrangement differs at all. The entries themselves are not copied. Shared by the
    evaluation's ``random@equal`` baseline (``eval.runner.random_baseline``) and the profiler's ``--select-deals``
    (``profile.runner.select_among_deals``), which seed it differently."""
    import random

    rng = random.Random(seed)
    windows = sorted(set(spec.layer_windows), key=lambda w: (w is not None, w or 0))  # global layers first
    groups = [[(i, j) for i, w in enumerate(spec.layer_windows) if w == window for j in range(spec.num_kv_heads)]
              for window in windows]
    rows = [list(row) for row in layers]
    for _ in range(tries):
        rows = [list(row) for row in layers]
        for slots in groups:
            heads = [layers[i][j] for i, j in slots]
            rng.shuffle(heads)
            for (i, j), h in zip(slots, heads):
                rows[i][j] = h
        if rows != layers:
            break
    return rows
