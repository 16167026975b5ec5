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


def test_the_three_reads_of_one_conversion_share_one_gguf_reader(monkeypatch):
    """transformers builds a new GGUFReader for the config, the tokenizer and the weights; inside a conversion they
    share one (its metadata parse is what a conversion of Gemma 3 spends most of its time on), and the real class is
    back afterwards."""
    gguf = pytest.importorskip("gguf")
    from headwise.models import _one_gguf_reader, _smollm2_file

    path = _smollm2_file()
    if not path.is_file():
        pytest.skip("the bundled SmolLM2 GGUF is not installed")
    built = []

    class Counting(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            built.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    with _one_gguf_reader():
        from gguf import GGUFReader  # as transformers' load_gguf_checkpoint imports it, at call time

        first, second = GGUFReader(path), GGUFReader(str(path))
        assert first is second and len(built) == 1
        assert len(first.tensors) > 0
    assert gguf.GGUFReader is Counting
    assert isinstance(gguf.GGUFReader(path), Counting) and len(built) == 2
