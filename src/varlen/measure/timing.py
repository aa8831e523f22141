"""One way to time device work: wait for the device's queue at both ends, then read the host clock;
and torch.compile's counters (graphs, recompiles) read in one place."""

from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def start(device: torch.device | str | None = None) -> float:
    """The host clock once ``device`` has finished what was queued before (pass None when the
    queue is known to be empty, e.g. right after :func:`since`)."""
    synchronize(device)
    return time.perf_counter()


def since(t0: float, device: torch.device | str | None) -> float:
    """Seconds from ``t0`` until ``device`` has finished what was queued since."""
    synchronize(device)
    return time.perf_counter() - t0


def time_calls(fn: Callable[[], object], device, repeat: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = start(device)
        fn()
        out.append(since(t0, device))
    return out


def compile_counter(group: str, name: str) -> int:
    """A torch.compile counter: ("stats", "unique_graphs"), ("inductor", "cudagraph_skips")."""
    from torch._dynamo.utils import counters

    return int(counters[group][name])


def graph_count() -> int:
    """Graphs torch.compile has made in this process so far (each recompile adds one)."""
    return compile_counter("stats", "unique_graphs")
