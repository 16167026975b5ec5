"""Tensor parallelism: one model's heads split over several processes (ranks) by transformers' own tensor
parallelism (``DistributedConfig(tp_size=N)``: DTensor over torch.distributed, NCCL on GPUs, gloo on CPU).

    headwise generate MODEL --plan plan.json --tp 2 --prompt-file F          # spawns rank 1, runs as rank 0
    torchrun --nproc-per-node 2 -m headwise.cli generate MODEL --plan plan.json --tp 2 --prompt-file F

transformers splits the q/k/v projections by output rows and o by input columns (the model's
``base_model_tp_plan``), so rank ``r`` computes the attention of KV heads ``r*k .. r*k + k - 1``
(``k = num_kv_heads / N``) and of their query heads, and o's all-reduce sums the ranks' shares; the MLPs split
the same way, and the LM head gathers the logits on every rank. headwise's attention function sees only its
rank's heads, and each rank's ``HeadwiseCache`` is built from its share of the plan (``HeadPlan.shard``): a
rank keeps only its own heads' stores.

Placement (``placement.py``): before the split, each layer's KV heads may be re-indexed so that every rank holds
the same KV bytes (``permute_kv_heads``: an exact re-indexing of the weights); the plan is re-indexed the same way
(``HeadPlan.permuted``) before it is sliced.

Driving the ranks: rank 0 runs the command (generate, eval, the server) with an ``Engine`` as one process would;
before every forward, the engine announces it on a gloo control group (``TPGroup.announce``: the op, the token
ids, the caches it reads with their plans and counters). The other ranks run ``serve_ranks``: they keep a mirror
of every rank-0 cache (their own heads' stores), run the same forward and so take part in its collectives.
Sampling, tokenizing and HTTP happen on rank 0 alone. A cache rank 0 drops is freed on the others with the next
message. A program that runs the same code on every rank (``bench/tp_decode.py``) needs no driver: each rank
calls ``Engine.forward`` itself.

Limits: decode steps run eagerly (no CUDA graphs); a rank that fails inside a forward leaves the others
waiting in a collective until the transport notices (gloo: the peer's socket closes) or the process group's
timeout; the server's KV budget and the eval's allocator figures count rank 0's share (KV bytes from
``Engine.kv_bytes`` count all ranks).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from headwise.errors import HeadwiseError, InputError
from headwise.placement import Order, balance, check_tp, default_at, is_identity, measure

if TYPE_CHECKING:
    from headwise.cache import HeadwiseCache
    from headwise.engine import Engine
    from headwise.models import LoadedModel
    from headwise.plan import HeadPlan
    from headwise.spec import ModelSpec

log = logging.getLogger("headwise")

PLACEMENTS = ("balanced", "naive")
# The other ranks of a server wait on the control group between requests, for as long as the server runs.
CONTROL_TIMEOUT = timedelta(days=30)
# Process-group timeout for the model's own collectives (transformers uses the same for sharded loading).
GROUP_TIMEOUT = timedelta(hours=2)
_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(eq=False)
class TPGroup:
    """This process's place among the ranks of a tensor-parallel model."""

    rank: int
    size: int
    control: Any
    """The gloo process group rank 0 announces forwards on (CPU, apart from the model's NCCL group on GPUs)."""
    order: Order | None = None
    """The KV-head placement the weights were re-indexed by (None: the naive split)."""
    driver: bool = False
    """Rank 0 of a run whose other ranks follow its announcements (``serve_ranks``)."""
    children: list[subprocess.Popen] = field(default_factory=list)
    saved_env: dict[str, str | None] = field(default_factory=dict)
    _caches: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    _announced: set[int] = field(default_factory=set)
    _plans_sent: set[str] = field(default_factory=set)
    _freed: list[int] = field(default_factory=list)
    _next_uid: int = 0

    # ------------------------------------------------------------------ shares
    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The attention shape this rank runs: ``1/size`` of the query and KV heads."""
        return replace(spec, num_q_heads=spec.num_q_heads // self.size, num_kv_heads=spec.num_kv_heads // self.size)

    def local_plan(self, plan: HeadPlan) -> HeadPlan:
        """This rank's share of ``plan`` (the model's order): re-indexed by the placement, then sliced."""
        return (plan.permuted(self.order) if self.order else plan).shard(self.rank, self.size)

    # ------------------------------------------------------------------ rank 0 drives
    def register(self, cache: HeadwiseCache, plan: HeadPlan) -> None:
        """Note that ``cache`` holds this rank's share of ``plan`` (the whole plan goes out with its first forward)."""
        uid = self._next_uid
        self._next_uid += 1
        self._caches[cache] = (uid, plan)
        weakref.finalize(cache, self._freed.append, uid)

    def announce(self, op: str, caches: list[HeadwiseCache], **args: Any) -> None:
        """Tell the other ranks to run ``op`` over their mirrors of ``caches`` with ``args`` (CPU tensors)."""
        new: dict[int, dict[str, Any]] = {}
        state = []
        for c in caches:
            entry = self._caches.get(c)
            if entry is None:
                raise HeadwiseError("on a tensor-parallel model, run caches made by Engine.new_cache")
            uid, plan = entry
            if uid not in self._announced:
                digest = plan.digest()
                new[uid] = {"batch": c.batch, "digest": digest, "use_kernels": c.use_kernels,
                            "plan": None if digest in self._plans_sent else plan.to_dict()}
                self._plans_sent.add(digest)
                self._announced.add(uid)
            state.append((uid, c.decode_step, c.reserved))
        free = []
        while self._freed:  # finalizers may append from another thread; pop is atomic
            free.append(self._freed.pop())
        self._announced.difference_update(free)
        self.send({"op": op, "new": new, "free": free, "state": state, "args": args})

    def send(self, msg: dict[str, Any]) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([msg], src=0, group=self.control)

    def receive(self) -> dict[str, Any]:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def sum(self, value: int) -> int:
        """``value`` summed over the ranks (every rank calls it)."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, group=self.control)
        return int(t.item())

    # ------------------------------------------------------------------ the end
    def stop(self) -> None:
        """Rank 0: end the other ranks' ``serve_ranks`` (their mirrors go); this group can drive again later."""
        self.driver = False
        self._announced.clear()
        self._plans_sent.clear()
        self.send({"op": "stop", "free": [], "new": {}, "state": [], "args": {}})

    def close(self) -> None:
        """Stop the other ranks (rank 0 of a driven run), leave the process group, reap spawned ranks."""
        import torch.distributed as dist

        try:
            if self.driver:
                self.stop()
        except Exception as exc:  # e.g. Ctrl-C reached the other ranks too, and they are gone
            log.warning("could not tell the other tensor-parallel ranks to stop (%s)", exc)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            for child in self.children:
                try:
                    code = child.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    child.kill()
                    code = child.wait()
                if code:
                    log.warning("tensor-parallel rank (pid %d) exited with status %d", child.pid, code)
            for key, value in self.saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# ---------------------------------------------------------------------------------------------- starting ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(tp: int, argv: list[str]) -> TPGroup | None:
    """Join (started by torchrun: ``WORLD_SIZE`` is set) or start (spawning ranks ``1 .. tp-1`` as
    ``python -m headwise.cli ARGV``) a group of ``tp`` ranks; None for ``tp == 1``."""
    import torch.distributed as dist

    world = os.environ.get("WORLD_SIZE")
    if tp < 1:
        raise InputError(f"--tp must be at least 1, got {tp}")
    if tp == 1:
        if world not in (None, "1"):
            raise InputError(f"this process is one of {world} ranks (WORLD_SIZE) but --tp is 1; pass --tp {world}")
        return None
    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < tp:
        raise InputError(f"--tp {tp} needs {tp} GPUs (one per rank); {torch.cuda.device_count()} visible")
    children: list[subprocess.Popen] = []
    saved: dict[str, str | None] = {}
    if world is None:
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(tp)}
        for r in range(1, tp):
            children.append(subprocess.Popen(
                [sys.executable, "-m", "headwise.cli", *argv],
                env={**os.environ, **env, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        saved = {k: os.environ.get(k) for k in _ENV}
        os.environ.update(env | {"RANK": "0", "LOCAL_RANK": "0"})
    elif int(world) != tp:
        raise InputError(f"--tp {tp}, but this process is one of {world} ranks (WORLD_SIZE); pass --tp {world}")
    rank = int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=GROUP_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TPGroup(rank, tp, control, children=children, saved_env=saved)


def is_other_rank(args: argparse.Namespace) -> bool:
    """Whether this process is a rank other than 0 of the ``--tp`` run ``args`` describe."""
    return getattr(args, "tp", 1) > 1 and os.environ.get("RANK", "0") != "0"


# ---------------------------------------------------------------------------------------------- placement
def choose_order(plan: HeadPlan | None, spec: ModelSpec, tp: int, how: str) -> Order | None:
    """The placement to run ``plan`` with over ``tp`` ranks: ``naive`` (None), or ``balanced``: the plan's
    recorded one for ``tp``, else one balanced now at ``placement.default_at``."""
    if how not in PLACEMENTS:
        raise InputError(f"--placement must be one of {', '.join(PLACEMENTS)}, got '{how}'")
    if how == "naive" or plan is None:
        return None
    order = plan.kv_order(tp)
    at = int(plan.placement.get(str(tp), {}).get("at", 0)) or default_at(spec)
    if order is None:
        order = balance(plan, spec, tp, at)
    naive, placed = measure(plan, spec, tp, at), measure(plan, spec, tp, at, order)
    log.warning("KV heads over %d ranks at %d tokens: per-rank KV %s MB (spread %.1f%%) balanced, %s MB "
                "(spread %.1f%%) naive", tp, at, [round(b / 1e6, 1) for b in placed.rank_bytes],
                100 * placed.spread, [round(b / 1e6, 1) for b in naive.rank_bytes], 100 * naive.spread)
    return None if is_identity(order) else order


def _index(perm: list[int], per_head: int, width: int) -> torch.Tensor:
    """Row indices taking, for position ``p``, the ``per_head`` heads of KV head ``perm[p]``, ``width`` rows each."""
    return torch.tensor([(h * per_head + j) * width + d for h in perm for j in range(per_head) for d in range(width)])


@torch.no_grad()
def _reindex(param: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    """``param[index]`` along ``dim``, in place; a DTensor is gathered, re-indexed and its own share kept."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        full = param.full_tensor()
        full = full.index_select(dim, index.to(full.device))
        share = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(share)
    else:
        param.copy_(param.index_select(dim, index.to(param.device)))


def permute_kv_heads(model: torch.nn.Module, order: Order, spec: ModelSpec) -> None:
    """Re-index every layer's KV heads in place: position ``p`` of layer ``l`` becomes KV head ``order[l][p]``,
    with its query heads (rows of the q/k/v projections and their biases, columns of o). The model computes the
    same function; run it with ``plan.permuted(order)``. Works on whole and tensor-parallel (DTensor) weights;
    on the latter every rank must call it (it gathers each projection once)."""
    G, D = spec.group_size, spec.head_dim
    done = 0
    for module in model.modules():
        if not all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx")):
            continue
        done += 1
        perm = order[module.layer_idx]
        if perm == sorted(perm):
            continue
        q, kv = _index(perm, G, D), _index(perm, 1, D)
        for proj, idx in ((module.q_proj, q), (module.k_proj, kv), (module.v_proj, kv)):
            _reindex(proj.weight, idx, 0)
            if getattr(proj, "bias", None) is not None:
                _reindex(proj.bias, idx, 0)
        _reindex(module.o_proj.weight, q, 1)
    if done != spec.num_layers:
        raise HeadwiseError(f"found {done} attention modules with q/k/v/o projections, the model has "
                            f"{spec.num_layers} layers: cannot re-index its heads")


# ---------------------------------------------------------------------------------------------- loading
POOL_UNSUPPORTED = "a page pool (--kv-memory) is not supported with --tp yet; leave out --kv-memory"
"""Each rank holds a share of the heads, and the pool's pages are not sliced by rank yet."""


def _setup(args: argparse.Namespace, tp: int, plan: HeadPlan | None) -> dict[str, Any]:
    """Rank 0: where the weights are, their dtype, and the placement (checked before any rank loads)."""
    from transformers import AutoConfig

    from headwise.models import _check_supported, default_dtype, local_dir, parse_dtype
    from headwise.spec import ModelSpec

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device and torch.device(args.device).type != kind:
        raise InputError(f"--tp runs on {kind} here (one {'GPU' if kind == 'cuda' else 'process'} per rank); "
                         f"--device {args.device} cannot be honoured")
    if getattr(args, "kv_memory", None):
        raise InputError(POOL_UNSUPPORTED)
    path, source = local_dir(args.model)
    spec = ModelSpec.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
    _check_supported(spec, source)
    check_tp(spec, tp)
    if plan is not None:
        plan.check_model(spec)
    dtype = parse_dtype(args.dtype) or default_dtype(kind)
    return {"path": str(path), "source": source, "dtype": str(dtype).removeprefix("torch."),
            "order": choose_order(plan, spec, tp, getattr(args, "placement", "balanced"))}


def load_share(name: str, path: str, source: str, dtype: torch.dtype, group: TPGroup,
               order: Order | None = None, tokenizer: bool = True) -> LoadedModel:
    """This rank's share of the model in ``path`` (every rank calls it), its KV heads re-indexed by ``order``."""
    from transformers.distributed import DistributedConfig

    from headwise.models import LoadedModel, load_dir
    from headwise.spec import ModelSpec

    model, tok = load_dir(Path(path), dtype, None, tokenizer=tokenizer,
                           distributed_config=DistributedConfig(tp_size=group.size))
    spec = ModelSpec.from_config(model.config)
    if order is not None:
        permute_kv_heads(model, order, spec)
        group.order = order
    return LoadedModel(name, model, tok, spec, source, tp=group)


@contextmanager
def loaded(args: argparse.Namespace, plan: HeadPlan | None = None) -> Iterator[LoadedModel | None]:
    """The model ``args`` name (``model_args.add_model_args`` plus ``--tp``/``--placement``), for the block.

    Without ``--tp``: the whole model. With ``--tp N``: rank 0 gets its share, placed for ``plan``
    (``--placement``), and drives the other ranks; on those ranks the block gets None once rank 0 has
    stopped them (the command then returns). The ranks are stopped and the process group left on exit."""
    from headwise.model_args import load_from_args

    n = getattr(args, "tp", 1)
    # Spawning the ranks ourselves: check the model, the rank count and the plan before any rank starts.
    setup = _setup(args, n, plan) if n > 1 and "WORLD_SIZE" not in os.environ else None
    group = start(n, getattr(args, "argv", sys.argv[1:]))
    if group is None:
        yield load_from_args(args)
        return
    try:
        if group.rank == 0:
            if setup is None:
                try:
                    setup = _setup(args, group.size, plan)
                except HeadwiseError as exc:
                    group.send({"error": str(exc)})
                    raise
            group.send(setup)
        else:
            setup = group.receive()
            if "error" in setup:  # rank 0 reports it
                yield None
                return
        from headwise.models import parse_dtype

        dtype = parse_dtype(setup["dtype"])
        assert dtype is not None
        lm = load_share(args.model, setup["path"], setup["source"], dtype, group, setup["order"])
        if group.rank == 0:
            group.driver = True
            yield lm
        else:
            from headwise.engine import Engine

            serve_ranks(Engine(lm), group)
            yield None
    finally:
        group.close()


# ---------------------------------------------------------------------------------------------- the other ranks
def serve_ranks(engine: Engine, group: TPGroup) -> None:
    """Follow rank 0's announcements (``TPGroup.announce``) until it says stop: keep a mirror of each of its
    caches (this rank's heads) and run the same forwards, so that the model's collectives meet."""
    from headwise.plan import HeadPlan

    caches: dict[int, HeadwiseCache] = {}
    plans: dict[str, HeadPlan] = {}
    device = engine.lm.device
    while True:
        msg = group.receive()
        for uid in msg["free"]:
            caches.pop(uid, None)
        op = msg["op"]
        if op == "stop":
            return
        for uid, new in msg["new"].items():
            if new["plan"] is not None:
                plans[new["digest"]] = HeadPlan.from_dict(new["plan"])
            caches[uid] = engine.new_cache(new["batch"], plan=plans[new["digest"]])
            caches[uid].use_kernels = new["use_kernels"]  # the same attention path as rank 0's cache
        targets = []
        for uid, step, reserved in msg["state"]:
            cache = caches[uid]
            cache.decode_step = step
            if reserved and reserved != cache.reserved:
                cache.reserve(reserved)
            targets.append(cache)
        a = msg["args"]
        if op == "forward":
            keep = a["keep"]
            engine.forward(a["input_ids"].to(device), targets[0], a["all_logits"], keep)
        elif op == "forward_packed":
            engine.forward_packed(targets, a["chunks"], a["keep"])
        elif op == "kv_bytes":
            group.sum(targets[0].kv_bytes())
        else:
            raise HeadwiseError(f"rank {group.rank}: unknown announcement '{op}' from rank 0")


def add_tp_args(p: argparse.ArgumentParser) -> None:
    """``--tp`` and ``--placement`` (read by ``loaded``)."""
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (default 1): spawns N-1 more processes, or joins the ranks torchrun "
                        "started; N must divide the model's KV heads (docs/tensor-parallel.md)")
    p.add_argument("--placement", choices=PLACEMENTS, default="balanced",
                   help="with --tp: 'balanced' (default) re-indexes each layer's KV heads so that every rank holds "
                        "the same KV bytes (the plan's recorded placement, else one made now); 'naive' splits "
                        "heads in model order")
