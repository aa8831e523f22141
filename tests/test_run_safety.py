"""Nothing lost, nothing executed, nothing hung: verified pickle-free checkpoints, one run per
folder, non-finite values stopped before they are saved, a stopped rank ends the job, and
one-line errors where a traceback used to be."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from varlen.train import checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
BASE = ["--preset", "tiny", "--device", "cpu", "--max-tokens", "1024", "--seed", "1", "--lr", "0.05",
        "--optimizer", "adamw", "--no-progress"]


def _train(args, capsys) -> tuple[int, str, str]:
    from varlen.train.cli import main

    try:
        code = main([*BASE, *map(str, args)])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.strip() and not x.startswith(("usage", " "))]


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _reference(tmp_path, capsys, steps: int) -> list[float]:
    """Losses of an uninterrupted run of ``steps`` steps."""
    out = tmp_path / "reference"
    assert _train(["--steps", steps, "--out", out], capsys)[0] == 0
    return [r["loss"] for r in _log(out)]


def _reseal(ckpt: Path) -> None:
    """Rewrite a checkpoint's manifest to vouch for its files as they are now (what an attacker
    who edits a checkpoint can do): the manifest then no longer protects, the loader must."""
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps({"step": checkpoint.step_of(ckpt),
                                                        "files": checkpoint.manifest(ckpt)}))


class _Payload:
    """Unpickled, it creates the marker file: the test fails if that file ever exists."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------ nothing loaded from disk runs code
def test_malicious_dcp_metadata_does_not_run(tmp_path, capsys):
    out, marker = tmp_path / "o", tmp_path / "EXECUTED"
    assert _train(["--steps", 2, "--save-every", 2, "--out", out], capsys)[0] == 0
    ckpt = checkpoint.latest(out / "checkpoint")
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _reseal(ckpt)  # the manifest vouches for the payload: the unpickler alone must refuse it
    code, _, err = _train(["--steps", 3, "--resume", "--out", out], capsys)
    assert not marker.exists(), "a pickle in the checkpoint ran code"
    assert code == 2 and len(_lines(err)) == 1, err
    assert "cannot be loaded" in err and "posix.system is not part of a checkpoint's metadata" in err, err


def test_malicious_rank_file_is_one_line_and_does_not_run(tmp_path, capsys):
    out, marker = tmp_path / "o", tmp_path / "EXECUTED"
    assert _train(["--steps", 2, "--save-every", 2, "--out", out], capsys)[0] == 0
    ckpt = checkpoint.latest(out / "checkpoint")
    buf = io.BytesIO()
    torch.save({"step": 2, "x": _Payload(marker)}, buf)
    (ckpt / "rank0.pt").write_bytes(buf.getvalue())
    _reseal(ckpt)
    code, _, err = _train(["--steps", 3, "--resume", "--out", out], capsys)
    assert not marker.exists()
    assert code == 2 and len(_lines(err)) == 1, err
    assert "cannot be loaded (UnpicklingError" in err, err


def test_non_tensor_values_in_dcp_files_load_without_pickle(tmp_path):
    # DCP's own planner loads an optimizer's non-tensor values with weights_only=False
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    marker = tmp_path / "EXECUTED"
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="optim.param_groups.0.lr"))
    planner = checkpoint.SafeLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(item, io.BytesIO(buf.getvalue()))
    assert not marker.exists()
    unsafe = DefaultLoadPlanner(flatten_state_dict=False)  # the hole this closes, shown
    unsafe.state_dict = {}
    unsafe.load_bytes(item, io.BytesIO(buf.getvalue()))
    assert marker.exists()
    planner.load_bytes(item, io.BytesIO(_saved({"lr": 0.1, "betas": (0.9, 0.95), "params": ["a", "b"]})))
    assert planner.state_dict[item.dest_index.fqn] == {"lr": 0.1, "betas": (0.9, 0.95), "params": ["a", "b"]}


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ------------------------------------------------------------------ a damaged checkpoint: named, the one before used
def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


