"""Host time of writing the padded decode batch's page tables (``PaddedBatch._write_tables``), CPU.

The plan's decode-only steps in issue 13's mix left the GPU idle ~40 of 260 ms (run 17's profiled step 120: 50 rows,
8 forwards), while the host wrote the rows' new pages into the tables: every (layer, group) of every row takes a page
each ``page_size`` tokens, and the tables were written with a few small tensors per (row, layer, group). This times
the write when each of ``--rows`` decoding rows took one page in every (layer, group) of a ``--layers``-layer model
under the 25% full + 75% streaming plan (``duo25``: two groups a layer), the median of ``--reps``.

    PYTHONPATH=src:tests python bench/padded_tables_host.py OUT.json [--rows 50] [--layers 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from headwise.bench.record import result_doc, write_result
from headwise.bench.serve import preset_plan
from headwise.engine import Engine, SamplingParams
from headwise.pool import PagePool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=21)
    args = ap.parse_args(argv)
    # tests/tiny.py: a small Llama, here with 8 KV heads a layer as Llama-3-8B groups them
    from tiny import tiny_model

    lm = tiny_model("llama", num_hidden_layers=args.layers, num_key_value_heads=8, num_attention_heads=32,
                    hidden_size=256)
    pool = PagePool(lm.spec, 1 << 28, dtype_bytes=4, page_size=16)
    engine = Engine(lm, preset_plan("duo25", lm.spec), chunk_size=64, pool=pool, cuda_graphs=False,
                    padded_decode=True)
    params = SamplingParams(max_new_tokens=500, stop_token_ids=[])  # none ends before every row decodes
    g = torch.Generator().manual_seed(0)
    seqs = [engine.add(torch.randint(0, 100, (40,), generator=g).tolist(), params) for _ in range(args.rows)]
    while any(s.status.name != "DECODE" for s in seqs):
        engine.step()
    graphs = engine.batch_graphs(seqs)
    assert graphs is not None
    _, rows = graphs._fill(seqs)
    batch = graphs.batch
    assert batch is not None
    times = []
    for _ in range(args.reps):
        for r in rows:  # each row took one page in every (layer, group) since its tables were written
            occ = batch.occupant[r]
            assert occ is not None
            occ.version = -1
            occ.written = [max(0, w - 1) for w in occ.written]
        t0 = time.perf_counter()
        batch._write_tables(rows, seqs)
        times.append(1e3 * (time.perf_counter() - t0))
    res = {"rows": len(rows), "layer_group_entries": len(batch.order), "median_ms": round(statistics.median(times), 3),
           "torch_threads": torch.get_num_threads()}
    print(res)
    command = " ".join(["python", "bench/padded_tables_host.py", *(sys.argv[1:] if argv is None else argv)])
    write_result(result_doc(command, res), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
