"""Where a step's time goes: a profiler breakdown, and the GEMM floor of the step.

``breakdown`` runs a few steps under ``torch.profiler`` and sorts the device kernels (CPU ops on a
CPU) into attention, GEMMs, optimizer and elementwise/norm by name; what the device did not spend
in kernels is the host/data gap. ``gemm_floor_ms`` times the step's matrix multiplies alone, at
their real shapes (the mean packed token count), with cuBLAS: no attention, no elementwise work.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from .timing import since, start, synchronize, time_calls

CATEGORIES = (
    # order matters: the first match wins ("flash" kernels are attention even if they say gemm)
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "attn", "flex", "sdpa", "softmax_backward")),
    ("optimizer", ("sgd", "adam", "foreach", "multi_tensor", "optimizer")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::_scaled_mm", "wgmma", "mkldnn", "aten::baddbmm")),
)
TOP = 25  # kernels listed by time in a breakdown
PARTS = ("attention", "gemm", "elementwise/norm", "optimizer", "host/data gap")


def classify(name: str) -> str:
    lower = name.lower()
    for category, keys in CATEGORIES:
        if any(k in lower for k in keys):
            return category
    return "elementwise/norm"


def breakdown(step: Callable[[], None], steps: int, device: str) -> dict:
    """ms per step and % of the step for each part of ``PARTS``, from ``steps`` profiled steps (after one
    more, unrecorded). With communication kernels: their total, and the part no other kernel hid."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # one unrecorded step first: the profiler's start-up (CUPTI) lands in it, not in the timed steps
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=1, repeat=1)) as prof:
        step()
        synchronize(device)
        prof.step()
        t0 = start()
        for _ in range(steps):
            step()
        wall_ms = 1e3 * since(t0, device) / steps
    busy: Counter[str] = Counter()
    kernels: Counter[str] = Counter()  # per name: what a part is made of
    spans: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # GPU time ranges: communication or not
    for e in prof.events():
        if getattr(e, "is_user_annotation", False):  # record_function ranges (DDP.forward, nccl:all_reduce,
            continue  # Optimizer.step) span kernels: counting them would count those kernels twice
        if cuda and e.device_type == DeviceType.CUDA:  # kernels (and memcpy/memset) on the GPU
            t = e.time_range.elapsed_us() / 1e3
            spans[classify(e.name) == "communication"].append((e.time_range.start, e.time_range.end))
        elif not cuda and e.device_type == DeviceType.CPU:  # CPU ops' own time, children excluded
            t = e.self_cpu_time_total / 1e3
        else:
            continue
        busy[_part(e)] += t
        kernels[e.name] += t
    ms = {k: busy.get(k, 0.0) / steps for k in PARTS[:-1]}
    out = {"step_ms": wall_ms, "ms": ms, "steps": steps}
    if busy["communication"]:  # NCCL runs beside the compute stream: only what nothing hides adds to the step
        comm, compute = _union(spans[True]), _union(spans[False])
        exposed = (_length(comm) - _overlap(comm, compute)) / 1e3 / steps
        out["communication_ms"] = busy["communication"] / steps
        out["communication_exposed_ms"] = exposed
        ms["host/data gap"] = max(0.0, wall_ms - sum(ms.values()) - exposed)
    else:
        ms["host/data gap"] = max(0.0, wall_ms - sum(ms.values()))
    out["pct"] = {k: 100 * v / wall_ms for k, v in ms.items()}
    out["top"] = [{"name": name[:120], "part": classify(name), "ms": t / steps} for name, t in kernels.most_common(TOP)]
    return out


def _part(e) -> str:
    """A kernel's part by its name; a CPU op inside ``optimizer.step()`` (plain ``aten::add_`` on a CPU) by
    the profiler range the optimizer opens around it."""
    parent = e.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer"
        parent = parent.cpu_parent
    return classify(e.name)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint time ranges covering ``spans``."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in spans)


def _overlap(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """Time covered by both of two disjoint, sorted range lists."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def linear_shapes(dim: int, n_layers: int, vocab_size: int, mlp_ratio: int = 4) -> Counter:
    """(in, out) of every Linear of the decoder (GPT2's Conv1D layers have the same shapes)."""
    block = [(dim, 3 * dim), (dim, dim), (dim, mlp_ratio * dim), (mlp_ratio * dim, dim)]
    shapes: Counter = Counter()
    for s in block:
        shapes[s] += n_layers
    shapes[(dim, vocab_size)] += 1
    return shapes


def gemm_floor_ms(tokens: int, *, dim: int, n_layers: int, vocab_size: int, mlp_ratio: int = 4, train: bool,
                  device: str, dtype: torch.dtype, reps: int = 3) -> float:
    """Time of the step's GEMMs alone, in ``nn.Linear``'s layouts: forward ``x @ W^T``, and in
    training ``dY @ W`` and ``dY^T @ x``; every GEMM of a step launched back to back, one sync.

    The layouts matter: a ``[in, tokens]`` operand with an odd token count as its row stride
    leaves cuBLAS's fast (TMA) kernels, which the model never does (an earlier version measured
    that and reported a floor well above the model's own GEMM time).
    """
    gemms = []
    for (fan_in, fan_out), count in linear_shapes(dim, n_layers, vocab_size, mlp_ratio).items():
        x = torch.randn(tokens, fan_in, device=device, dtype=dtype)
        w = torch.randn(fan_out, fan_in, device=device, dtype=dtype)
        dy = torch.randn(tokens, fan_out, device=device, dtype=dtype)
        gemms += [(x, w.t(), count)] + ([(dy, w, count), (dy.t(), x, count)] if train else [])

    def run():
        for a, b, count in gemms:
            for _ in range(count):
                torch.mm(a, b)

    return 1e3 * min(time_calls(run, device, reps, warmup=1))
