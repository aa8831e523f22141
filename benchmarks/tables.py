"""The published tables, generated from committed results.json files, so that no page types a number.

    python benchmarks/tables.py          # rewrite every table in place
    python benchmarks/tables.py --check  # exit 1 naming each table that differs from its results

A table sits in a Markdown page between ``<!-- table:NAME -->`` and ``<!-- /table -->``; NAME is a
key of :data:`TABLES`, which says where its numbers come from.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from varlen.attention.flash import FA4_MIN_TOKENS  # the threshold a table's label names, from the code

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _load(path: str):
    return json.loads((RESULTS / path).read_text())


def steady_tokens_per_s(run: dict, warmup: int = 15, outlier: float = 5.0) -> float | None:
    """Tokens/s over the timed steps without the ones over ``outlier`` x the median (recompiles)."""
    ms, tokens = run.get("step_ms"), run.get("tokens")
    if not ms:
        return None
    median = statistics.median(ms[warmup:])
    kept = [(m, t) for m, t in zip(ms[warmup:], tokens[warmup:]) if m < outlier * median]
    return 1e3 * sum(t for _, t in kept) / sum(m for m, _ in kept)


def _cell(case: dict | None, padded_ms: float | None, bold: bool = False) -> str:
    """A step's mean ms, with its fraction of the padded step beside it (``padded_ms``; None: the
    baseline itself); ``-`` where the run has no such case, the error's kind where it failed."""
    if case is None:
        return "-"
    if case["error"] is not None:
        return case["error"].split(":")[0][:40]
    ms = case["step_ms_mean"]
    cell = f"{ms:.1f}" if padded_ms is None else f"{ms:.1f} ({ms / padded_ms:.2f})"
    return f"**{cell}**" if bold else cell


FINETUNE_ROWS = {
    "hf-padded": "HF `Trainer`, pad to longest, `sdpa`",
    "hf-flattening": "HF `Trainer`, `DataCollatorWithFlattening`, `sdpa`, compiled",
    "varlen-train": "`varlen train --model DIR --compile`",
    "varlen-train-chunked": "the same with `--loss-chunk 4096`",
    "varlen-trainer": "HF `Trainer` with `varlen.trainer.token_budget_trainer`, compiled",
}


def finetune_table() -> str:
    runs = {r["name"]: r for r in _load("h100-2026-12-06-session14-finetune/results.json")}
    best = max(r["tokens_per_s"] for r in runs.values())
    lines = ["| how | tokens/s | peak memory |", "|---|---:|---:|"]
    for name, label in FINETUNE_ROWS.items():
        r = runs[name]
        rate = f"{r['tokens_per_s']:,.0f}"
        rate = f"**{rate}**" if r["tokens_per_s"] == best else rate
        steady = steady_tokens_per_s(r)
        if steady and steady > 1.05 * r["tokens_per_s"]:
            rate += f" ({steady:,.0f} between recompiles)"
        lines.append(f"| {label} | {rate} | {r['peak_mem_gib']:.1f} GiB |")
    return "\n".join(lines)


STUDY_ROWS = {  # label -> strategies, the first one measured in a cell fills it
    "padded to 1024, SDPA + mask": ("padded",),
    "pad to longest (power-of-two buckets)": ("longest",),
    "nested (jagged) tensors": ("nested",),
    "**packed, FlashAttention-4 (`packed-flash`, what `auto` runs here)**": ("packed-flash:fa4", "packed-flash"),
    "packed, torch's FlashAttention-2": ("packed-flash:torch",),
    "packed, xFormers `BlockDiagonalMask`": ("packed-xformers",),
    "packed, FlexAttention": ("packed-flex",),
    "packed, SDPA inside `attention`": ("packed-sdpa",),
}


