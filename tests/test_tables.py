"""Every published table equals what `benchmarks/tables.py` makes of its committed results.json."""

import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "benchmarks" / "tables.py"


def test_published_tables_are_generated_from_their_results():
    run = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr + " (run python benchmarks/tables.py)"


def test_every_table_is_placed_and_a_changed_number_is_caught(tmp_path):
    tables = runpy.run_path(str(SCRIPT))
    placed = {name for page in tables["pages"]() for _, name, _, _ in tables["BLOCK"].findall(page.read_text())}
    assert placed == set(tables["TABLES"])
    page = "<!-- table:finetune -->\n| how | tokens/s |\n|---|---|\n| typed by hand | 99,999 |\n<!-- /table -->"
    rendered = tables["render"](page)
    assert "99,999" not in rendered and "52,339" in rendered
    assert tables["render"](rendered) == rendered
