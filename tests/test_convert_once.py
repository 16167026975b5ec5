"""A GGUF is converted once even when several processes load it at the same moment (the shards of one eval)."""

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from headwise.models import convert_once


def _write(out: Path) -> None:
    with open(out.parent / "writers.log", "a") as fh:
        fh.write("x\n")
    time.sleep(0.3)  # long enough for the others to arrive while this one writes
    (out / "model.safetensors").write_text("weights")
    (out / "headwise-converted.json").write_text("{}")


def _load(target: str, q) -> None:
    q.put(convert_once(Path(target), _write))


def test_one_of_several_processes_converts_and_the_others_find_it_whole(tmp_path):
    target = tmp_path / "converted" / "model-v1"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_load, args=(str(target), q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    wrote = sorted(q.get(timeout=5) for _ in procs)
    assert wrote == [False, False, False, True]
    assert (tmp_path / "converted" / "writers.log").read_text() == "x\n"
    assert (target / "model.safetensors").read_text() == "weights"
    assert not list(target.parent.glob("*.tmp*"))


def test_a_failed_conversion_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "model-v1"

    def broken(out: Path) -> None:
        (out / "model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        convert_once(target, broken)
    assert not target.exists() and not list(tmp_path.glob("*.tmp*"))
    assert convert_once(target, _write) and (target / "headwise-converted.json").is_file()
