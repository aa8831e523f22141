"""One case, in its own process: ``python -m varlen.bench.worker CASE.json RESULT.json``.

A crash, an out-of-memory or a compile failure ends only this process; the runner records it.
Step time is wall time from asking the DataLoader for a batch to the end of the step on the
device (synchronised), so data loading counts, as a user would see it.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
from torch.utils.data import DataLoader

from ..attention import pads_to_max_seqlen
from ..data import NestedCollator, PackCollator, PadCollator, PadToLongestCollator, SyntheticDataset, mark_dynamic, move_batch
from ..models import Decoder, DecoderConfig, forward_batch, lm_loss
from .cases import Case, Result
from .flops import step_flops
from .profile import breakdown, gemm_floor_ms


def _collator(case: Case, cfg: DecoderConfig, batches: list[list[int]]):
    w = case.workload
    match case.strategy:
        case "padded":
            return PadCollator(length=-(-(w.max_len + 1) // 8) * 8)
        case "longest":  # powers of two from 64 up to the padded baseline's length
            return PadToLongestCollator(max_length=-(-(w.max_len + 1) // 8) * 8)
        case "nested":
            return NestedCollator(max_seqlen=w.max_len if case.compile else None)
        case _ if graphs(case):
            return PackCollator(max_seqlen=w.max_len, **static_shape(w, batches))
        case _:
            # compiled: a constant max_seqlen (an upper bound is valid for every kernel) keeps
            # the compiled graph from specialising on each batch's longest sample
            return PackCollator(max_seqlen=w.max_len if case.compile else None,
                                bucket_max_seqlen=pads_to_max_seqlen(case.backend, w.device))


def graphs(case: Case) -> bool:
    """Does this case run as CUDA graphs (``--cuda-graphs``)? Raises for a strategy that cannot."""
    if not (case.workload.cuda_graphs and case.compile):
        return False
    if not case.strategy.startswith("packed-"):
        raise ValueError(f"--cuda-graphs: {case.strategy} has no static-shape batches (packed strategies only)")
    if case.workload.device != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device")
    return True


def static_shape(w, batches: list[list[int]]) -> dict:
    """``pad_to`` and ``num_seqs`` that fit every batch of the run: each batch gets at least
    ``extra`` filler sequences, enough that the filler of a half-full batch stays <= max_len each."""
    extra = w.tokens_per_batch // w.max_len + 2
    num_seqs = max(len(b) for b in batches) + extra
    return {"pad_to": -(-(w.tokens_per_batch + num_seqs) // 128) * 128, "num_seqs": num_seqs}


def sample_batches(w, count: int) -> list[list[int]]:
    """The sample indices of each step: ``batch_size`` samples in order, or token-budget batches
    (the same for every case of a run: the sampler is deterministic in the seed)."""
    if not w.tokens_per_batch:
        return [list(range(i * w.batch_size, (i + 1) * w.batch_size)) for i in range(count)]
    from ..data import TokenBudgetSampler
    from ..data.synthetic import sample_lengths

    per_batch = 8 * w.tokens_per_batch // w.max_len + 8  # samples a batch, generously
    lengths = sample_lengths((count + 2) * per_batch, w.length_dist, w.max_len, w.seed)
    batches = TokenBudgetSampler(lengths, w.tokens_per_batch, seed=w.seed).global_batches()
    full = [b for b in batches if sum(lengths[i] for i in b) * 2 >= w.tokens_per_batch]  # no leftover bins
    if len(full) < count:
        raise ValueError(f"only {len(full)} batches of ~{w.tokens_per_batch} tokens; raise the sample count")
    return full[:count]


def _counter(group: str, name: str) -> int:
    """A torch.compile counter: ("stats", "unique_graphs"), ("inductor", "cudagraph_skips")."""
    from torch._dynamo.utils import counters

    return int(counters[group][name])


def _graphs() -> int:
    return _counter("stats", "unique_graphs")


def run_case(case: Case) -> Result:
    w = case.workload
    device = torch.device(w.device)
    on_gpu = device.type == "cuda"
    train = case.mode == "train"
    torch.manual_seed(w.seed)
    base = DecoderConfig.from_name(w.model)
    # positions for every padded slot: padding rounds max_len + 1 up to a multiple of 8
    cfg = DecoderConfig.from_name(w.model, vocab_size=w.vocab_size, max_len=max(base.max_len, -(-(w.max_len + 1) // 8) * 8))
    hf = case.strategy.startswith("hf-")
    if hf:
        from . import hf_models

        model = hf_models.gpt2(cfg, case.strategy).to(device).train(train)
        collate = hf_models.collator(case.strategy, w.max_len, case.compile)
    else:
        model = Decoder(cfg, backend=case.backend).to(device).train(train)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, fused=on_gpu) if train else None
    n = w.warmup + w.steps
    n_profile = 3 if w.profile else 0
    batches = sample_batches(w, n + n_profile + (n_profile > 0))  # breakdown runs one unrecorded step first
    if not hf:
        collate = _collator(case, cfg, batches)
    ds = SyntheticDataset(1 + max(i for b in batches for i in b), max_len=w.max_len, vocab_size=w.vocab_size,
                          length_dist=w.length_dist, seed=w.seed)
    loader = DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=w.num_workers, pin_memory=on_gpu)
    static = not hf and graphs(case)
    # CUDA graphs: one static shape, so nothing is marked dynamic and the graph replays every step
    fwd = torch.compile(model, mode="reduce-overhead" if static else None) if case.compile else model
    autocast = torch.autocast("cuda", dtype=getattr(torch, w.dtype)) if on_gpu else nullcontext()
    grad = torch.enable_grad() if train else torch.no_grad()

    def step(batch):
        with grad, autocast:
            if hf:
                loss = hf_models.loss(fwd, batch)
            else:
                loss = lm_loss(forward_batch(fwd, batch, causal=train), batch["labels"])
        if train:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    times, losses, flops, real, computed = [], [], 0.0, 0, 0
    graphs_after_warmup = 0
    it = iter(loader)
    for i in range(n):
        t0 = time.perf_counter()
        host = next(it)
        batch = move_batch(host, device, non_blocking=True)
        if case.compile and not static:
            mark_dynamic(batch)
        loss = step(batch)
        if static:  # a graph's outputs are overwritten by its next replay
            loss = loss.clone()
        if on_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i == w.warmup - 1:
            graphs_after_warmup = _graphs()
            if static and _counter("inductor", "cudagraph_skips"):
                raise RuntimeError("--cuda-graphs: Inductor ran the graph without CUDA graphs (see its "
                                   "'skipping cudagraphs' log line); refusing to report it as graphed")
        if i < w.warmup:
            continue
        lengths = [ds.lengths[j] for j in batches[i]]
        times.append(dt)
        losses.append(loss)
        flops += step_flops(lengths, dim=cfg.dim, n_layers=cfg.n_layers, vocab_size=cfg.vocab_size, train=train,
                            mlp_ratio=cfg.mlp_ratio, causal=True if hf else None)  # GPT2 is always causal
        real += sum(lengths)
        # tokens the model computed on: padded rows, or a packed row with its filler sequences
        computed += (host["attention_mask"].numel() if "attention_mask" in host
                     else host["info"].total_tokens if "info" in host else sum(lengths))
    total = sum(times)
    profile = None
    if n_profile:
        profile = breakdown(lambda: step(move_batch(next(it), device, non_blocking=True)), n_profile, device.type)
    floor = gemm_floor_ms(round(real / len(times)), dim=cfg.dim, n_layers=cfg.n_layers, vocab_size=cfg.vocab_size,
                          mlp_ratio=cfg.mlp_ratio, train=train, device=device.type,
                          dtype=getattr(torch, w.dtype) if on_gpu else torch.float32)
    kernel = _kernel(case, cfg, host, device) if "info" in host or "varlen_info" in host else None
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)
    return Result(
        case.strategy, case.backend, case.mode, case.compile,
        step_ms_mean=1e3 * total / len(times),
        step_ms_median=1e3 * statistics.median(times),
        step_ms_min=1e3 * min(times),
        tokens_per_s=real / total,
        tflops=flops / total / 1e12,
        padding_frac=1 - real / computed,
        peak_mem_gib=peak,
        recompiles=(_graphs() - graphs_after_warmup) if case.compile else 0,
        graphs=_graphs() if case.compile else 0,
        loss=float(torch.stack(losses).float().mean()),
        steps=len(times),
        gemm_floor_ms=floor,
        profile=profile,
        kernel=kernel,
    )


def _kernel(case: Case, cfg: DecoderConfig, host: dict, device: torch.device) -> str:
    """The attention kernel a packed case ran, asked with tensors shaped like its last batch."""
    from ..attention import kernel_name

    info = (host.get("info") or host["varlen_info"]).to(device)
    dtype = getattr(torch, case.workload.dtype) if device.type == "cuda" else torch.float32
    train = case.mode == "train"
    with torch.set_grad_enabled(train):
        q = torch.empty(info.total_tokens, cfg.n_heads, cfg.head_dim, device=device, dtype=dtype, requires_grad=train)
        return kernel_name(case.backend, q, q, q, info, causal=train or case.strategy.startswith("hf-"))


def matmul_peak(device: str) -> float:
    """TFLOP/s of a large matmul: bf16 8192^3 on a GPU, float32 1024^3 on a CPU (median of 10)."""
    if device == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(13):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def main(argv: list[str]) -> int:
    if argv[0] == "--peak":
        out = {"device": argv[1], "tflops": matmul_peak(argv[1])}
        with open(argv[2], "w") as f:
            json.dump(out, f)
        return 0
    case = Case.from_dict(json.loads(open(argv[0]).read()))
    result = run_case(case)
    with open(argv[1], "w") as f:
        json.dump(asdict(result), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
