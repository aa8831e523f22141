"""``varlen bench``: the variable-length study as one command."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import threading
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..argtypes import device_problem, usage_error
from ..data.synthetic import sample_lengths
from ..info import environment
from .cases import WORKLOADS, case_name, grid, order_key
from .options import BenchOptions
from .report import UNSTEADY, add_comparisons, add_mfu, print_table, save, unsteady
from .runner import measure_peak, result_dicts, run_all


def parse_args(argv) -> BenchOptions:
    """The command line as a :class:`BenchOptions`; flags that cannot go together are one line (exit 2)."""
    p = argparse.ArgumentParser(prog="varlen bench", description=__doc__)
    BenchOptions.add_flags(p)
    opts = BenchOptions.from_args(p.parse_args(argv))
    why = opts.problems()
    if why:
        p.error(why[0])
    return opts


def merge(dirs: list[Path], out: Path) -> dict:
    """One report from several partial runs; a later run's case replaces an earlier one's."""
    reports = [json.loads((d / "results.json").read_text()) for d in dirs if (d / "results.json").exists()]
    if not reports:
        usage_error("varlen bench", "--merge: no finished run among " + ", ".join(map(str, dirs)))
    for d in dirs:  # a run cut short left only cases.jsonl: it ran on the machine of the others
        if not (d / "results.json").exists():
            lines = (d / "cases.jsonl").read_text().splitlines() if (d / "cases.jsonl").exists() else []
            reports.append({**reports[0], "cases": [json.loads(line) for line in lines if line.strip()]})
    gpus = {r["env"].get("gpu") for r in reports}
    if len(gpus) > 1:
        usage_error("varlen bench", f"--merge: runs come from different devices {gpus}; compare only within one")
    cases = {}
    for r in reports:
        for c in r["cases"]:
            cases[(c["strategy"], c["mode"], c["compile"])] = c
    peaks = [r["matmul_peak_tflops"] for r in reports if r.get("matmul_peak_tflops")]
    ordered = sorted(cases.values(), key=lambda c: (c["compile"], c["mode"] != "eval", order_key(c["strategy"])))
    report = {**reports[0], "matmul_peak_tflops": max(peaks, default=None), "cases": ordered,
              "merged_from": [r["env"]["date"] for r in reports]}
    add_comparisons(report["cases"])
    add_mfu(report["cases"], report["matmul_peak_tflops"])
    return report


def only_gpu(device: str) -> str:
    """``cuda:N`` -> ``cuda``, with ``CUDA_VISIBLE_DEVICES`` naming GPU N alone for the case workers
    (each a process of its own, started after this)."""
    why = device_problem(device)
    if why:
        usage_error("varlen bench", why)
    kind, _, index = device.partition(":")
    if index:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[int(index)] if visible else index
    return kind


def workload_from(args: BenchOptions):
    if args.device:
        args = replace(args, device=only_gpu(args.device))
    preset = args.preset or ("study" if torch.cuda.is_available() else "tiny")
    w = WORKLOADS[preset]
    overrides = {k: getattr(args, k) for k in ("batch_size", "max_len", "length_dist", "steps", "warmup", "seed",
                                               "num_workers", "device", "tokens_per_batch")
                 if getattr(args, k) is not None}
    if args.profile:
        overrides["profile"] = True
    if args.cuda_graphs:
        overrides["cuda_graphs"] = True
    if args.autotune:
        overrides["autotune"] = True
    w = replace(w, **overrides)
    if w.device == "cuda" and not torch.cuda.is_available():  # a GPU preset, or --device cuda, on a CPU machine
        usage_error("varlen bench", f"--preset {preset} runs on CUDA and there is no CUDA device here; use --preset "
                                    "tiny or --device cpu")
    levers = args.levers
    # the bench autocasts to bf16 on CUDA and runs float32 on the CPU
    why = next(iter(levers.problems(args.model, "bf16" if w.device == "cuda" else "fp32")), None)
    if why:
        usage_error("varlen bench", why)
    if levers.fp8 and w.device != "cuda":
        usage_error("varlen bench", "--fp8 times float8 GEMMs, which need a CUDA GPU (on the CPU they are emulated)")
    w = replace(w, levers=levers)
    if w.tokens_per_batch and w.tokens_per_batch < w.max_len:
        usage_error("varlen bench", f"--max-tokens {w.tokens_per_batch} is below the longest sample "
                                    f"(--max-len {w.max_len})")
    try:  # a lengths file with a bad entry fails here, once, not in every case
        sample_lengths(1, w.length_dist, w.max_len, w.seed)
    except ValueError as e:
        usage_error("varlen bench", f"--length-dist: {e}")
    return preset, w


def cases_from(args: BenchOptions, w) -> list:
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    return grid(args.chosen_strategies(), args.chosen_modes(), compile_modes, w)


def case_line(case, result) -> str:
    """One line a finished case prints: its numbers, or why it gave none."""
    if result.error is None:
        return (f"{case.name}: {result.step_ms_mean:.1f} ms/step, {result.tflops:.3g} TFLOP/s, "
                f"loss {result.loss:.4f}, recompiles {result.recompiles}"
                + (f", kernel {result.kernel}" if result.kernel else ""))
    return f"{case.name}: {'FAILED' if result.applicable else 'n/a here'}: {result.error}"


def run_cases(cases, timeout: float, out: Path, jobs: int):
    """Run every case with a live progress line; each finished case is printed and appended to
    ``out/cases.jsonl`` (a run cut short keeps its results). Returns (results, console)."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(width=None if sys.stdout.isatty() else 200)
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console)
    except ImportError:
        console = progress = None
    partial = out / "cases.jsonl"
    partial.write_text("")
    lock = threading.Lock()  # --jobs: cases finish on several threads

    def tell(i, case, result):
        with lock:
            if result is None:
                if progress:
                    progress.update(task, description=case.name)
                return
            if progress:
                progress.console.print(case_line(case, result), markup=False)  # reasons hold brackets
                progress.advance(task)
            else:
                print(case_line(case, result), flush=True)
            with partial.open("a") as f:
                f.write(json.dumps(asdict(result)) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        if not progress:
            return run_all(cases, timeout, Path(tmp), tell, jobs), console
        with progress:
            task = progress.add_task("starting", total=len(cases))
            return run_all(cases, timeout, Path(tmp), tell, jobs), console


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.merge:
        report = merge(args.merge, args.out or Path("bench-out/merged"))
        print_table(report, wide=args.wide)
        paths = save(report, args.out or Path("bench-out/merged"))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    preset, w = workload_from(args)
    cases = cases_from(args, w)
    env = {**environment(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    out = args.out or Path("bench-out") / f"{(env['gpu'] or 'cpu').split(' x')[0].replace(' ', '-')}-{env['date'][:10]}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"varlen bench: preset {preset}, {len(cases)} cases on {w.device}; workload {json.dumps(asdict(w))}", flush=True)
    # the bf16 matmul peak of a GPU; on a CPU a float32 matmul measured apart from the cases (other
    # thread counts, other caches) made MFU read over 100%: left out there
    peak = measure_peak(w.device) if w.device == "cuda" else None
    results, console = run_cases(cases, args.case_timeout or (900 if w.device == "cuda" else 600), out, args.jobs)
    report = {"env": env, "preset": preset, "workload": asdict(w), "matmul_peak_tflops": peak,
              "cases": result_dicts(results)}
    add_comparisons(report["cases"])
    add_mfu(report["cases"], peak)
    print_table(report, console, wide=args.wide)
    paths = save(report, out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = [r for r in results if r.error is not None and (r.applicable or args.strict)]
    uneven = unsteady(report["cases"])
    if uneven:  # one line: on a busy CPU most cases are uneven
        print(f"varlen bench: mean step over {UNSTEADY}x the median (slowest steps first, step_ms in results.json): "
              + "; ".join(f"{name} {slow[:4]}" for name, slow in uneven.items()), file=sys.stderr)
    best = min((c for c in report["cases"] if c["error"] is None), key=lambda c: c["step_ms_mean"], default=None)
    summary = {"out": str(out), "cases": len(results), "failed": len(failed),
               "not_applicable": sum(not r.applicable for r in results),
               "fastest": best and case_name(best["strategy"], best["mode"], best["compile"]),
               "unsteady": list(uneven)}
    if failed:
        print(f"varlen bench: {len(failed)} case(s) failed: " + ", ".join(
            case_name(r.strategy, r.mode, r.compile) for r in failed), file=sys.stderr)
    print(json.dumps(summary))  # last line: one line of JSON for scripts
    return 1 if failed else 0