def study_table() -> str:
    cases = {(c["strategy"], c["mode"], c["compile"]): c
             for c in _load("h100-2026-11-27-session7/study/results.json")["cases"] if c["error"] is None}
    cells = [("eval", False), ("eval", True), ("train", False), ("train", True)]
    lines = ["| strategy | eval eager | eval compiled | train eager | train compiled |", "|---|---|---|---|---|"]
    for label, strategies in STUDY_ROWS.items():
        row = []
        for mode, compiled in cells:
            c = next((cases[(s, mode, compiled)] for s in strategies if (s, mode, compiled) in cases), None)
            padded = None if strategies == ("padded",) else cases[("padded", mode, compiled)]["step_ms_mean"]
            row.append(_cell(c, padded, label.startswith("**")))
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def headline_table() -> str:
    """The README's: compiled steps, padded against packed, on the study's uniform lengths and on
    long-tailed ones as CUDA graphs (the padded step of the same session beside each)."""
    def cases(path):
        return {(c["strategy"], c["mode"]): c["step_ms_mean"] for c in _load(path)["cases"]
                if c["compile"] and c["error"] is None}

    uniform = cases("h100-2026-11-27-session7/study/results.json")
    tail_padded = cases("h100-2026-11-27-session9/graphs-lognormal/graphs-off-lognormal/results.json")
    tail_graphs = cases("h100-2026-11-27-session9/graphs-lognormal/graphs-on-lognormal/results.json")
    rows = [("lengths 1..1023, padded to 1024", uniform, "padded", None),
            ("the same packed, FlashAttention-4 (`auto`)", uniform, "packed-flash:fa4", uniform),
            ("long-tailed lengths, padded", tail_padded, "padded", None),
            ("the same packed, as CUDA graphs (`--cuda-graphs`)", tail_graphs, "packed-flash", tail_padded)]
    lines = ["| compiled step, one H100 (ms) | eval | train |", "|---|---:|---:|"]
    for label, src, strategy, base in rows:
        cells = []
        for mode in ("eval", "train"):
            ms = src.get((strategy, mode)) or src.get(("packed-flash", mode))
            cells.append(f"{ms:.1f}" if base is None else f"**{ms:.1f}** ({ms / base[('padded', mode)]:.2f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compiled_table(title: str, rows: list[tuple[str, str, str]], base: str, bold: int | None = None) -> str:
    """Compiled eval and train steps (ms), each row ``(label, results.json, strategy)``, as a fraction of
    the ``padded`` case of ``base`` (a results.json of the same session)."""
    def steps(path):
        return {(c["strategy"], c["mode"]): c["step_ms_mean"] for c in _load(path)["cases"]
                if c["compile"] and c["error"] is None}

    padded = steps(base)
    lines = [f"| {title} | eval | train |", "|---|---|---|"]
    for i, (label, path, strategy) in enumerate(rows):
        got = steps(path)
        cells = []
        for mode in ("eval", "train"):
            ms = got[(strategy, mode)]
            cell = f"{ms:.1f}" if strategy == "padded" else f"{ms:.1f} ({ms / padded[('padded', mode)]:.2f})"
            cells.append(f"**{cell}**" if i == bold else cell)
        lines.append(f"| {f'**{label}**' if i == bold else label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


S9, S11 = "h100-2026-11-27-session9/", "h100-2026-11-27-session11/C/"


def levers_table() -> str:
    return compiled_table("uniform lengths, compiled", [
        ("padded to 1024, SDPA + mask", S11 + "headline-base/results.json", "padded"),
        ("packed, FA4 (`auto`)", S11 + "headline-base/results.json", "packed-flash"),
        ("packed, CUDA graphs + bf16 residual + quack MLP (`--cuda-graphs --residual-dtype bf16 --gelu tanh "
         "--mlp-kernel quack`)", S11 + "headline-best/results.json", "packed-flash"),
    ], base=S11 + "headline-base/results.json", bold=2)


def lognormal_table() -> str:
    off, on = S9 + "graphs-lognormal/graphs-off-lognormal/results.json", S9 + "graphs-lognormal/graphs-on-lognormal/results.json"
    return compiled_table("lognormal lengths, compiled", [
        ("padded to 1024, SDPA + mask", off, "padded"),
        (f"packed, torch's FA2 (what `auto` runs below {FA4_MIN_TOKENS:,} tokens)", off, "packed-flash"),
        ("packed, as CUDA graphs (`--cuda-graphs`)", on, "packed-flash"),
        ("packed, CUDA graphs + bf16 residual stream", S9 + "graphs-residual/lognormal/results.json", "packed-flash"),
    ], base=off, bold=2)


def length_table() -> str:
    """Packed FA4 train steps (compiled) as samples grow, beside padding, from the length-scaling runs."""
    runs = [("results.json", "1,023 (32 samples, ~16K tokens)"), ("length-8k/results.json", None),
            ("length-32k/results.json", None)]
    lines = ["| longest sample | packed FA4 step | TFLOP/s on real tokens | peak GiB | padded |", "|---|---|---|---|---|"]
    for path, label in runs:
        report = _load("h100-fa4-2026-11-26/" + path)
        cases = {c["strategy"]: c for c in report["cases"] if c["mode"] == "train" and c["compile"]}
        fa4, padded = cases["packed-flash:fa4"], cases["padded"]
        if padded["error"] is None:
            pad = f"{padded['step_ms_mean']:.1f} ms, {padded['peak_mem_gib']:.1f} GiB"
        else:
            pad = "out of memory" if "OutOfMemoryError" in padded["error"] else "failed"
        ms = fa4["step_ms_mean"]
        lines.append(f"| {label or format(report['workload']['max_len'], ',')} | {ms:.1f} ms | {fa4['tflops']:.0f} | "
                     f"{fa4['peak_mem_gib']:.1f} | {pad} |")
    return "\n".join(lines)


def gpt2_table() -> str:
    """The study's HF part: a stock GPT2 train step, eager and compiled, each cell beside the padded
    step of its own run (``-``: not in that run)."""
    base, fa4 = "h100-hf-gpt2-2026-11-26/results.json", "h100-fa4-2026-11-26/hf-gpt2/results.json"
    rows = [("padded to 1024, HF `sdpa` (the baseline)", base, "hf-padded"),
            ("packed row, HF's own `sdpa` path", base, "hf-packed-sdpa"),
            ("packed, `attn_implementation=\"varlen\"`, flash (torch's FA2)", base, "hf-varlen-flash"),
            ("**packed, varlen, `flash:fa4`** (another run)", fa4, "hf-varlen-flash:fa4"),
            ("packed, varlen, flex", base, "hf-varlen-flex"),
            ("packed, varlen, sdpa", base, "hf-varlen-sdpa")]
    lines = ["| GPT2 train step (ms) | eager | compiled |", "|---|---|---|"]
    for label, path, strategy in rows:
        cases = {(c["strategy"], c["compile"]): c for c in _load(path)["cases"] if c["mode"] == "train"}
        cells = []
        for compiled in (False, True):
            base = cases.get(("hf-padded", compiled))
            padded = None if strategy == "hf-padded" or base is None else base["step_ms_mean"]
            cells.append(_cell(cases.get((strategy, compiled)), padded, label.startswith("**")))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_table() -> str:
    """Where a compiled study train step goes (``--profile``), ms a step: padding and packed FA2 from the
    FA4 session's study run, packed FA4 from its profiled top-kernels run."""
    def case(path, strategy):
        return next(c for c in _load("h100-fa4-2026-11-26/" + path)["cases"]
                    if c["strategy"] == strategy and c["mode"] == "train" and c["compile"])

    # the GEMM floor (the same GEMMs timed alone) of the profiled FA4 run only: the floors recorded in
    # the study run exceed those steps' own profiled GEMM time, so they do not compare with it
    rows = [("padded to 1024", {**case("results.json", "padded"), "gemm_floor_ms": None}),
            ("packed, torch's FA2", {**case("results.json", "packed-flash:torch"), "gemm_floor_ms": None}),
            ("packed, FA4", case("top-kernels/results.json", "packed-flash:fa4"))]
    parts = ["attention", "gemm", "elementwise/norm", "optimizer", "host/data gap"]
    lines = ["| train step, compiled | step | attention | GEMMs (alone) | elementwise / norms | optimizer | host gaps |",
             "|---|---|---|---|---|---|---|"]
    for label, c in rows:
        ms = c["profile"]["ms"]
        cells = [f"{ms[k]:.1f}" + (f" ({c['gemm_floor_ms']:.1f})" if k == "gemm" and c.get("gemm_floor_ms") else "")
                 for k in parts]
        lines.append(f"| {label} | {c['profile']['step_ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_table() -> str:
    """Weak scaling at 4 GPUs: each run's tokens/s of median steps against one GPU of the same launch."""
    runs = _load("h100x4-scaling-2026-11-26/scaling.json")["runs"]
    rows = {"DDP, bf16 gradient reduction": ("ddp", "bf16"), "DDP, fp32 reduction": ("ddp", None),
            "FSDP2 (bf16 params)": ("fsdp2", "fp32")}
    cols = [("uniform", "balanced"), ("uniform", "naive"), ("lognormal", "balanced"), ("lognormal", "naive")]
    lines = ["| 4 GPUs vs 1 | " + " | ".join(f"{d}, {s}" for d, s in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, (parallel, reduce) in rows.items():
        cells = [next(f"{100 * r['efficiency']:.1f}%" for r in runs if r["world_size"] == 4 and r["parallel"] == parallel
                      and r.get("reduce_dtype") == reduce and (r["length_dist"], r["split"]) == col) for col in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cp_table() -> str:
    """Context parallelism on 2 GPUs beside one GPU: mean step, model TFLOP/s a GPU and its fraction of
    one GPU's rate at the study's 32K tokens, and of one GPU on the same document."""
    runs = {(r["label"], r["length_dist"]): r for r in _load("h200x2-cp-2026-11-27/report/scaling.json")["runs"]}
    rows = [("study lengths, {tokens:,} tokens", ("one-gpu", "uniform")),
            ("one {doc:,}-token document", ("one-gpu-65k", "fixed")),
            ("one {doc:,}-token document, `--cp 2`", ("cp2", "fixed")),
            ("long-tailed mix up to {doc:,} tokens, `--cp 2`", ("cp2", "lognormal"))]
    lines = ["| one step | GPUs | step ms | TFLOP/s per GPU | vs one GPU at the study's 32K tokens | vs one GPU, "
             "same document | peak GiB per GPU |", "|---|---|---|---|---|---|---|"]
    for label, key in rows:
        r = runs[key]
        same = "-" if r["tflops_vs_same_document"] is None else \
            f"{100 * r['tflops_vs_same_document']:.1f}% ({r['speedup_vs_same_document']:.2f}x faster)"
        name = label.format(tokens=r["tokens_per_rank_budget"] * r["world_size"] // r["cp"], doc=r["max_doc_tokens"])
        lines.append(f"| {name} | {r['world_size']} | {r['step_ms_mean']:.1f} | {r['tflops_per_gpu']:.1f} | "
                     f"{100 * r['tflops_vs_one_gpu']:.1f}% | {same} | {r['peak_mem_gib']:.1f} |")
    return "\n".join(lines)


def te_table() -> str:
    """The TransformerEngine peer, eager and profiled, beside padding and varlen's packed FA2 (one run)."""
    cases = {(c["strategy"], c["mode"]): c for c in _load("h100-2026-11-27-session9/te/te-eager/results.json")["cases"]}
    rows = [("padded to 1024, SDPA + mask", "padded"), ("**TransformerEngine, packed THD (`packed-te`)**", "packed-te"),
            ("varlen, packed, torch's FA2", "packed-flash")]
    lines = ["| eager study step (ms) | eval | train | train: attention | train: host gaps |", "|---|---|---|---|---|"]
    for label, strategy in rows:
        ev, tr = cases[(strategy, "eval")], cases[(strategy, "train")]
        ms = tr["profile"]["ms"]
        lines.append(f"| {label} | {ev['step_ms_mean']:.1f} | {tr['step_ms_mean']:.1f} | {ms['attention']:.1f} | "
                     f"{ms['host/data gap']:.1f} |")
    return "\n".join(lines)


TABLES = {"te": te_table, "scaling": scaling_table, "cp": cp_table, "profile": profile_table, "gpt2": gpt2_table, "length": length_table, "finetune": finetune_table, "study": study_table, "headline": headline_table, "levers": levers_table,
          "lognormal": lognormal_table}
PAGES = ["README.md", "docs"]
# the block's body may be empty (a new table's markers, side by side)
BLOCK = re.compile(r"(<!-- table:(\w[\w-]*) -->\n)(?:(.*?)\n)??(<!-- /table -->)", re.S)


def pages() -> list[Path]:
    out = []
    for p in PAGES:
        path = ROOT / p
        out += sorted(path.rglob("*.md")) if path.is_dir() else [path]
    return out


def render(text: str) -> str:
    def fill(m: re.Match) -> str:
        if m.group(2) not in TABLES:
            raise SystemExit(f"unknown table {m.group(2)!r}; tables: {', '.join(TABLES)}")
        return m.group(1) + TABLES[m.group(2)]() + "\n" + m.group(4)

    return BLOCK.sub(fill, text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its results")
    args = p.parse_args()
    stale = []
    for page in pages():
        text = page.read_text()
        new = render(text)
        if new != text:
            stale.append(str(page.relative_to(ROOT)))
            if not args.check:
                page.write_text(new)
    if stale:
        print(("stale tables in " if args.check else "rewrote tables in ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
