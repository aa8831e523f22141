"""Pages the docs site generates at build time (mkdocs-gen-files), so that none is written by hand:
the command-line reference from the argument parsers, and the results index with each committed
result set's NOTES.md and figures."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def help_text(module: str) -> str:
    """What ``varlen COMMAND --help`` prints, from the command's own parser."""
    import importlib

    os.environ["COLUMNS"] = "100"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        importlib.import_module(module).parse_args(["--help"])
    return out.getvalue()


def cli_page() -> str:
    lines = ["# Command-line reference", "",
             "Generated from the argument parsers when the docs are built (`varlen COMMAND --help` prints the same).", ""]
    for command, module in (("bench", "varlen.bench.cli"), ("train", "varlen.train.cli"), ("check", "varlen.check_cli")):
        lines += [f"## varlen {command}", "", "```text", help_text(module).rstrip(), "```", ""]
    lines += ["## varlen info", "", "Prints versions, the GPU and every backend's status; takes no options.", ""]
    return "\n".join(lines)


def notes_page(folder: Path) -> str:
    """A result set's NOTES.md with links that leave the docs (to other files of the folder) named instead."""
    text = (folder / "NOTES.md").read_text()

    def link(m: re.Match) -> str:
        label, target = m.group(1), m.group(2)
        if target.startswith(("http://", "https://", "#")) or target.endswith((".md", ".png")):
            return m.group(0)
        other = target.rstrip("/").removeprefix("../")
        if (RESULTS / other / "NOTES.md").exists():  # another result set
            return f"[{label}](../{other}/NOTES.md)"
        return f"{label} (`benchmarks/results/{folder.name}/{target}`)"

    return re.sub(r"(?<!!)\[([^\]]*)\]\(([^)]+)\)", link, text)


def _date(folder: Path) -> tuple[str, str]:
    found = re.search(r"\d{4}-\d{2}-\d{2}", folder.name)
    return (found.group(0) if found else "", folder.name)


def results_pages() -> str:
    index = ["# Results", "",
             "Every result set committed under `benchmarks/results/`, newest first: device, versions, date and the "
             "command are in each one's NOTES; its `results.json` and logs sit beside it in the repository.", "",
             "| result set | what |", "|---|---|"]
    for folder in sorted((p for p in RESULTS.iterdir() if (p / "NOTES.md").exists()), key=_date, reverse=True):
        with mkdocs_gen_files.open(f"results/{folder.name}/NOTES.md", "w") as f:
            f.write(notes_page(folder))
        for png in folder.rglob("*.png"):
            with mkdocs_gen_files.open(f"results/{png.relative_to(RESULTS).as_posix()}", "wb") as f:
                f.write(png.read_bytes())
        title = (folder / "NOTES.md").read_text().splitlines()[0].lstrip("# ").replace("|", "\\|")
        index.append(f"| [{folder.name}]({folder.name}/NOTES.md) | {title} |")
    return "\n".join(index) + "\n"


with mkdocs_gen_files.open("reference/cli.md", "w") as f:
    f.write(cli_page())
with mkdocs_gen_files.open("results/index.md", "w") as f:
    f.write(results_pages())
