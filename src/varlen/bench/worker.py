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
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader

from ..buckets import GRAPH_BUCKETS_PER_OCTAVE, graph_num_seqs, round_up
from ..data import Batch, NestedCollator, PackCollator, PadCollator, PadToLongestCollator, SyntheticDataset
from ..engine import Engine, Objective, build_model
from ..measure import GarbageCollection, compile_counter, graph_count, since, start, time_calls
from ..measure.profile import breakdown, gemm_floor_ms
from ..models import DecoderConfig, family
from ..parallel import Dist
from . import hf_models
from .cases import Case, Result, padded_length


def _collator(case: Case, cfg: DecoderConfig, batches: list[list[int]]):
    w = case.workload
    match case.spec.layout:
        case "padded":
            return PadCollator(length=padded_length(w.max_len))
        case "longest":  # powers of two from 64 up to the padded baseline's length
            return PadToLongestCollator(max_length=padded_length(w.max_len))
        case "nested":
            return NestedCollator(max_seqlen=w.max_len if case.compile else None)
        case _ if cuda_graphed(case):
            shape = static_shape(w, batches) if w.tokens_per_batch else graph_buckets(w)
            return PackCollator(max_seqlen=w.max_len, pad_to_multiple_of=w.levers.token_multiple, **shape)
        case _:
            # compiled: a constant max_seqlen (an upper bound is valid for every kernel) keeps
            # the compiled graph from specialising on each batch's longest sample
            return PackCollator(max_seqlen=w.max_len if case.compile else None,
                                pad_to_multiple_of=w.levers.token_multiple)


def cuda_graphed(case: Case) -> bool:
    """Does this case run as CUDA graphs (``--cuda-graphs``)? Raises for a strategy that cannot."""
    if not (case.workload.cuda_graphs and case.compile):
        return False
    if case.spec.layout != "packed":
        raise ValueError(f"--cuda-graphs: {case.strategy} has no static-shape batches (packed strategies only)")
    if case.workload.device != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device")
    return True


def static_shape(w, batches: list[list[int]]) -> dict:
    """``pad_to`` and ``num_seqs`` that fit every batch of the run: each batch gets at least
    ``extra`` filler sequences, enough that the filler of a half-full batch stays <= max_len each."""
    extra = w.tokens_per_batch // w.max_len + 2
    num_seqs = max(len(b) for b in batches) + extra
    return {"pad_to": round_up(w.tokens_per_batch + num_seqs, 128), "num_seqs": num_seqs}


# Python's collector off during the steps, a young collection every GC_EVERY steps, as varlen train
# does by default (--gc-every): an automatic collection inside a step is a pause of up to tens of ms
GC_EVERY = 50


def graph_buckets(w) -> dict:
    """``num_seqs`` and ``pad_to_bucket`` for batches of ``batch_size`` samples as CUDA graphs: the
    token count rounded up to one of 8 sizes an octave (:func:`varlen.buckets.token_bucket`), and
    enough filler sequences (of at most ``max_len``) for the largest filler that leaves: the rule
    ``varlen train --cuda-graphs`` uses, for the longest row ``batch_size`` samples make."""
    return {"num_seqs": graph_num_seqs(w.batch_size, w.batch_size * w.max_len, w.max_len),
            "pad_to_bucket": GRAPH_BUCKETS_PER_OCTAVE}


def cover_shapes(warmup: list[list[int]], timed: list[list[int]], row_tokens) -> list[list[int]]:
    """Warm-up batches for CUDA graphs recorded per row size: ``warmup`` (where compilation happens),
    then each size the ``timed`` batches have, twice (Inductor's cudagraph trees run a new size
    once, then record it), so that no timed step records a graph."""
    first = {}
    for b in timed:
        first.setdefault(row_tokens(b), b)
    return warmup + [b for b in first.values() for _ in range(2)]


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


