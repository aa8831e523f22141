"""Weak scaling of packed training (the command is ``varlen.bench.scaling``): the sweep's settings,
the sweep (a model built, wrapped and compiled once, every length distribution and split timed on
it) and the report that joins its launches."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from dataclasses import dataclass

from ..argtypes import backend_option, device_option, nonneg_int, positive_int
from ..data import LENGTH_DISTS, CostModel, PackedBatch, SyntheticDataset, TokenBudgetSampler, TrainCollator
from ..engine import Engine, Objective, build_model, measure_cost
from ..measure import GarbageCollection, graph_count, since, start
from ..measure.profile import breakdown
from ..models import DecoderConfig, family
from ..models.decoder import PRESETS
from ..options import option
from ..parallel import Wrapping, context_shard, per_rank, setup


@dataclass(frozen=True)
class SweepOptions:
    """The sweep's model, the configurations it times and how (data-parallel wrapping: ``Wrapping``)."""
    preset: str = option("study", "the decoder preset", choices=sorted(PRESETS))
    model: str = option("decoder", "the study's model family (decoder, hf-gpt2, hf-llama)")
    backend: str = backend_option()
    device: str = device_option("under torchrun each rank takes the GPU of its LOCAL_RANK")
    parallel: str = option("ddp", "data parallelism", choices=["ddp", "fsdp2"])
    dists: str = option("uniform,lognormal", "length distributions (comma list): uniform, fixed, lognormal or "
                        "a file of lengths")
    splits: str = option("balanced,naive", "how a global batch is split over ranks (comma list): balanced, naive")
    # spelt as varlen train spells the same things (the older spellings still parse)
    tokens_per_rank: int = option(16384, "tokens per rank and step", type=positive_int, metavar="N",
                                  flag="--max-tokens-per-rank", aliases=("--tokens-per-rank",))
    cp: int = option(1, "context parallelism: ranks sharing each packed row (decoder)", type=positive_int)
    max_len: int | None = option(None, "longest document (default the preset's positions - 1; more enlarges the "
                                 "model's positions)", type=positive_int)
    steps: int = option(15, "timed steps of each configuration", type=positive_int)
    warmup: int = option(3, "untimed steps of each configuration", type=nonneg_int, metavar="N",
                         flag="--timing-warmup", aliases=("--warmup",))
    compile: bool = option(True, "torch.compile the blocks", action=argparse.BooleanOptionalAction)
    cost: str = option("flops", "the balanced split's cost model: from FLOPs, or timed on this device and model",
                       choices=["flops", "measure"])
    alone: bool = option(True, "DDP: before each timed step, time the same share on each GPU alone (no "
                         "communication)", action=argparse.BooleanOptionalAction)
    gc_every: int = option(50, "Python's collector off, a collection every N steps on all ranks, untimed (0: "
                           "Python's own)", type=nonneg_int)
    label: str = option("", "names a variant (flags, environment) in the report")
    profile_steps: int = option(0, "after each timed config, profile this many steps: where rank 0's step goes",
                                type=nonneg_int)
    out: Path | None = option(None, "the folder of runs.jsonl and env.json (with --report: of the report)", type=Path)
    report: list[Path] | None = option(None, "join the runs.jsonl of these folders into --out", type=Path,
                                       nargs="+", metavar="DIR")

    def problems(self) -> list[str]:
        """Settings that cannot run, one line each; empty when they can."""
        out = []
        for name in self.dists.split(","):
            if name not in LENGTH_DISTS and not os.path.isfile(name):
                out.append(f"--dists: {name!r} is neither one of {', '.join(LENGTH_DISTS)} nor a file of lengths")
        bad = sorted(set(self.splits.split(",")) - {"balanced", "naive"})
        if bad:
            out.append(f"--splits: {', '.join(bad)}; choose balanced and/or naive")
        heads = DecoderConfig.from_name(self.preset).n_heads
        if heads % self.cp:
            out.append(f"--cp {self.cp}: context parallelism splits the heads, and preset {self.preset} has {heads}")
        return out


