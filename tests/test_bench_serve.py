"""``headwise bench serve``'s load and in-process driver (the HTTP driver runs the same requests through the
server, covered by the server tests)."""

from __future__ import annotations

import itertools
import math

from headwise.bench.serve import Load, run_in_process
from headwise.engine import Engine
from headwise.pool import PagePool
from tiny import tiny_model


def test_poisson_arrivals_start_at_zero_and_grow_at_about_the_rate():
    at = Load(requests=200, rate=4.0).arrivals()
    assert at[0] == 0 and all(b >= a for a, b in itertools.pairwise(at))
    assert 199 / 4.0 * 0.7 < at[-1] < 199 / 4.0 * 1.3
    assert Load(requests=3, rate=math.inf).arrivals() == [0.0, 0.0, 0.0]


def test_in_process_load_generates_every_token_and_counts_pages():
    lm = tiny_model("llama", vocab_size=512)
    pool = PagePool(lm.spec, 1 << 24, dtype_bytes=4, page_size=4)
    out = run_in_process(Engine(lm, chunk_size=16, pool=pool), Load(requests=3, prompt_len=20, output_len=4))
    assert out["output_tokens"] == 12 and out["peak_concurrency"] == 3 and out["preemptions"] == 0
    assert out["decode_only_steps"] >= 2 and out["decode_only_graph_steps"] == 0, "no CUDA graph on the CPU"
    # Dense tiny llama: 4 layers x 2 KV heads, 23 tokens at most -> 6 pages of 4 tokens per head.
    assert out["peak_kv_bytes"] == 3 * 4 * 2 * 6 * pool.page_bytes
    assert pool.free_pages == pool.num_pages
