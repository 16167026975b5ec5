"""``headwise serve MODEL --plan PLAN``: the OpenAI-compatible server (see docs/serving.md)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from headwise.errors import HeadwiseError, InputError
from headwise.model_args import add_model_args, load_from_args

log = logging.getLogger("headwise.server")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    add_model_args(p)
    p.add_argument("--plan", default="dense", help="plan JSON file, or 'dense' (default)")
    from headwise.tp import add_tp_args

    add_tp_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="most requests decoding together (default 32)")
    p.add_argument("--kv-budget-gb", type=float, default=None,
                   help="KV-cache memory that admission keeps to, in GB (default: 90%% of free GPU memory on "
                        "CUDA, a quarter of available RAM up to 8 GB on CPU)")
    p.add_argument("--kv-memory", default=None, metavar="GB|N%",
                   help="a KV page pool of this many GB, or of this share of the device's free memory after the "
                        "weights load (e.g. 90%%): admission counts its pages and a sequence that runs it dry is "
                        "preempted and recomputed (docs/serving.md, 'KV page pool'); instead of --kv-budget-gb")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait for admission; beyond that the server answers 429 (default 64)")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk in tokens (default 512)")
    p.add_argument("--multi-step", type=int, default=1, metavar="N",
                   help="under --kv-memory, greedy decode-only steps run up to N forwards in a row, the tokens read "
                        "back once (vLLM's multi-step scheduling: less host time between forwards; tokens stream "
                        "N at a time; default 1)")
    p.add_argument("--compile-layers", action="store_true",
                   help="compile the model's decoder layers with torch.compile around headwise's attention: their "
                        "elementwise work fused (Engine(compile_layers)); the first requests at new shapes wait for "
                        "the compilation (seconds)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); on a machine busy with other work, fewer "
                        "threads avoid OpenMP spin contention")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: MODEL as given)")
    p.add_argument("--api-key", default=os.environ.get("HEADWISE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $HEADWISE_API_KEY; none if unset)")
    p.add_argument("--allowed-origins", default="",
                   help="comma-separated browser origins allowed to call the API (e.g. http://localhost:3000; "
                        "'*' for any); requests from any other origin are refused (default: none)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names accepted ('*' for any; default: localhost, 127.0.0.1 "
                        "and ::1 when bound to a loopback address, any otherwise)")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest request body in MiB (default 16)")
    p.add_argument("--request-timeout", type=float, default=30,
                   help="seconds a request's headers, then its body, may take to arrive (default 30)")
    p.add_argument("--shutdown-grace", type=float, default=30,
                   help="on SIGTERM, seconds running requests get to finish before their streams are ended "
                        "(default 30)")
    p.set_defaults(func=run)


def default_kv_budget(device: str) -> int:
    """Bytes: 90% of free GPU memory after the weights are loaded; on CPU a quarter of available RAM, at most
    8 GB (the rest stays for activations, the tokenizer and everything else on the machine)."""
    import torch

    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(0.9 * free)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 8 << 30
    return int(min(8e9, avail / 4))


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def server_config(args: argparse.Namespace):
    """The app's ``ServerConfig`` from the flags (checked)."""
    from headwise.server.app import ServerConfig, is_loopback

    for flag, value in (("--max-body-mb", args.max_body_mb), ("--request-timeout", args.request_timeout)):
        if not value > 0:
            raise InputError(f"{flag} must be positive, got {value}")
    if not args.shutdown_grace >= 0:
        raise InputError(f"--shutdown-grace must be 0 or more, got {args.shutdown_grace}")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key (or HEADWISE_API_KEY) is empty")
    hosts = _names(args.allowed_hosts)
    if "*" in hosts:
        allowed_hosts = None
    elif hosts:
        allowed_hosts = hosts
    else:
        allowed_hosts = ServerConfig.allowed_hosts if is_loopback(args.host) else None
    return ServerConfig(api_key=args.api_key, allowed_hosts=allowed_hosts, allowed_origins=_names(args.allowed_origins),
                        max_body_bytes=int(args.max_body_mb * (1 << 20)), request_timeout_s=args.request_timeout,
                        shutdown_grace_s=args.shutdown_grace)