def sweep(args: SweepOptions, wrapping: Wrapping = Wrapping()) -> None:
    """Every (length distribution, split) on one model. Timing only: with ``--alone`` each replica
    also steps on its own, so the replicas' weights drift apart (nothing reads another's)."""
    s = Sweep(args, wrapping)
    configs = [(dn, sp) for dn in args.dists.split(",") for sp in args.splits.split(",")]
    # an untimed pass through every config first: whatever compiles or recompiles for a new shape
    # does so there, not in the first timed config
    for timed_pass, (dist_name, split) in [(False, c) for c in configs] + [(True, c) for c in configs]:
        run = s.run(dist_name, split, timed_pass)
        if run is not None and s.d.main:
            print(json.dumps(run), flush=True)
            if args.out:
                with open(args.out / "runs.jsonl", "a") as f:
                    f.write(json.dumps(run) + "\n")
    s.collector.close()


class Sweep:
    """One model built, wrapped and compiled once; :meth:`run` times it on one configuration."""

    def __init__(self, args: SweepOptions, wrapping: Wrapping):
        self.args, self.wrapping, self.d = args, wrapping, setup(args.device)
        d, cuda = self.d, self.d.device.type == "cuda"
        torch.manual_seed(0)
        max_len = args.max_len or DecoderConfig.from_name(args.preset).max_len - 1
        self.cfg = cfg = DecoderConfig.from_name(args.preset, max_len=max_len + 1)
        try:
            self.shard = context_shard(d.rank, d.world_size, args.cp)
        except ValueError as e:
            raise SystemExit(f"--cp {args.cp}: {e}") from None
        self.cp, self.dp = args.cp, d.world_size // args.cp
        self.fam = family(args.model)
        model = build_model(self.fam, cfg, args.backend, d.device)
        dtype = torch.bfloat16 if cuda else None
        if args.cost == "measure":  # before wrapping: no collectives inside the timing
            self.cost = measure_cost(model, self.fam, cfg, d, dtype)
        else:
            self.cost = CostModel.from_flops(cfg.dim, cfg.n_layers, cfg.vocab_size)
        # DDP leaves the module it wraps usable on its own: called directly, its gradients stay local (the
        # reducer ignores a backward its forward did not prepare). That is each GPU's single-GPU baseline.
        # (with context parallelism no rank can step alone: its attention needs the group)
        self.local = model if args.parallel == "ddp" and args.alone and args.cp == 1 else None
        self.alone = dist.new_subgroups(1)[0] if self.local is not None and dist.is_initialized() else None
        self.engine = Engine.around(model, Objective.logits(self.fam), d, parallel=args.parallel,
                                    wrapping=wrapping, compile=args.compile, dtype=dtype,
                                    shard=self.shard, attention=args.backend)
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, fused=cuda and args.parallel == "ddp")
        self.collate = TrainCollator(max_seqlen=max_len if args.compile else None, multiple_of=args.cp)
        self.budget = args.tokens_per_rank * d.world_size
        n_samples = (args.warmup + args.steps + args.profile_steps + 8) * self.budget // 50  # >= 50 tokens a sample
        self.datasets = {dn: SyntheticDataset(n_samples, max_len=max_len, vocab_size=cfg.vocab_size, length_dist=dn,
                                              seed=0) for dn in args.dists.split(",")}
        self.collector = GarbageCollection(args.gc_every)
        if d.main and args.out:
            self._write_env(args.out)

    @staticmethod
    def _write_env(out: Path) -> None:
        from ..info import environment

        out.mkdir(parents=True, exist_ok=True)
        env = environment()
        env["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        (out / "env.json").write_text(json.dumps(env))

    def run(self, dist_name: str, split: str, timed_pass: bool) -> dict | None:
        """Warm-up steps, then (``timed_pass``) the timed ones and a profile: the run's record."""
        args, d = self.args, self.d
        ds = self.datasets[dist_name]
        sampler = TokenBudgetSampler(ds.lengths, self.budget, world_size=self.dp, rank=d.rank // self.cp, split=split,
                                     cost=self.cost, seed=0)
        for b in sampler.global_batches():  # the split is host work: do it before the clock runs
            sampler.shares(b)
        steps = args.warmup + args.steps if timed_pass else args.warmup
        if len(sampler) < steps + args.profile_steps + 1:
            raise SystemExit(f"{dist_name}: {len(sampler)} batches, fewer than the {steps + args.profile_steps + 1} "
                             "steps to run: fewer --steps, or a larger dataset")
        cuda = d.device.type == "cuda"
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=self.collate,
                                             num_workers=2 if cuda else 0, pin_memory=cuda)
        self.it = iter(loader)
        torch.cuda.reset_peak_memory_stats(d.device) if cuda else None
        t = self._steps(steps)
        if timed_pass and not t["times"]:
            raise SystemExit(f"{dist_name}/{split}: every timed step compiled something; more --warmup")
        prof = breakdown(self._step, args.profile_steps, d.device.type) if timed_pass and args.profile_steps else None
        del self.it, loader  # shut a half-read loader's workers down now, not at interpreter exit
        t["longest"] = int(per_rank(t["longest"], d).max())  # on every rank: a collective
        if not (d.main and timed_pass):
            return None
        return self._record(dist_name, split, t, prof, sampler.efficiency())

    def _next_batch(self):
        b = next(self.it)
        self.row_lengths = list(b.info.real_lengths)  # this group's documents (before a context slice is cut)
        return self.engine.prepare(b)

    def _step(self, b=None):
        b = b if b is not None else self._next_batch()
        return self.engine.step([b], self.opt)

    def _timed(self, fn, b):
        """``fn(b)`` and each rank's seconds, the ranks started together."""
        if self.d.world_size > 1:
            dist.barrier()
        t0 = start()
        stats = fn(b)
        return stats, per_rank(since(t0, self.d.device), self.d)

    def _alone_step(self, b):
        return self.engine.step([b], self.opt, module=self.local, group=self.alone)

    def _steps(self, steps: int) -> dict:
        d, args = self.d, self.args
        t = {"times": [], "tokens": [], "spreads": [], "alone_ms": [], "alone_shares": [], "dropped": 0, "stats": None,
             "flops": [], "longest": 0}
        for i in range(steps):
            self.collector.step()
            b = self._next_batch()
            graphs = graph_count()
            t_alone = self._timed(self._alone_step, b)[1] if self.local is not None else None  # same share, alone
            stats, took = self._timed(self._step, b)
            t["stats"] = stats
            mine = per_rank(stats.local_tokens, d)
            if i < args.warmup:
                continue
            if per_rank(graph_count() - graphs, d).max() > 0:  # some rank compiled: not steady state
                t["dropped"] += 1
                continue
            t["times"].append(float(took.max()))  # the step ends when the slowest rank ends
            t["tokens"].append(float(mine.sum()))
            t["spreads"].append(float(mine.max() / mine.mean()))
            # the step's FLOPs: each context group's row once (its ranks share it)
            share = self.fam.flops(self.row_lengths, self.cfg, train=True) / self.cp
            t["flops"].append(float(per_rank(share, d).sum()))
            t["longest"] = max(t["longest"], max(self.row_lengths, default=0))
            if t_alone is not None:
                t["alone_ms"].append([round(1e3 * float(x), 3) for x in t_alone])  # [step][rank]
                t["alone_shares"].append(_gather_lengths(b, d))  # [step][rank]: each rank's sample lengths
        return t

    def _record(self, dist_name: str, split: str, t: dict, prof: dict | None, packing: float) -> dict:
        args, d, cost = self.args, self.d, self.cost
        times, alone_ms, alone_shares = t["times"], t["alone_ms"], t["alone_shares"]
        tokens_per_s = sum(t["tokens"]) / sum(times)
        return {"world_size": d.world_size, "parallel": args.parallel, "split": split, "label": args.label,
                "length_dist": dist_name, "compile": args.compile, "reduce_dtype": self.wrapping.reduce_dtype,
                "bucket_mb": self.wrapping.bucket_mb if args.parallel == "ddp" else None,
                "tokens_per_rank_budget": args.tokens_per_rank, "cp": self.cp,
                "max_doc_tokens": t["longest"],
                "tflops_per_gpu": sum(t["flops"]) / sum(times) / d.world_size / 1e12,
                "tokens_per_s": tokens_per_s, "step_ms_mean": 1e3 * statistics.mean(times),
                "step_ms_median": 1e3 * statistics.median(times),
                "static_graph": self.wrapping.static_graph, "reshard_after_forward": self.wrapping.reshard_after_forward,
                "cost": args.cost, "cost_per_token_sq": cost.per_token_sq,
                "rank_token_spread": statistics.mean(t["spreads"]) if d.world_size > 1 else 1.0,
                # against every rank's own step without communication, interleaved step by step with
                # the timed ones (same GPUs, same batches, same clocks): what data parallelism costs
                "step_ms_alone_mean": statistics.mean(statistics.mean(a) for a in alone_ms) if alone_ms else None,
                # the real imbalance of a split: busiest rank's time alone over the mean, per step
                "alone_rank_spread": statistics.mean(max(a) / statistics.mean(a) for a in alone_ms)
                if alone_ms else None,
                "alone_ms_by_rank": alone_ms,
                **_cost_check(cost, alone_shares, alone_ms),
                "efficiency_vs_alone": _vs_alone(tokens_per_s, alone_shares, alone_ms),
                "peak_mem_gib": torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None,
                "step_ms": [round(1e3 * x, 2) for x in times], "gc_every": args.gc_every,
                "steps_dropped_for_compiling": t["dropped"],
                "loss": float(t["stats"].loss), "packing_efficiency": packing, "profile": prof}


