"""Where the wall time of a packed step goes on the host: waiting for the DataLoader, the copy to
the GPU, the step's call (Python and Inductor launching kernels; the GPU runs behind it), and the
wait for the GPU at the end. A step whose "launch" is most of it is bound by the host, not the GPU
(what CUDA graphs remove). Compiled by default, ``--eager`` for the eager step (where the host runs
every layer's Python, attention's checks and choice included). The study preset on long-tailed
lengths by default; needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/host_phases.py eval --workers 4 --impl torch [--gc-off] [--eager]

Results: benchmarks/results/h100-2026-11-27-session8/NOTES.md (compiled), h100-2026-12-06-session16 (eager, before and
after attention was decided once per batch).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import replace

import torch
from torch.utils.data import DataLoader

from varlen.bench import worker
from varlen.bench.cases import WORKLOADS, Case
from varlen.data import SyntheticDataset
from varlen.engine import build_model
from varlen.models import DecoderConfig, family

PHASES = ("data", "copy", "launch", "wait", "step")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["eval", "train"])
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    p.add_argument("--impl", default="torch", help="flash implementation (fa4, fa2, torch)")
    p.add_argument("--length-dist", default="lognormal")
    p.add_argument("--gc-off", action="store_true", help="Python's collector frozen and off")
    p.add_argument("--eager", action="store_true", help="the eager step instead of the compiled one")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 5 untimed)")
    p.add_argument("--model", default="study", help="the decoder's preset (study: 24 layers)")
    p.add_argument("--batch-size", type=int, default=None, help="samples a batch (default: the study's)")
    args = p.parse_args()
    if args.gc_off:
        gc.collect(), gc.freeze(), gc.disable()
    w = replace(WORKLOADS["study"], length_dist=args.length_dist, num_workers=args.workers, warmup=5, steps=args.steps)
    if args.batch_size:  # few tokens: the GPU's part shrinks and the step shows the host's
        w = replace(w, batch_size=args.batch_size)
    case = Case(f"packed-flash:{args.impl}", args.mode, not args.eager, w)
    torch.manual_seed(0)
    cfg = DecoderConfig.from_name(args.model, vocab_size=w.vocab_size, max_len=1024)
    fam = family(case.spec.family)
    model = build_model(fam, cfg, case.backend, torch.device("cuda"), train=args.mode == "train")
    batches = worker.sample_batches(w, w.warmup + w.steps)
    ds = SyntheticDataset(1 + max(i for b in batches for i in b), max_len=w.max_len, vocab_size=w.vocab_size,
                          length_dist=w.length_dist, seed=w.seed)
    loader = DataLoader(ds, batch_sampler=batches, collate_fn=worker._collator(case, cfg, batches),
                        num_workers=args.workers, pin_memory=True)
    engine = worker._engine(case, model, fam, False)
    step, it, rows = worker._step_fn(case, engine), iter(loader), []
    for i in range(w.warmup + w.steps):
        torch.cuda.synchronize()
        t = [time.perf_counter()]
        host = next(it)
        t.append(time.perf_counter())
        batch = engine.prepare(host)  # moved; marked dynamic when compiled
        t.append(time.perf_counter())
        step(batch)
        t.append(time.perf_counter())
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        if i >= w.warmup:  # ms of each phase, then of the step
            rows.append([1e3 * (b - a) for a, b in zip(t, t[1:])] + [1e3 * (t[-1] - t[0])])
    med = {name: statistics.median(r[k] for r in rows) for k, name in enumerate(PHASES)}
    print(f"{args.model} batch_size={w.batch_size} {args.mode} {'eager' if args.eager else 'compiled'} workers={args.workers} impl={args.impl} "
          f"gc_off={args.gc_off}: median ms "
          + " ".join(f"{k} {v:.1f}" for k, v in med.items())
          + "; each step (step/launch): " + " ".join(f"{r[4]:.0f}/{r[2]:.0f}" for r in rows))


if __name__ == "__main__":
    main()
