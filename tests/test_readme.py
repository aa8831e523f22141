"""The Python snippets of the README and of docs/ run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [(page.name, code) for page in PAGES for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]


def test_readme_has_snippets():
    assert sum(name == "README.md" for name, _ in SNIPPETS) >= 2


@pytest.mark.parametrize("page,code", SNIPPETS, ids=[f"{name}-{i}" for i, (name, _) in enumerate(SNIPPETS)])
def test_snippet_runs(page, code):
    if "transformers" in code:
        pytest.importorskip("transformers")
    exec(compile(code, page, "exec"), {"__name__": "readme"})
