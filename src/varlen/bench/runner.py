"""Run each case in its own process with a time limit; a failure becomes that case's result."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from ..models import family
from .cases import Case, Result


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)(: |$)")


def _reason(stderr: str, returncode: int) -> str:
    """The exception line of a traceback (or the last line), kept short."""
    lines = [l.strip() for l in stderr.strip().splitlines() if l.strip()]
    # a C++ exception that aborts the process says what it was on its "what():" line; the stack
    # frames after it (c10::Error::Error(...)) also contain "Error"
    what = [l.split("what():", 1)[1].strip() for l in lines if "what():" in l]
    # "SomeError: ..." lines, not compiler output that merely mentions an error header file
    errors = [l for l in lines if EXCEPTION_LINE.match(l)]
    line = what[-1] if what else errors[-1] if errors else (lines[-1] if lines else "")
    if returncode < 0:
        line = f"killed by signal {-returncode}" + (f" ({line})" if line else "")
    return (line or f"exit code {returncode}")[:400]


def precheck(case: Case) -> str | None:
    """Why this machine cannot run the case at all, known without starting a process: its
    backend (or the peer's own package) is absent, the peer runs eager only, or (on the CPU, where
    nothing touches a GPU) the backend cannot do what the mode needs (Flex has no backward there;
    nested SDPA no causal mask)."""
    try:
        fam = family(case.spec.family)
        if case.compile and not fam.compiles:
            return f"{case.strategy} runs eager only (its modules are not traced by torch.compile)"
        why = fam.unavailable(case.backend)
    except ValueError as e:  # an unknown strategy or backend
        return str(e)
    if case.workload.levers.fp8 and case.spec.layout == "nested":
        return "--fp8: float8 GEMMs need a token count that is a multiple of 16, which a jagged batch does not keep"
    if case.workload.levers.mlp_kernel != "torch":
        from ..models.mlp import quack_unavailable

        if case.spec.layout == "nested":
            return "--mlp-kernel quack: its GEMMs run dense rows, not a jagged batch"
        why = why or quack_unavailable()
    if why or case.workload.device != "cpu":
        return why
    if case.workload.cuda_graphs and case.compile:
        return "--cuda-graphs needs a CUDA device"
    if case.compile and case.backend == "flex":
        return "compiled FlexAttention does not build on the CPU (Inductor's C++ code generation fails, torch 2.13)"
    if case.spec.layout in ("padded", "longest", "hf-padded"):
        return None
    import torch

    from ..attention.api import backend_reasons
    from ..models import DecoderConfig
    from ..seqinfo import SeqInfo

    cfg, train = DecoderConfig.from_name(case.workload.model), case.mode == "train"
    with torch.set_grad_enabled(train):
        q = torch.empty(1, cfg.n_heads, cfg.head_dim, requires_grad=train)
        causal = train or case.spec.causal_lm
        return "; ".join(backend_reasons(case.backend, q, q, q, SeqInfo.from_lengths([1]), causal, (-1, -1))) or None


def run_case_in_process(case: Case, timeout_s: float, workdir: Path) -> Result:
    why = precheck(case)
    if why:
        return Result.failed(case, why, wall_s=0.0, applicable=False)
    stem = case.name.replace("/", "_")
    case_path, out_path = workdir / f"{stem}.case.json", workdir / f"{stem}.result.json"
    case_path.write_text(json.dumps(case.to_dict()))
    out_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    # own session: on a timeout the DataLoader workers go down with the case
    proc = subprocess.Popen(
        [sys.executable, "-m", "varlen.bench.worker", str(case_path), str(out_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Result.failed(case, f"timed out after {timeout_s:.0f} s", wall_s=time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out_path.exists():
        return Result.failed(case, _reason(stderr, proc.returncode), wall_s=wall)
    result = Result(**json.loads(out_path.read_text()))
    result.wall_s = wall
    return result


def measure_peak(device: str, timeout_s: float = 300) -> float | None:
    """bf16 (GPU) or float32 (CPU) matmul TFLOP/s, in a process of its own."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "peak.json"
        try:
            subprocess.run([sys.executable, "-m", "varlen.bench.worker", "--peak", device, str(out)],
                           capture_output=True, timeout=timeout_s, check=True)
            return json.loads(out.read_text())["tflops"]
        except (subprocess.SubprocessError, OSError, KeyError, json.JSONDecodeError):
            return None


def run_all(cases: list[Case], timeout_s: float, workdir: Path, progress=None, jobs: int = 1) -> list[Result]:
    """Every case, ``jobs`` processes at a time (1 for timings that mean anything: concurrent
    cases share the GPU and the host); ``progress(i, case, result_or_None)`` is told before and
    after each."""
    def one(i: int) -> Result:
        if progress:
            progress(i, cases[i], None)
        result = run_case_in_process(cases[i], timeout_s, workdir)
        if progress:
            progress(i, cases[i], result)
        return result

    if jobs <= 1:
        return [one(i) for i in range(len(cases))]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, range(len(cases))))


def result_dicts(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]