DAMAGE = {
    "flipped distcp": (lambda c: _flip(c / "state" / "__0_0.distcp"), "state/__0_0.distcp: its SHA-256 differs"),
    "truncated distcp": (lambda c: os.truncate(c / "state" / "__0_0.distcp", 100), "state/__0_0.distcp: 100 bytes"),
    "missing metadata": (lambda c: (c / "state" / ".metadata").unlink(), "state/.metadata: missing"),
    "missing run.json": (lambda c: (c / "run.json").unlink(), "run.json: missing"),
    "truncated rank0.pt": (lambda c: os.truncate(c / "rank0.pt", 10), "rank0.pt: 10 bytes"),
    "extra file": (lambda c: (c / "state" / "__9_0.distcp").write_bytes(b"x"), "state/__9_0.distcp: not in the"),
    "manifest cut": (lambda c: os.truncate(c / "done.json", 5), "done.json: no readable manifest"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_one_before_used(tmp_path, capsys, damage):
    want = _reference(tmp_path, capsys, 6)
    out = tmp_path / "o"
    assert _train(["--steps", 4, "--save-every", 2, "--out", out], capsys)[0] == 0
    spoil, message = DAMAGE[damage]
    spoil(checkpoint.folder(out / "checkpoint", 4))
    code, printed, err = _train(["--steps", 6, "--save-every", 2, "--resume", "--out", out], capsys)
    assert code == 0, err
    said = [x for x in printed.splitlines() if "fails its check" in x]
    assert len(said) == 1 and message in said[0] and "step-00000004" in said[0], printed
    assert "resuming from" in printed and "step-00000002 (step 2)" in printed
    assert (out / "checkpoint" / "step-00000004.failed-check").is_dir()
    assert [r["step"] for r in _log(out)] == list(range(1, 7))
    assert [r["loss"] for r in _log(out)] == pytest.approx(want, abs=1e-6)  # steps 3-4 retrained alike
    assert checkpoint.latest(out / "checkpoint") == checkpoint.folder(out / "checkpoint", 6)


def test_every_checkpoint_damaged_is_one_line(tmp_path, capsys):
    out = tmp_path / "o"
    assert _train(["--steps", 4, "--save-every", 2, "--out", out], capsys)[0] == 0
    for ckpt in checkpoint.complete(out / "checkpoint"):
        _flip(ckpt / "state" / "__0_0.distcp")
    code, _, err = _train(["--steps", 6, "--resume", "--out", out], capsys)
    assert code == 2 and len(_lines(err)) == 1, err
    assert "no checkpoint in" in err and "passes its check" in err and "--overwrite" in err


def test_a_save_that_fails_is_one_line_leaves_no_tmp_and_keeps_the_last(tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "o"

    def disk_full(point):
        if point == "after state" and checkpoint_steps():
            raise OSError(errno.ENOSPC, "No space left on device")

    def checkpoint_steps():
        return any(p.name.startswith("step-00000004") for p in (out / "checkpoint").iterdir())

    monkeypatch.setattr(checkpoint, "_fault", disk_full)
    code, _, err = _train(["--steps", 6, "--save-every", 2, "--out", out], capsys)
    assert code == 1 and len(_lines(err)) == 1, err
    assert "saving the checkpoint of step 4 failed (OSError: [Errno 28] No space left on device)" in err, err
    assert "step-00000002" in err
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["latest", "step-00000002"]


# ------------------------------------------------------------------ non-finite values never reach a checkpoint
@pytest.mark.parametrize("numbers", [["--lr", "nan"], ["--lr", "inf"], ["--lr", "1e39"], ["--max-grad-norm", "nan"]])
def test_non_finite_and_overflowing_numbers_are_refused(capsys, numbers):
    code, _, err = _train(numbers, capsys)
    assert code == 2 and f"argument {numbers[0]}" in err and len(_lines(err)) == 1, err
    assert "not finite" in err or "overflows float32" in err


def _poison(monkeypatch, what: str, at: int) -> None:
    """Make the loss, the gradients or the updated weights non-finite at step ``at``."""
    from varlen.models import family
    from varlen.train import cli

    real = family("decoder")
    calls = {"n": 0}

    def logits(model, batch, causal=True):
        calls["n"] += 1
        out = real.logits(model, batch, causal=causal)
        if calls["n"] == at and what == "loss":
            return out * float("nan")
        if calls["n"] == at and what == "grad":
            return out + (out * 0).detach() + _inf_grad(out)
        return out

    monkeypatch.setattr(cli, "family", lambda name: SimpleNamespace(build=real.build, logits=logits))
    if what == "weights":
        real_step = torch.optim.AdamW.step

        def step(self, *a, **kw):
            result = real_step(self, *a, **kw)
            calls.setdefault("updates", 0)
            calls["updates"] += 1
            if calls["updates"] == at:
                with torch.no_grad():
                    next(iter(self.param_groups[0]["params"])).fill_(float("inf"))
            return result

        monkeypatch.setattr(torch.optim.AdamW, "step", step)


def _inf_grad(x):
    """Zero forward, an infinite gradient backward."""
    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return torch.zeros_like(t)

        @staticmethod
        def backward(ctx, g):
            return torch.full_like(g, float("inf"))

    return F.apply(x)


@pytest.mark.parametrize("what, message", [
    ("loss", "the loss is nan at step 3"),
    ("grad", "the gradient norm is (inf|nan) at step 3"),
    ("weights", "the weights are not finite after step 3's update"),
])
def test_non_finite_step_stops_the_run_and_the_step_before_stays_latest(tmp_path, capsys, monkeypatch, what, message):
    out = tmp_path / "o"
    _poison(monkeypatch, what, at=3)
    code, _, err = _train(["--steps", 6, "--save-every", 1, "--out", out], capsys)
    assert code == 1 and len(_lines(err)) == 1 and re.search(message, err), err
    assert checkpoint.latest(out / "checkpoint") == checkpoint.folder(out / "checkpoint", 2)
    steps = [r["step"] for r in _log(out)]
    assert steps == ([1, 2, 3] if what == "weights" else [1, 2])  # the weights' step ran, unsaved
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in _log(out))


@pytest.mark.parametrize("what, message", [
    ("loss", "the loss is nan at step 3"),
    ("grad", "the gradient norm is (inf|nan) at step 3"),
    ("weights", "the weights are not finite after step 3's update"),
])
def test_read_every_n_steps_a_non_finite_step_is_skipped_on_the_device_and_stops_the_run(
        tmp_path, capsys, monkeypatch, what, message):
    # steps 3 and 4 run before anything is read: step 3 (or 4, after step 3's bad weights) is
    # non-finite, so its update and step 4's are skipped; the read at step 4 names the first
    out = tmp_path / "o"
    _poison(monkeypatch, what, at=3)
    code, _, err = _train(["--steps", 8, "--log-every", 4, "--save-every", 2, "--out", out], capsys)
    assert code == 1 and len(_lines(err)) == 1 and re.search(message, err), err
    assert checkpoint.latest(out / "checkpoint") == checkpoint.folder(out / "checkpoint", 2)
    assert [r["step"] for r in _log(out)] == ([1, 2, 3] if what == "weights" else [1, 2])


def test_deferred_guard_leaves_the_weights_of_the_step_before_the_first_non_finite_one():
    from varlen.train.guard import FiniteGuard
    from varlen.engine.step import StepStats

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    guard = FiniteGuard([p], defer=True)
    after_first = None
    for step, value in enumerate([1.0, float("nan"), 1.0, 2.0], start=1):  # only step 2 is non-finite
        p.grad = torch.full_like(p, value)
        stats = StepStats(torch.tensor(value), torch.tensor(5), 5, grad_norm=p.grad.norm())
        guard.before_update(stats, step, opt)
        opt.step()
        guard.after_update(step)
        after_first = p.detach().clone() if step == 1 else after_first
    values, problem = guard.read()
    assert values == [pytest.approx((1.0, 5 ** 0.5))]  # step 1's, then the first non-finite step
    assert "the loss is nan at step 2" in str(problem) and "after step 1" in str(problem)
    assert torch.equal(p.detach(), after_first)  # steps 2, 3 and 4 were skipped, 3 and 4 finite as they were
    assert int(opt.state[p]["step"]) == 1


def test_reading_every_n_steps_logs_the_same_steps_and_losses_as_every_step(tmp_path, capsys):
    every, fourth = tmp_path / "every", tmp_path / "fourth"
    assert _train(["--steps", 7, "--out", every], capsys)[0] == 0
    assert _train(["--steps", 7, "--log-every", 4, "--out", fourth], capsys)[0] == 0
    a, b = _log(every), _log(fourth)
    assert [r["step"] for r in b] == list(range(1, 8))
    for x, y in zip(a, b):
        assert (x["tokens"], x["targets"], x["lr"]) == (y["tokens"], y["targets"], y["lr"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    # one clock for the unread steps: the steps of a window share its mean time (warm-up kept apart)
    assert b[2]["step_ms"] == b[3]["step_ms"] and b[4]["step_ms"] == b[5]["step_ms"]


def test_read_every_n_steps_is_refused_with_fsdp2_in_one_line(capsys):
    code, _, err = _train(["--steps", 1, "--log-every", 4, "--parallel", "fsdp2"], capsys)
    assert code != 0 and "--log-every" in err and len(_lines(err)) == 1, err


def test_grad_norm_is_logged_and_clipping_changes_the_update(tmp_path, capsys):
    plain, clipped = tmp_path / "plain", tmp_path / "clipped"
    assert _train(["--steps", 3, "--out", plain], capsys)[0] == 0
    assert _train(["--steps", 3, "--max-grad-norm", "1e-3", "--out", clipped], capsys)[0] == 0
    a, b = _log(plain), _log(clipped)
    assert a[0]["loss"] == b[0]["loss"] and a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"])
    assert a[0]["grad_norm"] > 1e-3  # so the clipped run did clip, and its next loss differs
    assert a[1]["loss"] != b[1]["loss"]


# ------------------------------------------------------------------ one run per --out, nothing overwritten unasked
def test_two_runs_on_one_out_the_second_refuses_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from varlen.train.lock import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
                               "print('held', flush=True); time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = _train(["--steps", 1, "--out", out], capsys)
        assert code == 2 and len(_lines(err)) == 1, err
        assert f"is in use by another run (PID {holder.pid} on host" in err
        assert not (out / "train_log.jsonl").exists()
    finally:
        holder.kill()  # like kill -9: no release, the lock file keeps its text
        holder.wait()
    code, printed, err = _train(["--steps", 1, "--out", out], capsys)
    assert code == 0, err
    assert f"taking over {out / '.lock'}, left by PID {holder.pid}" in printed and "no longer running" in printed
    assert (out / ".lock").read_text() == ""  # released at the end


def test_a_fresh_run_does_not_clear_an_earlier_log(tmp_path, capsys):
    out = tmp_path / "o"
    assert _train(["--steps", 2, "--out", out], capsys)[0] == 0  # no checkpoint, a log
    before = (out / "train_log.jsonl").read_text()
    code, _, err = _train(["--steps", 2, "--seed", 7, "--out", out], capsys)
    assert code == 2 and len(_lines(err)) == 1 and "holds an earlier run's train_log.jsonl" in err, err
    assert (out / "train_log.jsonl").read_text() == before
    assert _train(["--steps", 1, "--seed", 7, "--overwrite", "--out", out], capsys)[0] == 0
    assert [r["step"] for r in _log(out)] == [1]


@pytest.mark.parametrize("steps, code", [(2, 2), (4, 0)])
def test_resume_at_or_past_steps_says_so_and_changes_nothing(tmp_path, capsys, steps, code):
    out = tmp_path / "o"
    assert _train(["--steps", 4, "--save-every", 2, "--out", out], capsys)[0] == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    got, printed, err = _train(["--steps", steps, "--save-every", 2, "--resume", "--out", out], capsys)
    assert got == code
    said = err if code else printed
    assert "at step 4" in said and ("past --steps 2" in said if code else "nothing to do" in said), (printed, err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == files


def _rewrite_run_json(folder: Path, edit) -> None:
    """Edit a checkpoint's run.json and re-vouch for it in the manifest, as another version would have written it."""
    config = json.loads((folder / "run.json").read_text())
    edit(config)
    (folder / "run.json").write_text(json.dumps(config))
    listed = json.loads((folder / checkpoint.MANIFEST).read_text())
    listed["files"] = checkpoint.manifest(folder)
    (folder / checkpoint.MANIFEST).write_text(json.dumps(listed))


def _older(schema):
    """A run.json as an older varlen wrote it: no "settings" before schema 2, no "schema" before 1."""
    def edit(c):
        c.pop("settings")
        c.pop("schema") if schema == 0 else c.update(schema=schema)
    return edit


@pytest.mark.parametrize("schema, code", [(0, 0), (1, 0), (99, 2), ("one", 2)])
def test_run_json_carries_a_schema_an_old_one_resumes_a_later_one_is_refused(tmp_path, capsys, schema, code):
    out = tmp_path / "o"
    assert _train(["--steps", 2, "--save-every", 2, "--lr", "0.002", "--out", out], capsys)[0] == 0
    folder = checkpoint.latest(out / "checkpoint")
    assert json.loads((folder / "run.json").read_text())["schema"] == checkpoint.RUN_SCHEMA == 2
    settings = checkpoint.settings_of(folder)  # the whole configuration, group by group
    assert settings["optim"]["lr"] == 0.002 and settings["step"]["steps"] == 2 and settings["run"]["out"] == str(out)
    assert "settings" not in checkpoint.config_of(folder) and checkpoint.config_of(folder)["lr"] == 0.002
    _rewrite_run_json(folder, _older(schema) if schema in (0, 1) else lambda c: c.update(schema=schema))
    got, _, err = _train(["--steps", 3, "--save-every", 2, "--lr", "0.002", "--resume", "--out", out], capsys)
    assert got == code, err
    if code:
        assert len(_lines(err)) == 1 and f"schema {schema!r}" in err and "run.json" in err, err
    else:
        assert [r["step"] for r in _log(out)] == [1, 2, 3]


# ------------------------------------------------------------------ a stopped rank ends the job
def test_a_stopped_rank_ends_the_job_with_one_line_naming_it(tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "varlen.train",
           *BASE, "--steps", "100000", "--stall-timeout", "20", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "train_log.jsonl").exists() and len((out / "train_log.jsonl").read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        ranks = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True)
        pids = sorted(int(p) for p in ranks.stdout.split())
        assert len(pids) == 2, ranks.stdout
        rank1 = next(p for p in pids if _environ(p).get("RANK") == "1")
        os.kill(rank1, signal.SIGSTOP)
        _, err = proc.communicate(timeout=240)  # the watchdog's 20 s, then torchrun's shutdown
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    said = [x for x in err.splitlines() if "varlen train: error:" in x]
    assert len(said) == 1, err[-3000:]
    assert re.search(r"no step for \d+ s after step \d+: rank 1 \((last heard at step \d+|never heard from)\) "
                     r"stopped answering", said[0]), said


def _environ(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/environ").read_text(errors="replace")
    return dict(x.split("=", 1) for x in text.split("\0") if "=" in x)


# ------------------------------------------------------------------ one line where a traceback used to be
@pytest.mark.parametrize("args, message", [
    (["--backend", "nonsense"], "argument --backend: unknown attention backend 'nonsense'"),
    (["--backend", "flash:nope"], "argument --backend: unknown flash implementation 'nope'"),
])
def test_bad_backend_is_refused_at_parse_time(capsys, args, message):
    code, _, err = _train(args, capsys)
    assert code == 2 and message in err and len(_lines(err)) == 1, err


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    code, _, err = _train(["--out", f], capsys)
    assert code == 2 and f"--out {f} is a file; --out names a folder" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line(capsys):
    code, _, err = _train(["--device", "cuda"], capsys)
    assert code == 2 and "varlen train: error: --device cuda: no CUDA device here" in err


@pytest.mark.parametrize("content, message", [
    (b"", "e.jsonl: no sample left: 0 rows"),
    (b"[1, 2, 3]\n[4, \xff 5]\n", "e.jsonl:2: not UTF-8 (byte 0xff at column 5)"),
])
def test_empty_and_non_utf8_data_name_the_file_and_line(tmp_path, capsys, content, message):
    data = tmp_path / "e.jsonl"
    data.write_bytes(content)
    code, _, err = _train(["--data", data], capsys)
    assert code == 2 and message in err and len(_lines(err)) == 1, err


@pytest.fixture(scope="module")
def saved_datasets(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    one = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8})
    one.save_to_disk(str(root / "one"))
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize("spec, message", [
    ("one:validation", "is one split saved alone (a Dataset, not a DatasetDict), so ':validation' names nothing"),
    ("empty", "empty: a folder that is no saved dataset"),
    ("missing", "missing: no saved dataset folder here"),
])
def test_hf_data_that_cannot_be_what_was_asked_is_one_line(saved_datasets, capsys, spec, message):
    code, _, err = _train(["--data", f"hf:{saved_datasets / spec}"], capsys)
    assert code == 2 and message in err and len(_lines(err)) == 1, err


def test_bench_unknown_strategy_is_a_usage_error(capsys):
    from varlen.bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--strategies", "nonsense"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "varlen bench: error: --strategies" in err and "not nonsense" in err


@pytest.mark.parametrize("args, message", [
    (["--preset", "tiny", "--backend", "nonsense"], "argument --backend: unknown attention backend 'nonsense'"),
    (["--hf-config", "T5", "--random-init"], "a T5Config ('t5') is not a causal LM that transformers registers"),
])
def test_check_refuses_in_one_line(tmp_path, capsys, args, message):
    pytest.importorskip("transformers")
    import transformers

    from varlen.check_cli import main

    if "T5" in args:
        transformers.T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=16, vocab_size=50).save_pretrained(tmp_path)
        args = [a if a != "T5" else str(tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        main([*args, "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(_lines(err)) == 1, err


def test_a_step_too_large_for_memory_is_one_line(capsys):
    # the whole synthetic epoch (100,000 samples) as one step: the sdpa path's own estimate refuses it
    code, _, err = _train(["--max-tokens", "1000000000000", "--steps", "1"], capsys)
    assert code == 1 and len(_lines(err)) == 1, err
    assert "out of memory in step 1 (sdpa: 100000 sequences" in err and "lower --max-tokens" in err


def test_one_dtype_spelling_across_commands():
    # the short names everywhere (as run.json records them); torch's long names are taken and mapped
    import argparse

    from varlen.argtypes import dtype_name

    parse = dtype_name("bf16", "fp32")
    assert [parse(x) for x in ("bf16", "bfloat16", "fp32", "float32")] == ["bf16", "bf16", "fp32", "fp32"]
    with pytest.raises(argparse.ArgumentTypeError, match="'fp16' is not one of bf16, fp32"):
        parse("fp16")


def test_held_out_rows_are_planned_once_and_each_evaluation_is_the_same_exact_loss(tmp_path, capsys, monkeypatch):
    # the evaluator plans its rows when it is made: evaluating every step re-plans nothing, and the
    # held-out loss is the exact token-weighted mean over the same targets every time
    from varlen.data import TokenBudgetSampler
    from varlen.train import evaluate

    made = []

    class Counting(TokenBudgetSampler):
        def __init__(self, *a, **k):
            made.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(evaluate, "TokenBudgetSampler", Counting)
    out = tmp_path / "o"
    code, _, err = _train(["--steps", 3, "--eval-split", "0.2", "--eval-every", 1, "--num-samples", 200,
                           "--out", out], capsys)
    assert code == 0, err
    evals = [r for r in _log(out) if "eval_loss" in r]
    assert len(evals) == 3 and len(made) == 1
    assert len({r["eval_targets"] for r in evals}) == 1 and evals[0]["eval_targets"] > 0
