"""The package's shape, asserted: the floors import downwards only, nothing imports a command-line
module, no private name crosses a package, no import cycle (function-level imports included), and
library functions stay short enough to read at once."""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "varlen"
CLI_MODULES = {"varlen.cli", "varlen.check_cli", "varlen.bench.cli", "varlen.train.cli", "varlen.bench.scaling"}
MAX_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(imported module, names, line) for every import in the module, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # "from . import x" imports the module x
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            yield (target, names, node.lineno)
            for s in subs:
                yield (s, [], node.lineno)
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield (a.name, [], node.lineno)


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m, p) if t in MODULES and t != m} for m, p in MODULES.items()}


def _floors() -> list[tuple[str, list[str]]]:
    """docs/architecture.md's table of floors, bottom up: (floor, the modules and packages on it)."""
    table = (SRC.parent.parent / "docs" / "architecture.md").read_text().split("\n| floor |", 1)[1].split("\n\n")[0]
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
    return [(name.strip(), ["varlen." + m.strip("/").replace("/", ".") for m in re.findall(r"`([^`]+)`", mods)])
            for name, mods in rows]


def _floor_of(module: str, floors) -> int | None:
    if module.endswith("__main__"):  # ``python -m`` entry points: commands
        return len(floors) - 1
    placed = [(len(p), i) for i, (_, mods) in enumerate(floors) for p in mods
              if module == p or module.startswith(p + ".")]
    return max(placed)[1] if placed else None


def test_every_module_imports_its_floor_or_those_below_as_the_architecture_doc_draws():
    floors = _floors()
    assert [f for f, _ in floors][:2] == ["metadata", "kernels"] and floors[-1][0] == "commands", floors
    unplaced = [m for m in MODULES if m != "varlen" and _floor_of(m, floors) is None]
    assert not unplaced, f"modules on no floor of docs/architecture.md: {unplaced}"
    up = [f"{m} ({floors[_floor_of(m, floors)][0]}) imports {t} ({floors[_floor_of(t, floors)][0]})"
          for m, ts in _graph().items() if m != "varlen" for t in ts
          if t != "varlen" and _floor_of(t, floors) > _floor_of(m, floors)]
    assert not up, up


def test_train_and_bench_do_not_import_each_other():
    bad = [(m, t) for m, ts in _graph().items() for t in ts
           if (m.startswith("varlen.train") and t.startswith("varlen.bench"))
           or (m.startswith("varlen.bench") and t.startswith("varlen.train"))]
    assert not bad, bad


def test_nothing_imports_a_command_line_module():
    bad = [(m, t) for m, ts in _graph().items() for t in ts
           if t in CLI_MODULES and not m.endswith("__main__") and m != "varlen.cli"]
    assert not bad, bad


def test_no_private_name_crosses_a_package():
    bad = []
    for m, p in MODULES.items():
        top = m.split(".")[:2]
        for target, names, line in _imports(m, p):
            if target.startswith("varlen") and target.split(".")[:2] != top:
                bad += [f"{p.name}:{line} {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
        bad += [f"{p.name}:{n.lineno} .{n.attr}" for n in ast.walk(ast.parse(p.read_text()))
                if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                and isinstance(n.value, ast.Name) and n.value.id in ("info", "seqinfo")]
    assert not bad, bad


def test_models_reach_attention_through_its_public_names_only():
    bad = [(m, t) for m, ts in _graph().items() for t in ts
           if m.startswith("varlen.models") and t.startswith("varlen.attention.")]
    assert not bad, bad


# what building and stepping a model is made of: only the engine (and the floors below it) says these
ENGINE_NAMES = {"train_step", "wrap", "move_batch", "shard_batch", "mark_dynamic", "convert"}


def test_the_loops_build_and_step_through_the_engine():
    # varlen train, the bench's worker, the scaling sweep and the cost fit: one build, one step
    bad = []
    for m, p in MODULES.items():
        if not m.startswith(("varlen.train", "varlen.bench")):
            continue
        for n in ast.walk(ast.parse(p.read_text())):
            name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else None
            if name in ENGINE_NAMES:
                bad.append(f"{m}:{n.lineno} {name}")
    assert not bad, bad


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ re-exporting its modules is not a cycle of the modules themselves
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")}
             for m, ts in graph.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for t in edges[m]:
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    cycles = [c for c in cycles if not all(MODULES[x].name == "__init__.py" or x == c[0] for x in c)]
    assert not cycles, cycles


@pytest.mark.parametrize("name", sorted(MODULES))  # command-line modules too
def test_functions_are_short(name):
    tree = ast.parse(MODULES[name].read_text())
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_LINES]
    assert not long, long