def _vs_alone(tokens_per_s: float, shares: list[list[list[int]]], ms: list[list[float]]) -> float | None:
    """Tokens/s of the parallel steps over the sum of every rank's tokens/s alone (same batches)."""
    if not ms:
        return None
    ranks = range(len(ms[0]))
    alone = sum(sum(sum(step[r]) for step in shares) / (1e-3 * sum(step[r] for step in ms)) for r in ranks)
    return tokens_per_s / alone


def _gather_lengths(batch: PackedBatch, d) -> list[list[int]]:
    """Every rank's sample lengths of this step (host lists; outside anything timed)."""
    mine = list(batch.info.lengths)
    if d.world_size == 1:
        return [mine]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, mine)
    return out


def _cost_check(cost: CostModel, shares: list[list[list[int]]], ms: list[list[float]]) -> dict:
    """How well the split's cost model predicts each rank's time alone, and the model fitted to those
    times: relative error after the best single scale, and the spread (busiest / mean) it predicts."""
    flat_shares = [s for step in shares for s in step]
    flat_ms = [t for step in ms for t in step]
    if len(flat_ms) < 3:
        return {}

    t = torch.tensor(flat_ms, dtype=torch.float64)

    def check(m: CostModel) -> dict:
        costs = [[m.share(s) for s in step] for step in shares]  # [step][rank], each share priced once
        pred = torch.tensor([c for step in costs for c in step], dtype=torch.float64)
        scale = (pred @ t) / (pred @ pred)
        spread = statistics.mean(max(c) / statistics.mean(c) for c in costs)
        return {"error": float((scale * pred - t).norm() / t.norm()), "predicted_spread": spread}

    out = {"cost_check": check(cost)}
    try:
        fitted = CostModel.fit(flat_shares, flat_ms)
    except ValueError as e:  # too few or too alike shares to fit: say so, do not fail the sweep
        out["cost_fit"] = {"failed": str(e)}
    else:
        out["cost_fit"] = {"per_token_sq": fitted.per_token_sq, "per_seq": fitted.per_seq, **check(fitted)}
    return out