def build(args: argparse.Namespace, lm: Any = None):
    """Load the model (unless given: ``lm``) and plan and build (app, scheduler) from parsed arguments."""
    from headwise.engine import Engine, freeze_heap
    from headwise.plan import HeadPlan
    from headwise.pool import KVMemory
    from headwise.server.app import create_app
    from headwise.server.scheduler import Scheduler

    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1:
        raise InputError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.multi_step < 1:
        raise InputError(f"--multi-step must be at least 1, got {args.multi_step}")
    if args.max_queue < 0:
        raise InputError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if args.kv_budget_gb is not None and args.kv_budget_gb <= 0:
        raise InputError(f"--kv-budget-gb must be positive, got {args.kv_budget_gb}")
    if args.kv_memory is not None and args.kv_budget_gb is not None:
        raise InputError("give --kv-memory (a page pool) or --kv-budget-gb (a byte budget), not both")
    kv_memory = KVMemory.parse(args.kv_memory) if args.kv_memory is not None else None
    config = server_config(args)
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    plan = HeadPlan.load(args.plan) if args.plan and args.plan != "dense" else None
    lm = lm if lm is not None else load_from_args(args)
    pool = kv_memory.pool(lm.spec, lm.device, lm.dtype.itemsize) if kv_memory is not None else None
    engine = Engine(lm, plan, chunk_size=args.chunk_size, pool=pool, multi_step=args.multi_step,
                    compile_layers=args.compile_layers)
    if pool is not None:  # admission counts the pool's pages; the byte budget is the pool's size
        budget = pool.num_pages * pool.page_bytes
    else:
        budget = int(args.kv_budget_gb * 1e9) if args.kv_budget_gb else default_kv_budget(lm.device.type)
    scheduler = Scheduler(engine, max_batch=args.max_batch, kv_budget_bytes=budget, max_queue=args.max_queue)
    app = create_app(scheduler, args.served_model_name or lm.name, config)
    freeze_heap()  # the model and the engine live as long as the server: no collection walks them during a step
    return app, scheduler


class SchedulerDiedError(HeadwiseError):
    """The scheduler thread died: the process exits non-zero so that a supervisor restarts it."""

    exit_code = 70  # EX_SOFTWARE: an internal failure, not a usage error


def serve(app, scheduler, sock) -> int:
    """Run ``app`` on the bound socket ``sock`` until a signal drains and stops it; raises
    ``SchedulerDiedError`` if the scheduler died."""
    from headwise.server.http import make_server

    config = app.state.ctx.config
    host, port = sock.getsockname()[:2]
    server = make_server(app, scheduler, sock, host, port, grace_s=config.shutdown_grace_s,
                         head_timeout_s=config.request_timeout_s)
    server.run(sockets=[sock])
    if scheduler.error is not None:
        err = scheduler.error
        raise SchedulerDiedError(f"the scheduler thread died ({type(err).__name__}: {err}); exiting with status "
                                 f"{SchedulerDiedError.exit_code} so that a supervisor can restart the server")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise HeadwiseError("headwise serve needs FastAPI and uvicorn: pip install 'headwise[serve]'") from None
    from headwise import tp
    from headwise.server.http import bind

    if tp.is_other_rank(args):  # another rank of --tp: the server runs on rank 0 and drives this one
        with tp.loaded(args):
            return 0
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    server_config(args)  # bad flags fail before the port is taken
    sock = bind(args.host, args.port)  # a busy port fails now, not after the model has loaded
    try:
        if args.tp > 1:
            from headwise.plan import HeadPlan

            with tp.loaded(args, HeadPlan.load(args.plan) if args.plan and args.plan != "dense" else None) as lm:
                return _serve(args, sock, *build(args, lm))
        return _serve(args, sock, *build(args))
    finally:
        sock.close()


def _serve(args: argparse.Namespace, sock: Any, app: Any, scheduler: Any) -> int:
    pool = scheduler.engine.pool
    kv = (f"KV pool {pool.num_pages} pages of {pool.page_size} tokens ({scheduler.kv_budget / 1e9:.2f} GB)"
          if pool is not None else f"KV budget {scheduler.kv_budget / 1e9:.2f} GB")
    log.warning("serving %s (plan %s) on http://%s:%d/v1 — max batch %d, %s, queue %d%s%s",
                args.served_model_name or args.model, scheduler.engine.plan.digest(), args.host, args.port,
                scheduler.max_batch, kv, scheduler.max_queue,
                ", API key required" if args.api_key else "", f", {args.tp} tensor-parallel ranks" if args.tp > 1 else "")
    return serve(app, scheduler, sock)
