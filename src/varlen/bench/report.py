"""Report a study: a table (rich), speed-ups against the padded baseline, a bar chart, JSON, CSV
and a markdown table. Results JSON: ``{"env", "workload", "matmul_peak_tflops", "cases": [...]}``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .cases import baseline_of, case_name, order_key

COLUMNS = [
    "strategy", "backend", "mode", "compile", "step_ms_mean", "step_ms_median", "step_ms_min",
    "speedup", "tokens_per_s", "tflops", "mfu", "padding_frac", "peak_mem_gib", "recompiles",
    "graphs", "loss", "loss_delta", "steps", "wall_s", "kernel", "error", "applicable",
]


def add_comparisons(cases: list[dict]) -> None:
    """Speed-up and loss difference against the padded baseline of the same mode and compile."""
    base = {(c["strategy"], c["mode"], c["compile"]): c for c in cases if c["error"] is None}
    for c in cases:
        b = base.get((baseline_of(c["strategy"]), c["mode"], c["compile"]))
        ok = b is not None and c["error"] is None
        c["speedup"] = b["step_ms_mean"] / c["step_ms_mean"] if ok else None
        c["loss_delta"] = c["loss"] - b["loss"] if ok else None


def add_mfu(cases: list[dict], peak_tflops: float | None) -> None:
    """MFU, and the step time as a multiple of its two floors: its FLOPs at the matmul peak measured
    in the run (1 / MFU), and its GEMMs alone at their real shapes."""
    for c in cases:
        c["mfu"] = c["tflops"] / peak_tflops if peak_tflops and c.get("tflops") is not None else None
        c["x_flops_floor"] = 1 / c["mfu"] if c["mfu"] else None
        ok = c.get("gemm_floor_ms") and c.get("step_ms_mean")
        c["x_gemm_floor"] = c["step_ms_mean"] / c["gemm_floor_ms"] if ok else None


UNSTEADY = 1.1  # a mean this far above its median: some steps are not like the others


def unsteady(cases: list[dict], bound: float = UNSTEADY) -> dict[str, list[int]]:
    """Cases whose mean step is over ``bound`` x their median, each with its slowest steps (indices
    into ``step_ms``, slowest first, those over 1.5x the median): a recompile, or batches that leave
    a kernel's fast path (packed SDPA's padded lengths once did), shows up here before in a table."""
    out = {}
    for c in cases:
        mean, median, steps = c.get("step_ms_mean"), c.get("step_ms_median"), c.get("step_ms") or []
        if c.get("error") is None and mean and median and mean > bound * median:
            slow = sorted((i for i, t in enumerate(steps) if t > 1.5 * median), key=lambda i: -steps[i])
            out[case_name(c["strategy"], c["mode"], c["compile"])] = slow
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rows(cases: list[dict]) -> list[list[str]]:
    out = []
    for c in cases:
        out.append([
            c.get("strategy"), c.get("mode"), "yes" if c.get("compile") else "no",
            _fmt(c.get("step_ms_mean"), ".1f"), _fmt(c.get("step_ms_median"), ".1f"), _fmt(c.get("speedup"), ".2f"),
            _fmt(c.get("tokens_per_s") and c.get("tokens_per_s") / 1e3, ".1f"), _fmt(c.get("tflops"), ".3g"),
            _fmt(c.get("mfu") and 100 * c.get("mfu"), ".1f"), _fmt(c.get("x_flops_floor"), ".2f"),
            _fmt(c.get("x_gemm_floor"), ".2f"), _fmt(c.get("padding_frac") and 100 * c.get("padding_frac"), ".0f"),
            _fmt(c.get("peak_mem_gib"), ".2f"), _fmt(c.get("recompiles"), "d"), _fmt(c.get("loss"), ".4f"),
            c.get("kernel") or "",
            ("" if c.get("error") is None else ("" if c.get("applicable", True) else "n/a: ") + c["error"])[:90],
        ])
    return out


HEADER = ["strategy", "mode", "compiled", "step ms", "median", "speed-up", "ktok/s", "TFLOP/s", "MFU %",
          "x FLOP floor", "x GEMM floor", "pad %", "peak GiB", "recompiles", "loss", "kernel", "error"]


def env_line(env: dict) -> str:
    return (f"{env.get('gpu') or 'CPU'} | driver {env.get('driver') or '-'} | torch {env['torch']} | "
            f"CUDA {env.get('cuda') or '-'} | Python {env['python']} | {env['date']}")


# the longest case name (hf-varlen-flash:torch/train/compiled) and these fit 100 columns
NARROW_HEADER = ["case", "ms", "×pad", "TFLOP/s", "MFU%", "GiB", "loss", "error"]
NARROW_ERROR = 14  # characters of an error in the narrow table; a line below the table has it all


def narrow_rows(cases: list[dict]) -> list[list[str]]:
    """The columns a reader compares, for the cases that could run here (n/a ones get one line each
    reason, :func:`not_applicable_lines`): fits 100 columns; ``--wide`` shows :data:`HEADER`."""
    out = []
    for c in cases:
        if not c.get("applicable", True):
            continue
        error = c.get("error") or ""
        out.append([
            case_name(c["strategy"], c["mode"], c["compile"]), _fmt(c.get("step_ms_mean"), ".1f"),
            _fmt(c.get("speedup"), ".2f"), _fmt(c.get("tflops"), ".3g"), _fmt(c.get("mfu") and 100 * c.get("mfu"), ".1f"),
            _fmt(c.get("peak_mem_gib"), ".2f"), _fmt(c.get("loss"), ".4f"),
            error if len(error) <= NARROW_ERROR else error[:NARROW_ERROR - 1] + "…",
        ])
    return out


def failed_lines(cases: list[dict]) -> list[str]:
    """One line per case that could run here and failed, its error whole (or its first 300 characters)."""
    return [f"failed: {case_name(c['strategy'], c['mode'], c['compile'])}: {c['error'][:300]}"
            for c in cases if c.get("error") and c.get("applicable", True)]


def not_applicable_lines(cases: list[dict]) -> list[str]:
    """One line per reason a case cannot run on this machine, naming the strategies it stops."""
    by_reason: dict[str, list[dict]] = {}
    for c in cases:
        if not c.get("applicable", True):
            by_reason.setdefault(c.get("error") or "not applicable", []).append(c)
    lines = []
    for reason, cs in by_reason.items():
        strategies = sorted({c["strategy"] for c in cs}, key=order_key)
        lines.append(f"n/a here: {', '.join(strategies)} ({len(cs)} case{'s' if len(cs) > 1 else ''}): {reason}")
    return lines


def print_table(report: dict, console=None, wide: bool = False) -> None:
    header, body = (HEADER, rows(report["cases"])) if wide else (NARROW_HEADER, narrow_rows(report["cases"]))
    notes = [] if wide else failed_lines(report["cases"]) + not_applicable_lines(report["cases"])
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text without the bench extra
        print(env_line(report["env"]))
        for r in [header, *body, *profile_rows(report["cases"])]:
            print(" | ".join(r))
        print("\n".join(notes))
        return
    console = console or Console()
    console.print(f"varlen bench — {env_line(report['env'])}", highlight=False)
    table = Table(box=box.HEAVY_HEAD if wide else box.SIMPLE_HEAD, show_edge=wide, collapse_padding=not wide)
    for h in header:
        table.add_column(h, justify="left" if h in ("case", "strategy", "mode", "error") else "right",
                         overflow="fold", max_width=60 if h == "error" and wide else None, no_wrap=not wide)
    for r in body:
        table.add_row(*r)
    console.print(table)
    for line in notes:
        console.print(line, soft_wrap=True, highlight=False)
    profiled = profile_rows(report["cases"])
    if profiled:
        breakdown = Table(title="where the time goes (--profile): ms per step (% of the step)", title_justify="left")
        for h in PROFILE_HEADER:
            breakdown.add_column(h, justify="left" if h == "case" else "right")
        for r in profiled:
            breakdown.add_row(*r)
        console.print(breakdown)
    console.print(f"{peak_line(report)}.", highlight=False)
    console.print(("speed-up" if wide else "ms: the mean step; GiB: peak memory; ×pad: speed-up") + " against the padded "
                  "baseline (padded, hf-padded) of the same mode and compile setting" + ("" if wide else "; --wide: every column"),
                  highlight=False)


def peak_line(report: dict) -> str:
    peak = report.get("matmul_peak_tflops")
    if peak is None:  # a CPU's matmul rate moves with threads and caches: no MFU is claimed there
        return "matmul peak: not measured on this device (no MFU or FLOP floor)"
    return f"matmul peak measured in this run: {peak:.1f} TFLOP/s"


def markdown(report: dict) -> str:
    lines = [f"# varlen bench: {report['env']['date']}", "", env_line(report["env"]), "",
             f"Workload: `{json.dumps(report['workload'])}`; {peak_line(report)}.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report["cases"])]
    profiled = profile_rows(report["cases"])
    if profiled:
        lines += ["", "Where the time goes (`--profile`; ms per step, % of the step):", "",
                  "| " + " | ".join(PROFILE_HEADER) + " |", "|" + "---|" * len(PROFILE_HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in profiled]
        for c in report["cases"]:
            top = (c.get("profile") or {}).get("top")
            if top:
                name = case_name(c["strategy"], c["mode"], c["compile"])
                lines += ["", f"Top kernels of {name} (ms per step):", "", "| kernel | part | ms |", "|---|---|---|"]
                lines += [f"| `{k['name'][:90]}` | {k['part']} | {k['ms']:.2f} |" for k in top[:12]]
    return "\n".join(lines) + "\n"


PROFILE_HEADER = ["case", "step ms", "attention", "gemm", "elementwise/norm", "optimizer", "host/data gap"]


def profile_rows(cases: list[dict]) -> list[list[str]]:
    out = []
    for c in cases:
        p = c.get("profile")
        if not p:
            continue
        name = case_name(c["strategy"], c["mode"], c["compile"])
        out.append([name, f"{p['step_ms']:.1f}"] + [f"{p['ms'][k]:.1f} ({p['pct'][k]:.0f}%)" for k in PROFILE_HEADER[2:]])
    return out


def plot(report: dict, path: Path) -> Path | None:
    """Step times per strategy: eval and train panels, eager and compiled bars, like the study's figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = report["cases"]
    strategies = sorted({c["strategy"] for c in cases}, key=order_key)
    modes = [m for m in ("eval", "train") if any(c["mode"] == m for c in cases)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for j, compiled in enumerate((False, True)):
            xs, ys, fails = [], [], []
            for i, s in enumerate(strategies):
                c = next((c for c in cases if c["strategy"] == s and c["mode"] == mode and c["compile"] == compiled), None)
                if c is None:
                    continue
                x = i + (j - 0.5) * 0.38
                if c["error"] is None:
                    xs.append(x)
                    ys.append(c["step_ms_mean"])
                else:
                    fails.append(x)
            # an outlier (a case that recompiles every step) would flatten the others: clip it
            # at 2.5x the padded baseline and print its value on the bar
            baselines = {baseline_of(s) for s in strategies}
            base = [c["step_ms_mean"] for c in cases
                    if c["strategy"] in baselines and c["mode"] == mode and c["error"] is None]
            top = 2.5 * max(base) if base else None
            shown = [min(y, top) if top else y for y in ys]
            bars = ax.bar(xs, shown, width=0.38, label="compiled" if compiled else "eager", color=("C1" if compiled else "C0"))
            ax.bar_label(bars, labels=[f"{y:.0f}" + ("*" if top and y > top else "") for y in ys], fontsize=7)
            for x in fails:
                ax.text(x, 0, "×", ha="center", va="bottom", color="red", fontsize=12)
        ax.set_xticks(range(len(strategies)), strategies, rotation=30, ha="right")
        ax.set_ylabel("step time (ms, mean)")
        ax.set_title(f"{mode}  (× failed, see table; * bar clipped)")
        ax.legend()
    import textwrap

    fig.suptitle(textwrap.fill(f"varlen bench: {env_line(report['env'])}", 90), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report["cases"])
    paths["md"].write_text(markdown(report))
    png = plot(report, out / "step_times.png")
    if png:
        paths["png"] = png
    return paths