def _same_document(r: dict) -> tuple:
    return r["length_dist"], r.get("max_doc_tokens")


def _against_same_document(runs: list[dict]) -> None:
    """A context-parallel run's rate per GPU against one GPU training the same documents alone
    (same distribution and longest document), where such a run exists: the cost of splitting the
    row, apart from how fast attention runs at that length."""
    alone = {_same_document(r): r for r in runs if r["world_size"] == 1 and r.get("cp", 1) == 1}
    for r in runs:
        one = alone.get(_same_document(r)) if r.get("cp", 1) > 1 else None
        r["tflops_vs_same_document"] = r["tflops_per_gpu"] / one["tflops_per_gpu"] if one else None
        r["speedup_vs_same_document"] = one["step_ms_median"] / r["step_ms_median"] if one else None


def _context_table(runs: list[dict]) -> list[str]:
    """Context parallelism: each GPU's TFLOP/s against the best single GPU's and against one GPU
    on the same documents, and the memory that let the document fit."""
    shown = [r for r in runs if r.get("cp", 1) > 1 or (r["world_size"] == 1 and r.get("tflops_per_gpu"))]
    if not any(r.get("cp", 1) > 1 for r in shown):
        return []
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = ["", "Context parallelism: TFLOP/s per GPU (model FLOPs, attention's included), against the best "
             "single GPU of these runs and against one GPU training the same documents.", "",
             "| variant | GPUs | cp | lengths | longest document | tokens/s | step ms | TFLOP/s per GPU | "
             "vs best one GPU | vs one GPU, same documents (step speed-up) | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(shown, key=lambda r: (r.get("cp", 1), r["world_size"], r["length_dist"])):
        speedup = f" ({r['speedup_vs_same_document']:.2f}x)" if r.get("speedup_vs_same_document") else ""
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") else "-"
        doc = f"{r['max_doc_tokens']:,}" if r.get("max_doc_tokens") else "-"
        lines.append(f"| {r.get('label') or '-'} | {r['world_size']} | {r.get('cp', 1)} | {r['length_dist']} | {doc} | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_ms_mean']:.1f} | {r['tflops_per_gpu']:.1f} | "
                     f"{pct(r.get('tflops_vs_one_gpu'))} | {pct(r.get('tflops_vs_same_document'))}{speedup} | {mem} |")
    return lines


def _runs(d: Path) -> list[dict]:
    """The runs of a sweep folder: its launches' ``runs.jsonl``, or a report's ``scaling.json``
    (re-derived: what :func:`report` adds is computed again)."""
    if (d / "runs.jsonl").exists():
        return [json.loads(x) for x in (d / "runs.jsonl").read_text().splitlines() if x]
    derived = {"tokens_per_s_median", "efficiency", "efficiency_median", "efficiency_note", "tflops_vs_one_gpu",
               "tflops_vs_same_document", "speedup_vs_same_document"}
    return [{k: v for k, v in r.items() if k not in derived} for r in json.loads((d / "scaling.json").read_text())["runs"]]


def _efficiency(runs: list[dict], key) -> None:
    """Weak-scaling efficiency from median steps: a mean carries one-off steps (a recompile of
    seconds in the timed window once made a 1-GPU mean several times its median and published an
    efficiency over 100%). Above 1 only with ``efficiency_note`` saying why."""
    for r in runs:  # a step that recompiles (seconds) moves the mean a lot: rates from the median step
        r["tokens_per_s_median"] = r["tokens_per_s"] * r["step_ms_mean"] / r["step_ms_median"]
    base = {key(r): r for r in runs if r["world_size"] == 1}
    for r in runs:
        one = base.get(key(r))
        r["efficiency"] = r["tokens_per_s_median"] / (r["world_size"] * one["tokens_per_s_median"]) if one else None
        if r["efficiency"] is not None and r["efficiency"] > 1:
            r["efficiency_note"] = (f"above 100%: each of the {r['world_size']} GPUs moved more tokens a second "
                                    f"({r['tokens_per_s_median'] / r['world_size']:,.0f}) than the 1-GPU run "
                                    f"({one['tokens_per_s_median']:,.0f}) at its median step: the baseline is slow "
                                    "or noisy, not the scaling super-linear")


def report(dirs: list[Path], out: Path) -> dict:
    runs = [r for d in dirs for r in _runs(d)]
    key = lambda r: (r.get("label", ""), r["parallel"], r.get("reduce_dtype") or "fp32", r["split"], r["length_dist"],  # noqa: E731
                     r.get("cp", 1))
    _efficiency(runs, key)
    one_gpu = [r["tflops_per_gpu"] for r in runs if r["world_size"] == 1 and r.get("tflops_per_gpu")]
    for r in runs:  # context parallelism's measure: each GPU's rate against the best single GPU's
        r["tflops_vs_one_gpu"] = r["tflops_per_gpu"] / max(one_gpu) if one_gpu and r.get("tflops_per_gpu") else None
    _against_same_document(runs)
    envs = [json.loads((d / "env.json").read_text()) for d in dirs if (d / "env.json").exists()]
    if len({e.get("gpu") for e in envs}) > 1:
        raise SystemExit(f"runs come from different devices: {sorted({e.get('gpu') for e in envs})}")
    result = {"env": envs[0] if envs else {}, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    lines = ["| variant | GPUs | parallel | reduce | split | lengths | tokens/s (median step) | step ms (mean / median) | "
             "efficiency (median steps) | efficiency vs alone | rank token spread | rank time spread alone (cost model's) | "
             "exposed comm ms | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (*key(r), r["world_size"])):
        eff = f"{100 * r['efficiency']:.1f}%{' (!)' if r.get('efficiency_note') else ''}" if r["efficiency"] else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "-"
        spread = f"{r['alone_rank_spread']:.3f}" if r.get("alone_rank_spread") else "-"
        if r.get("cost_check"):
            spread += f" ({r['cost_check']['predicted_spread']:.3f})"
        comm = (r.get("profile") or {}).get("communication_exposed_ms")
        alone = f"{100 * r['efficiency_vs_alone']:.1f}%" if r.get("efficiency_vs_alone") else "-"
        lines.append(f"| {r.get('label') or '-'} | {r['world_size']} | {r['parallel']} | {r.get('reduce_dtype', 'fp32')} | "
                     f"{r['split']} | {r['length_dist']} | {r['tokens_per_s_median']:,.0f} | "
                     f"{r['step_ms_mean']:.1f} / {r['step_ms_median']:.1f} | {eff} | {alone} | {r['rank_token_spread']:.3f} | "
                     f"{spread} | {'-' if comm is None else f'{comm:.1f}'} | {mem} |")
    lines += [f"(!) {r['world_size']} GPUs, {r['parallel']}, {r['split']}, {r['length_dist']}: {r['efficiency_note']}"
              for r in runs if r.get("efficiency_note")]
    lines += _context_table(runs)
    profiled = [r for r in runs if r.get("profile")]
    if profiled:  # where rank 0's step went: what the GPU computed, what communication nothing hid
        parts = ("gemm", "attention", "elementwise/norm", "optimizer")
        lines += ["", "Rank 0's step under the profiler (ms a step): kernels by kind, all communication kernels, the "
                  "part of them no compute kernel overlapped, and the time the GPU was idle.", "",
                  "| variant | GPUs | split | lengths | step | " + " | ".join(parts) + " | comm | comm exposed | idle |",
                  "|---|---|---|---|---|" + "---|" * (len(parts) + 3)]
        for r in sorted(profiled, key=lambda r: (*key(r), r["world_size"])):
            pr = r["profile"]
            lines.append(f"| {r.get('label') or '-'} | {r['world_size']} | {r['split']} | {r['length_dist']} | "
                         f"{pr['step_ms']:.1f} | " + " | ".join(f"{pr['ms'][k]:.1f}" for k in parts) +
                         f" | {pr.get('communication_ms', 0):.1f} | {pr.get('communication_exposed_ms', 0):.1f} | "
                         f"{pr['ms']['host/data gap']:.1f} |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result