def run_case(case: Case) -> Result:
    w = case.workload
    device = torch.device(w.device)
    train = case.mode == "train"
    torch.manual_seed(w.seed)
    base = DecoderConfig.from_name(w.model)
    # positions for every padded slot: padding rounds max_len + 1 up to a multiple of 8
    cfg = DecoderConfig.from_name(w.model, vocab_size=w.vocab_size, max_len=max(base.max_len, padded_length(w.max_len)),
                                  **w.levers.decoder_fields())
    fam = family(case.spec.family)
    backend, build_kwargs = hf_models.build_args(case.spec) if fam.hf else (case.backend, {})
    model = build_model(fam, cfg, backend, device, levers=w.levers, train=train, **build_kwargs)
    n_profile = 3 if w.profile else 0
    batches = sample_batches(w, w.warmup + w.steps + n_profile + (n_profile > 0))  # breakdown: one unrecorded step first
    collate = hf_models.collator(case.spec, w.max_len, case.compile) if fam.hf else _collator(case, cfg, batches)
    ds = SyntheticDataset(1 + max(i for b in batches for i in b), max_len=w.max_len, vocab_size=w.vocab_size,
                          length_dist=w.length_dist, seed=w.seed)
    graphed = not fam.hf and cuda_graphed(case)
    warmup = w.warmup
    if graphed and not w.tokens_per_batch:  # a graph a row size: record them all before timing
        timed = batches[warmup:]
        batches = cover_shapes(batches[:warmup], timed, lambda b: collate.row_tokens([ds.lengths[i] for i in b]))
        warmup = len(batches)
        batches += timed
    loader = DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=w.num_workers,
                        pin_memory=device.type == "cuda")
    engine = _engine(case, model, fam, graphed)
    step = _step_fn(case, engine)
    it = iter(loader)
    tally = _timed_steps(case, engine, step, it, [[ds.lengths[j] for j in b] for b in batches], cfg, fam, graphed,
                         warmup)
    profile = None
    if n_profile:
        profile = breakdown(lambda: step(engine.prepare(next(it))), n_profile, device.type)
    return _result(case, cfg, tally, profile)


def compile_mode(autotune: bool, graphed: bool) -> str | None:
    """torch.compile's mode: CUDA graphs (Inductor's cudagraph trees record one graph per row size
    and replay it) and/or max-autotune (GEMM templates with fused epilogues); None: the default."""
    if autotune:
        return "max-autotune" if graphed else "max-autotune-no-cudagraphs"
    return "reduce-overhead" if graphed else None


def _engine(case: Case, model, fam, graphed: bool) -> Engine:
    """The case's model compiled as asked, its autocast dtype on a GPU, its loss: HF's own for the HF
    strategies, else the logits' (bidirectional in eval, as in the study)."""
    w, train = case.workload, case.mode == "train"
    objective = hf_models.objective(case.spec) if fam.hf else Objective.logits(fam, causal=train)
    return Engine.around(model, objective, Dist.alone(w.device), compile=case.compile,
                         compile_mode=compile_mode(w.autotune, graphed),
                         dtype=getattr(torch, w.dtype) if w.device == "cuda" else None,
                         static=graphed and bool(w.tokens_per_batch),
                         attention=None if fam.own_attention else case.backend)  # a peer's: nothing of varlen's


def _step_fn(case: Case, engine: Engine):
    """One step of the case on a prepared batch -> its loss (a detached device scalar): an SGD step
    in train mode, the loss alone without gradients in eval mode."""
    if case.mode != "train":
        return engine.eval_loss
    opt = torch.optim.SGD(engine.model.parameters(), lr=1e-3, fused=case.workload.device == "cuda")
    return lambda batch: engine.step([batch], opt).loss


@dataclass
class Tally:
    """What the timed steps of a case add up to."""

    times: list = field(default_factory=list)  # seconds a step
    losses: list = field(default_factory=list)
    flops: float = 0.0
    real: int = 0  # the samples' tokens
    computed: int = 0  # tokens the model computed on: padded rows, or a packed row with its filler
    compiled_after_warmup: int = 0
    last_batch: Batch | None = None  # the last host batch (the kernel that ran is read from it)


