"""`pip install .` builds a wheel that works outside the source tree: every subpackage and `py.typed`
are in it, and the installed package imports, runs packed attention and its command line from
another folder (not this checkout)."""

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(out), str(ROOT)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("varlen-*.whl")
    return wheel


def test_wheel_holds_every_module_and_runs_outside_the_source_tree(tmp_path):
    wheel = _build_wheel(tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "varlen").rglob("*.py")}
    assert source <= names, sorted(source - names)
    assert "varlen/py.typed" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)

    # a fresh environment that sees torch and transformers from this one, and varlen only from the wheel
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # (pip would take src/ as installed)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, env=env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = """
import torch, varlen
from varlen import SeqInfo, attention
print(varlen.__file__)
torch.manual_seed(0)
info = SeqInfo.from_lengths([3, 1, 5])
q, k, v = (torch.randn(9, 2, 8, dtype=torch.float64) for _ in range(3))
out = attention(q, k, v, info, causal=True, backend="sdpa")
ref = attention(q, k, v, info, causal=True, backend="reference")
print(float((out - ref).abs().max()))
"""
    run = subprocess.run([python, "-c", script], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    where, err = run.stdout.split()
    assert Path(where).is_relative_to(env_dir) and not Path(where).is_relative_to(ROOT), where
    assert float(err) < 1e-12
    version = subprocess.run([env_dir / "bin" / "varlen", "--version"], cwd=work, env=env, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == "varlen 0.1.0", version.stderr
    info = subprocess.run([env_dir / "bin" / "varlen", "info"], cwd=work, env=env, capture_output=True, text=True)
    assert info.returncode == 0 and "reference" in info.stdout, info.stderr
