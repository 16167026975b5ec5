"""The one results writer and the timer's wall-clock mode (the CUDA-event modes run on the GPU benchmarks)."""

from __future__ import annotations

import json
import time

from headwise.bench.record import result_doc, result_path, save_result, write_result
from headwise.bench.timing import Timer


def test_a_result_document_names_its_command_commit_device_and_date():
    doc = result_doc("python bench/x.py --n 3", {"ms": 1.5}, device="cpu")
    assert doc["command"] == "python bench/x.py --n 3" and doc["results"] == {"ms": 1.5}
    assert doc["commit"] and doc["torch"] and doc["date"].endswith("+00:00")
    assert doc["device"].startswith("cpu: ") and doc["gpu"] is None


def test_a_second_result_of_the_day_gets_a_new_name_instead_of_overwriting(tmp_path):
    first = save_result("a", [1], tmp_path, "decode", device="cpu")
    second = save_result("b", [2], tmp_path, "decode", device="cpu")
    assert first != second and second.name == first.stem + "_2.json"
    assert json.loads(first.read_text())["results"] == [1] and json.loads(second.read_text())["results"] == [2]
    assert result_path(tmp_path, "decode").name == first.stem + "_3.json"


def test_rewriting_a_result_replaces_it_whole(tmp_path):
    path = write_result({"results": list(range(100))}, tmp_path / "r.json")
    write_result({"results": [1]}, path)
    assert json.loads(path.read_text()) == {"results": [1]} and not list(tmp_path.glob("*.tmp"))


def test_wall_clock_timing_is_the_median_step_in_milliseconds():
    steps = iter([0.001, 0.02, 0.001])
    ms = Timer.wall(lambda: time.sleep(next(steps)), reps=3)
    assert 1 <= ms < 15