def _timed_steps(case: Case, engine: Engine, step, it, lengths: list[list[int]], cfg, fam, graphed: bool,
                 warmup: int) -> Tally:
    """``warmup`` untimed steps, then the workload's ``steps`` timed ones. CUDA graphs on token-budget
    batches have one static shape; on batches of samples, a few row sizes: compiled once for all
    (marked dynamic), a graph recorded for each."""
    w, device = case.workload, torch.device(case.workload.device)
    tally = Tally()
    collector = GarbageCollection(GC_EVERY)
    for i in range(warmup + w.steps):
        t0 = start()  # the last step ended synchronised
        host = next(it)
        loss = step(engine.prepare(host))
        if graphed:  # a graph's outputs are overwritten by its next replay
            loss = loss.clone()
        dt = since(t0, device)
        collector.step()
        if i == warmup - 1:
            tally.compiled_after_warmup = graph_count()
            if graphed and compile_counter("inductor", "cudagraph_skips"):
                raise RuntimeError("--cuda-graphs: Inductor ran the graph without CUDA graphs (see its "
                                   "'skipping cudagraphs' log line); refusing to report it as graphed")
        if i < warmup:
            continue
        tally.times.append(dt)
        tally.losses.append(loss)
        tally.flops += fam.flops(lengths[i], cfg, train=case.mode == "train")
        tally.real += sum(lengths[i])
        tally.computed += host.computed_tokens
        tally.last_batch = host
    collector.close()
    return tally


def _result(case: Case, cfg, tally: Tally, profile: dict | None) -> Result:
    w, device, train = case.workload, torch.device(case.workload.device), case.mode == "train"
    on_gpu = device.type == "cuda"
    total, times, host = sum(tally.times), tally.times, tally.last_batch
    floor = gemm_floor_ms(round(tally.real / len(times)), dim=cfg.dim, n_layers=cfg.n_layers, vocab_size=cfg.vocab_size,
                          mlp_ratio=cfg.mlp_ratio, train=train, device=device.type,
                          dtype=getattr(torch, w.dtype) if on_gpu else torch.float32)
    own = family(case.spec.family).own_attention
    kernel = None
    if case.spec.packed:
        kernel = case.backend if own else _kernel(case, cfg, host.varlen_info, device)
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)
    return Result(
        case.strategy, case.backend, case.mode, case.compile,
        step_ms_mean=1e3 * total / len(times),
        step_ms_median=1e3 * statistics.median(times),
        step_ms_min=1e3 * min(times),
        step_ms=[round(1e3 * t, 3) for t in times],
        tokens_per_s=tally.real / total,
        tflops=tally.flops / total / 1e12,
        padding_frac=1 - tally.real / tally.computed,
        peak_mem_gib=peak,
        recompiles=(graph_count() - tally.compiled_after_warmup) if case.compile else 0,
        graphs=graph_count() if case.compile else 0,
        loss=float(torch.stack(tally.losses).float().mean()),
        steps=len(times),
        gemm_floor_ms=floor,
        profile=profile,
        kernel=kernel,
    )


def _kernel(case: Case, cfg: DecoderConfig, info, device: torch.device) -> str:
    """The attention kernel a packed case ran, asked with tensors shaped like its last batch's ``info``."""
    from ..attention import kernel_name

    info = info.to(device)
    dtype = getattr(torch, case.workload.dtype) if device.type == "cuda" else torch.float32
    train = case.mode == "train"
    with torch.set_grad_enabled(train):
        q = torch.empty(info.total_tokens, cfg.n_heads, cfg.head_dim, device=device, dtype=dtype, requires_grad=train)
        return kernel_name(case.backend, q, q, q, info, causal=train or case.spec.causal_lm)


def matmul_peak(device: str) -> float:
    """TFLOP/s of a large matmul: bf16 8192^3 on a GPU, float32 1024^3 on a CPU (median of 10)."""
    if device == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = time_calls(lambda: a @ b, device, 10, warmup=3)
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
