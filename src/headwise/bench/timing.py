"""The one timer of the benchmarks: median CUDA-event time (L2 flushed or not, eager or CUDA-graph replay), median
wall-clock time of a synchronised step (what a host loop pays), and per-kernel durations from the profiler."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


class Timer:
    """Median CUDA-event time of ``fn`` with L2 flushed before every repetition; eager and CUDA-graph.

    ``flush="read"`` (default) sums a 256 MB buffer before each repetition, leaving L2 full of clean lines, as
    the weight reads of the layer's other operations leave it in a real decode step. ``flush="write"`` zeroes
    the buffer instead (what this benchmark did before 2026-11-23c): L2 is then full of dirty lines that the
    timed kernel writes back to HBM as its reads evict them (up to L2's 50 MB), a fixed cost charged to it
    that weighs more on a short (sparse) kernel than on dense attention. ``flush=None``: no flush (long kernels,
    such as a 128K-token prefill, whose inputs do not fit in L2 anyway). Returns milliseconds."""

    def __init__(self, flush: str | None = "read") -> None:
        assert flush in ("read", "write", None)
        self.flush = flush
        # > 50 MB L2; no buffer (and no CUDA needed, for ``wall``) without a flush
        self.flush_buf = torch.zeros(256 * 1024 * 1024, dtype=torch.int8, device="cuda") if flush else None

    def eager(self, fn: Callable[[], Any], warmup: int = 5, reps: int = 30) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        return self._median(fn, reps)

    def graph(self, fn: Callable[[], Any], reps: int = 30) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):  # the warm-up stream: buffers it set up are reused
            fn()
        graph.replay()
        return self._median(graph.replay, reps)

    @staticmethod
    def wall(fn: Callable[[], Any], reps: int = 20) -> float:
        """Median wall-clock milliseconds of ``fn`` between device synchronisations (CPU or CUDA): launch and
        Python overhead included, as an eager decode loop pays them. No warm-up, no flush."""
        times = []
        for _ in range(reps):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    def _median(self, fn: Callable[[], Any], reps: int) -> float:
        times = []
        for _ in range(reps):
            if self.flush_buf is not None and self.flush == "write":
                self.flush_buf.zero_()
            elif self.flush_buf is not None:
                self.flush_buf.view(torch.int64).sum()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def kernel_durations(fn: Callable[[], Any], reps: int = 20) -> dict[str, float]:
    """Median GPU duration (µs) of each kernel ``fn`` launches (by name, first 60 characters), over ``reps``
    calls, from the PyTorch profiler (CUPTI). No L2 flush: a breakdown, not a headline time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per.setdefault(ev.name[:60], []).append(ev.device_time)
    return {name: round(statistics.median(v), 2) for name, v in per.items()}


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """One call of ``fn`` between synchronisations: (its milliseconds by CUDA events on a GPU, by the wall clock on
    CPU; the wall-clock milliseconds; what ``fn`` returned). The events time what the GPU did from the call's start to
    its end, host gaps included: a step that leaves the GPU waiting for the host is timed with the wait."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)
    t0 = time.perf_counter()
    if start is not None:
        start.record()
    out = fn()
    if end is not None:
        end.record()
    if cuda:
        torch.cuda.synchronize(device)
    wall = 1e3 * (time.perf_counter() - t0)
    return (start.elapsed_time(end) if start is not None and end is not None else wall), wall, out


# The runtime calls that block the host until the GPU drains (a host-to-device copy of a pageable host tensor is a
# cudaMemcpyAsync followed by a cudaStreamSynchronize in PyTorch).
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")
# Kernel families by name, first match wins: attention (ours in Triton, FlashAttention, SDPA's), the matrix
# multiplications (cuBLAS / CUTLASS / nvjet), and the rest (norms, rotary, activations, copies, sampling).
KERNEL_GROUPS = (("attention", ("decode", "attn", "attention", "flash", "fmha")),
                 ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "gemv")))


def kernel_group(name: str) -> str:
    low = name.lower()
    return next((group for group, marks in KERNEL_GROUPS if any(m in low for m in marks)), "other")


def profile_call(step: Callable[[], Any], device: torch.device, top: int = 25) -> dict[str, Any]:
    """One call of ``step`` under torch.profiler: its kernels by self device time (the ``top`` first), its operators
    by device time (CPU time on CPU), the runtime calls that block the host (``BLOCKING``), the host-to-device copies,
    ``gpu_busy_ms``, the kernels' summed time (each kernel once), and that time by ``KERNEL_GROUPS``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()

    def dev(e: Any, self_only: bool) -> float:  # device_time_* (torch >= 2.4), cuda_time_* before
        name = ("self_" if self_only else "") + "device_time_total"
        return float(getattr(e, name, getattr(e, name.replace("device", "cuda"), 0.0)))

    # Kernels only: an operator's event also carries the device time of the kernels it launched, so summing every
    # event with device time would count each such kernel twice (runs before 2026-12-03's second breakdown did).
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA and dev(e, True) > 0),
                     key=lambda e: -dev(e, True))
    ops = [e for e in events if e.key.startswith("aten::") or e.key.startswith("triton")]
    ops.sort(key=(lambda e: -dev(e, False)) if cuda else (lambda e: -e.self_cpu_time_total))
    groups: dict[str, float] = {}
    for e in kernels:
        g = kernel_group(e.key)
        groups[g] = groups.get(g, 0.0) + dev(e, True) / 1e3
    return {
        "gpu_busy_ms": round(sum(groups.values()), 3),
        "kernel_groups_ms": {g: round(ms, 3) for g, ms in sorted(groups.items())},
        "kernels": [{"name": e.key[:120], "calls": e.count, "self_device_ms": round(dev(e, True) / 1e3, 3)}
                    for e in kernels[:top]],
        "ops": [{"name": e.key[:120], "calls": e.count, "device_ms": round(dev(e, False) / 1e3, 3),
                 "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3), "cpu_ms": round(e.cpu_time_total / 1e3, 3)}
                for e in ops[:top]],
        "blocking_runtime_calls": {e.key: {"calls": e.count, "cpu_ms": round(e.cpu_time_total / 1e3, 3)}
                                   for e in events if e.key in BLOCKING},
        "host_to_device_copies": sum(e.count for e in events if "Memcpy HtoD" in e.key),
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """The device's copy bandwidth in bytes/s, read and write counted (as STREAM's copy): ``Timer``'s median of ``reps``
    device-to-device copies of ``nbytes`` (no flush: the buffers are far larger than L2), after one warm copy. CUDA
    only. The buffers go back to the device afterwards (``empty_cache``), so a pool sized from free memory next
    (``--kv-memory N%``) sees all of it."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = Timer(flush=None).eager(functools.partial(dst.copy_, src), warmup=1, reps=reps)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms / 1e3)
