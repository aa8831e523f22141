"""Weak scaling of packed training: one torchrun launch per (world size, parallel); inside it the
model is built and compiled once and every (length distribution, split) runs on it.

    torchrun --nproc-per-node 4 -m varlen.train.scaling --parallel ddp --out DIR
    python -m varlen.train.scaling --report DIR...      # join launches, efficiency vs 1 GPU

Each rank's budget is fixed (``--tokens-per-rank``): the global batch grows with the world size,
so ideal weak scaling keeps the step time flat. Efficiency = tokens/s at W GPUs / (W x tokens/s
at 1 GPU) for the same parallel kind, split and distribution.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import CostModel, TokenBudgetSampler, mark_dynamic, move_batch
from ..models import DecoderConfig
from .cli import build_model, forward_fn
from .data import TrainCollator, load
from .distributed import per_rank, run_then_teardown, setup, wrap
from .step import train_step


def parse(argv):
    p = argparse.ArgumentParser(prog="varlen.train.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="study")
    p.add_argument("--model", default="decoder")
    p.add_argument("--backend", default="auto")
    p.add_argument("--parallel", choices=["ddp", "fsdp2"], default="ddp")
    p.add_argument("--dists", default="uniform,lognormal")
    p.add_argument("--splits", default="balanced,naive")
    p.add_argument("--tokens-per-rank", type=int, default=16384)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bucket-mb", type=int, default=25)
    p.add_argument("--reduce-dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path)
    p.add_argument("--report", type=Path, nargs="+", help="join the runs.jsonl of these folders into --out")
    return p.parse_args(argv)


def sweep(args) -> None:
    d = setup(args.device)
    cuda = d.device.type == "cuda"
    torch.manual_seed(0)
    cfg = DecoderConfig.from_name(args.preset)
    max_len = cfg.max_len - 1
    args.dtype, args.max_len = "bf16", max_len
    model = build_model(args, cfg).to(d.device)
    wrapped = wrap(model, args.parallel, d, compile=args.compile, bucket_mb=args.bucket_mb,
                   reduce_dtype=torch.bfloat16 if args.reduce_dtype == "bf16" else torch.float32,
                   param_dtype=torch.bfloat16 if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, fused=cuda and args.parallel == "ddp")
    fwd = forward_fn(args)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if cuda else None
    cost = CostModel.from_flops(cfg.dim, cfg.n_layers, cfg.vocab_size)
    collate = TrainCollator(max_seqlen=max_len if args.compile else None, hf=args.model != "decoder")
    budget = args.tokens_per_rank * d.world_size
    n_samples = (args.warmup + args.steps + 4) * budget // 100  # lognormal means ~200 tokens
    if d.main and args.out:
        from ..info import environment

        args.out.mkdir(parents=True, exist_ok=True)
        env = environment()
        env["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        (args.out / "env.json").write_text(json.dumps(env))
    configs = [(dn, sp) for dn in args.dists.split(",") for sp in args.splits.split(",")]
    datasets = {dn: load(dn, num_samples=n_samples, max_len=max_len, vocab_size=cfg.vocab_size, seed=0)
                for dn in args.dists.split(",")}
    # an untimed pass through every config first: whatever compiles or recompiles for a new shape
    # does so there, not in the first timed config
    for timed_pass, (dist_name, split) in [(False, c) for c in configs] + [(True, c) for c in configs]:
        ds = datasets[dist_name]
        sampler = TokenBudgetSampler(ds.lengths, budget, world_size=d.world_size, rank=d.rank, split=split,
                                     cost=cost, seed=0)
        for b in sampler.global_batches():  # the split is host work: do it before the clock runs
            sampler.shares(b)
        steps = args.warmup + args.steps if timed_pass else args.warmup
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=2 if cuda else 0, pin_memory=cuda)
        it = iter(loader)
        times, tokens, spreads = [], [], []
        torch.cuda.reset_peak_memory_stats(d.device) if cuda else None
        for i in range(steps):
            if d.world_size > 1:
                dist.barrier()
            t0 = time.perf_counter()
            b = move_batch(next(it), d.device, non_blocking=True)
            if args.compile:
                mark_dynamic(b)
            stats = train_step(wrapped, [b], opt, fwd, autocast=autocast)
            if cuda:
                torch.cuda.synchronize()
            dt_s = time.perf_counter() - t0
            mine = per_rank(stats.local_tokens, d)
            t = per_rank(dt_s, d).max()  # the step ends when the slowest rank ends
            if i >= args.warmup:
                times.append(float(t))
                tokens.append(float(mine.sum()))
                spreads.append(float(mine.max() / mine.mean()))
        del it, loader  # shut a half-read loader's workers down now, not at interpreter exit
        if d.main and timed_pass:
            run = {"world_size": d.world_size, "parallel": args.parallel, "split": split,
                   "length_dist": dist_name, "compile": args.compile, "reduce_dtype": args.reduce_dtype,
                   "bucket_mb": args.bucket_mb if args.parallel == "ddp" else None, "tokens_per_rank_budget": args.tokens_per_rank,
                   "tokens_per_s": sum(tokens) / sum(times), "step_ms_mean": 1e3 * statistics.mean(times),
                   "step_ms_median": 1e3 * statistics.median(times),
                   "rank_token_spread": statistics.mean(spreads) if d.world_size > 1 else 1.0,
                   "peak_mem_gib": torch.cuda.max_memory_allocated(d.device) / 2**30 if cuda else None,
                   "loss": float(stats.loss), "packing_efficiency": sampler.efficiency()}
            print(json.dumps(run), flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                with open(args.out / "runs.jsonl", "a") as f:
                    f.write(json.dumps(run) + "\n")


def report(dirs: list[Path], out: Path) -> dict:
    runs = [json.loads(x) for d in dirs for x in (d / "runs.jsonl").read_text().splitlines() if x]
    key = lambda r: (r["parallel"], r.get("reduce_dtype") or "fp32", r["split"], r["length_dist"])  # noqa: E731
    # a step that recompiles (seconds) moves the mean a lot: report the median step's rate too
    for r in runs:
        r["tokens_per_s_median"] = r["tokens_per_s"] * r["step_ms_mean"] / r["step_ms_median"]
    base = {key(r): r for r in runs if r["world_size"] == 1}
    for r in runs:
        one = base.get(key(r))
        r["efficiency"] = r["tokens_per_s"] / (r["world_size"] * one["tokens_per_s"]) if one else None
        r["efficiency_median"] = (r["tokens_per_s_median"] / (r["world_size"] * one["tokens_per_s_median"])
                                  if one else None)
    envs = [json.loads((d / "env.json").read_text()) for d in dirs if (d / "env.json").exists()]
    if len({e.get("gpu") for e in envs}) > 1:
        raise SystemExit(f"runs come from different devices: {sorted({e.get('gpu') for e in envs})}")
    result = {"env": envs[0] if envs else {}, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    lines = ["| GPUs | parallel | reduce | split | lengths | tokens/s | step ms (mean / median) | efficiency "
             "(mean / median step) | rank token spread | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (*key(r), r["world_size"])):
        eff = f"{100 * r['efficiency']:.1f}% / {100 * r['efficiency_median']:.1f}%" if r["efficiency"] else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "-"
        lines.append(f"| {r['world_size']} | {r['parallel']} | {r.get('reduce_dtype', 'fp32')} | {r['split']} | "
                     f"{r['length_dist']} | {r['tokens_per_s']:,.0f} | {r['step_ms_mean']:.1f} / {r['step_ms_median']:.1f} | "
                     f"{eff} | {r['rank_token_spread']:.3f} | {mem} |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.report:
        report(args.report, args.out or Path("."))
    else:
        run_then_teardown(sweep, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
