"""Nothing lost, nothing silent: crash-safe checkpoints, validated data and arguments, one-line errors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from varlen.models import Decoder
from varlen.train import checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TRAIN = [sys.executable, "-m", "varlen.train", "--preset", "tiny", "--device", "cpu", "--max-tokens", "2048",
         "--seed", "1", "--lr", "0.05", "--optimizer", "adamw", "--no-progress"]


def _log(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "train_log.jsonl").read_text().splitlines()]


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ faults at every write of a save
POINTS = ["before state", "after state", "after rank0", "after run.json", "after marker", "after publish",
          "after latest", "after prune"]


class Cut(Exception):
    pass


@pytest.mark.parametrize("point", POINTS)
def test_a_save_cut_short_at_any_point_leaves_a_whole_checkpoint(tmp_path, monkeypatch, point):
    torch.manual_seed(0)
    model = Decoder("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    root, config = tmp_path / "checkpoint", {"lr": 0.1}

    def advance():  # one optimizer step: weights and optimizer state change
        model(torch.randint(1, 100, (12,)), info=checkpoint_info()).sum().backward()
        opt.step()
        opt.zero_grad()

    weights = {}
    for step in (1, 2):
        advance()
        weights[step] = _params(model)
        checkpoint.save(root, model, opt, step=step, sampler_state={"batches_done": step}, rank=0, config=config,
                        keep=2)
    advance()
    weights[3] = _params(model)

    def cut(at):
        if at == point:
            raise Cut(at)

    monkeypatch.setattr(checkpoint, "_fault", cut)
    with pytest.raises(Cut):
        checkpoint.save(root, model, opt, step=3, sampler_state={"batches_done": 3}, rank=0, config=config, keep=2)
    published = POINTS.index(point) >= POINTS.index("after publish")
    found = checkpoint.latest(root)
    assert found == checkpoint.folder(root, 3 if published else 2)
    expect = 3 if published else 2
    assert [int(p.name[5:]) for p in checkpoint.complete(root)][-1] == expect
    for p in model.parameters():  # scramble, then load: the checkpoint alone restores the weights
        p.data.normal_()
    extra = checkpoint.load(found, model, opt, rank=0)
    assert extra["step"] == expect and extra["sampler"] == {"batches_done": expect}
    assert checkpoint.config_of(found) == config
    for got, want in zip(model.parameters(), weights[expect]):
        assert torch.equal(got, want)
    # the next save clears the cut one's leftovers and keeps the newest two
    monkeypatch.setattr(checkpoint, "_fault", lambda at: None)
    checkpoint.save(root, model, opt, step=4, sampler_state={}, rank=0, config=config, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", f"step-{expect:08d}", "step-00000004"]
    assert (root / "latest").read_text() == "step-00000004"


def checkpoint_info():
    from varlen import SeqInfo

    return SeqInfo.from_lengths([5, 7])


# ------------------------------------------------------------------ real kill -9, again and again
STEPS = int(os.environ.get("VARLEN_KILL_STEPS", "12"))


def _run_until(out: Path, ready, timeout=120) -> None:
    """Start a resumable run and kill -9 it once ``ready()`` holds (or it finishes)."""
    args = [*TRAIN, "--steps", str(STEPS), "--save-every", "1", "--keep", "2", "--out", str(out)]
    if (out / "checkpoint").exists():
        args.append("--resume")
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline and not ready():
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()[-2000:]


def _entries(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def test_kill_9_at_random_instants_of_saves_resumes_to_the_same_losses(tmp_path):
    subprocess.run([*TRAIN, "--steps", str(STEPS), "--out", str(tmp_path / "full")], check=True, env=ENV,
                   capture_output=True)
    want = [r["loss"] for r in _log(tmp_path / "full")]
    out, root, rng = tmp_path / "killed", tmp_path / "killed" / "checkpoint", random.Random(0)
    kills = 0
    for i in range(int(os.environ.get("VARLEN_KILLS", "10"))):  # CI: 10; a longer loop: VARLEN_KILLS=40
        before = _entries(root)
        delay = rng.uniform(0, 0.03)
        # kill as the checkpoint folder changes (a save starting, publishing or pruning), a little after
        changed = {"t": None}

        def ready():
            if changed["t"] is None and _entries(root) != before:
                changed["t"] = time.time()
            return changed["t"] is not None and time.time() - changed["t"] >= delay

        _run_until(out, ready)
        kills += 1
        log = _log(out) if (out / "train_log.jsonl").exists() else []
        if log and log[-1]["step"] == STEPS and (out / "summary.json").exists():
            break
    print(f"{kills} kills, the last at step {len(_log(out)) if (out / 'train_log.jsonl').exists() else 0}")
    assert kills >= 5, "the run finished before it was killed often enough; slow it or add steps"
    subprocess.run([*TRAIN, "--steps", str(STEPS), "--save-every", "1", "--resume", "--out", str(out)], check=True,
                   env=ENV, capture_output=True)
    got = _log(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_rank_killed_mid_save_resumes_to_the_same_losses(tmp_path, parallel):
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "varlen.train",
           *TRAIN[3:], "--steps", "6", "--parallel", parallel]
    subprocess.run([*run, "--out", str(tmp_path / "full")], check=True, env=ENV, capture_output=True, timeout=300)
    want = [r["loss"] for r in _log(tmp_path / "full")]
    out = tmp_path / "killed"
    root = out / "checkpoint"
    proc = subprocess.Popen([*run, "--save-every", "1", "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(n.endswith(".tmp") and n != "step-00000001.tmp"
                                                  for n in _entries(root)):
            time.sleep(0.002)
        # one rank dies inside a save; torchrun then stops the other
        ranks = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True)
        pids = [int(p) for p in ranks.stdout.split()]
        assert pids, "no rank process found"
        os.kill(pids[-1], signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert checkpoint.latest(root) is not None
    subprocess.run([*run, "--save-every", "1", "--resume", "--out", str(out)], check=True, env=ENV,
                   capture_output=True, timeout=300)
    got = _log(out)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [r["loss"] for r in got] == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------ a run knows its configuration
def _train(args, capsys) -> tuple[int, str]:
    from varlen.train.cli import main

    try:
        code = main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--max-tokens", "1024", "--no-progress",
                     *map(str, args)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, err


def test_resume_refuses_other_settings_and_out_refuses_an_earlier_run(tmp_path, capsys):
    out = tmp_path / "o"
    assert _train(["--save-every", "1", "--out", out], capsys)[0] == 0
    code, err = _train(["--out", out], capsys)  # no --resume: the earlier run is not reused silently
    assert code == 2 and "holds a checkpoint of an earlier run (step 2)" in err and "--overwrite" in err
    code, err = _train(["--resume", "--lr", "0.5", "--seed", "3", "--out", out], capsys)
    assert code == 2 and "lr: 0.001 in the checkpoint, 0.5 now" in err and "seed: 0 in the checkpoint, 3 now" in err
    assert "--allow-change lr,seed" in err
    lines = [x for x in err.splitlines() if x.strip() and "Warning" not in x and "warn" not in x]
    assert len(lines) == 1, err  # one line, no traceback
    code, err = _train(["--resume", "--lr", "0.5", "--seed", "3", "--allow-change", "lr", "--out", out], capsys)
    assert code == 2 and "seed: 0 in the checkpoint, 3 now" in err and "lr:" not in err
    code, _ = _train(["--resume", "--steps", "3", "--save-every", "1", "--lr", "0.5", "--allow-change", "lr",
                      "--out", out], capsys)
    assert code == 0 and [r["step"] for r in _log(out)] == [1, 2, 3]
    code, _ = _train(["--overwrite", "--steps", "1", "--out", out], capsys)
    assert code == 0 and [r["step"] for r in _log(out)] == [1] and checkpoint.latest(out / "checkpoint") is None


def test_changed_data_file_is_refused_on_resume(tmp_path, capsys):
    data, out = tmp_path / "d.jsonl", tmp_path / "o"
    data.write_text("".join(json.dumps(list(range(1, 30))) + "\n" for _ in range(20)))
    assert _train(["--data", data, "--save-every", "1", "--out", out], capsys)[0] == 0
    data.write_text("".join(json.dumps(list(range(2, 31))) + "\n" for _ in range(20)))
    code, err = _train(["--data", data, "--resume", "--steps", "3", "--out", out], capsys)
    assert code == 2 and "data_fingerprint: 'sha256:" in err


# ------------------------------------------------------------------ data validated with its location
@pytest.mark.parametrize("line, message", [
    ('[1, 2, 3.7]', r"d.jsonl:3: token 2 is 3.7, not an integer id"),
    ('["abc", 2]', r"d.jsonl:3: token 0 is 'abc', not an integer id; tokenize the text first"),
    ('[1, -4, 2]', r"d.jsonl:3: token 1 is -4, outside the model's vocabulary 0..1023"),
    ('[1, 1024]', r"d.jsonl:3: token 1 is 1024, outside the model's vocabulary 0..1023"),
    ('{"ids": [1, 2]}', r"d.jsonl:3: an object without 'input_ids', 'text' or 'messages' \(keys: ids\)"),
    ('[1, 2', r"d.jsonl:3: not JSON"),
    ('"text"', r"d.jsonl:3: expected a list of token ids, got str"),
    ("[" + ", ".join(["5"] * 300) + "]", r"d.jsonl:3: a sample of 299 tokens, longer than the longest a step takes "
                                         r"\(255\); pass --truncate or --drop-long"),
])
def test_bad_data_rows_are_one_line_naming_file_and_line(tmp_path, capsys, line, message):
    data = tmp_path / "d.jsonl"
    data.write_text("[1, 2, 3]\n" + '{"input_ids": [4, 5, 6]}\n' + line + "\n")
    code, err = _train(["--data", data, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert len([x for x in err.splitlines() if x.strip()]) == 1, err
    import re

    assert re.search(message, err), err


def test_long_and_empty_rows_are_counted(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [[1, 2, 3], [], [7], [5] * 300, [6] * 400] + [[2, 3, 4, 5]] * 10
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # and a blank line
    for flag, want in (("--truncate", {"rows": 16, "dropped_short": 3, "truncated": 2, "dropped_long": 0}),
                       ("--drop-long", {"rows": 16, "dropped_short": 3, "truncated": 0, "dropped_long": 2})):
        out = tmp_path / flag
        assert _train(["--data", data, flag, "--out", out], capsys)[0] == 0
        assert json.loads((out / "summary.json").read_text())["data_report"] == want


# ------------------------------------------------------------------ arguments validated at parse time
@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "argument --max-tokens: 0 is not a positive integer"),
    (["--steps", "-1"], "argument --steps: -1 is not a positive integer"),
    (["--lr", "0"], "argument --lr: 0 is not a number > 0"),
    (["--grad-accum", "x"], "argument --grad-accum: 'x' is not a positive integer"),
    (["--max-len", "400"], "--max-len 400: preset tiny takes samples of at most 255 tokens"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--resume"], "--resume and --save-every need --out"),
    (["--allow-change", "colour"], "--allow-change: unknown field(s) colour"),
    (["--data", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--max-tokens", "100"], "samples reach 255 tokens but a micro-step takes 100"),
    (["--device", "gpu"], "argument --device: 'gpu' is not cpu, cuda or cuda:N"),
    (["--device", "cpu:1"], "argument --device: 'cpu:1' is not cpu, cuda or cuda:N"),
])
def test_bad_arguments_are_one_line_with_exit_code_2(tmp_path, capsys, args, message):
    code, err = _train(args, capsys)
    assert code == 2 and message in err, err
    assert len([x for x in err.splitlines() if x.strip() and not x.startswith("usage") and not x.startswith(" ")]) == 1


def test_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _train(["--out", blocker / "sub"], capsys)
    assert code == 2 and f"--out {blocker / 'sub'} is not writable" in err


@pytest.mark.parametrize("args, message", [
    (["--max-len", "0"], "argument --max-len: 0 is not a positive integer"),
    (["--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
    (["--jobs", "0"], "argument --jobs: 0 is not a positive integer"),
    (["--max-tokens", "50"], "--max-tokens 50 is below the longest sample"),
    (["--tokens-per-batch", "50"], "--max-tokens 50 is below the longest sample"),  # its older spelling
    (["--device", "cuda:x"], "argument --device: 'cuda:x' is not cpu, cuda or cuda:N"),
])
def test_bench_refuses_bad_numbers(args, message, capsys):
    from varlen.bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "check", "bench"])
def test_a_gpu_this_machine_lacks_is_one_line(command, capsys, monkeypatch):
    import varlen.cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    extra = {"train": ["--preset", "tiny"], "check": ["--preset", "tiny"], "bench": ["--preset", "tiny"]}[command]
    with pytest.raises(SystemExit) as e:
        varlen.cli.main([command, "--device", "cuda:2", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1" in err, err


def test_torchrun_ranks_take_their_local_gpu_not_a_chosen_one():
    from varlen.parallel.distributed import gpu_of

    assert gpu_of("cuda", 4, 3) == torch.device("cuda", 3) and gpu_of("cuda:1", 1, 0) == torch.device("cuda", 1)
    assert gpu_of("cpu", 4, 2) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda:1 with 2 processes: each rank takes the GPU of its LOCAL_RANK"):
        gpu_of("cuda:1", 2, 0)


def test_unknown_command():
    proc = subprocess.run([sys.executable, "-m", "varlen", "foo"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2 and "varlen: unknown command 'foo'" in proc.stderr


# ------------------------------------------------------------------ memory bounded by the batch
def test_sdpa_pads_to_the_batch_not_to_the_bound():
    # --max-len 5000 with short samples: the collator's bound is 5000, the batch's longest 100
    from varlen import SeqInfo
    from varlen.attention import sdpa

    info = SeqInfo.from_lengths([100, 37, 5], max_seqlen=5000)
    assert sdpa.padded_length(info) == 128  # a power of two, not the bound
    assert sdpa.padded_length(SeqInfo.from_lengths([3, 1], max_seqlen=5000)) == 64
    assert sdpa.padded_length(SeqInfo.from_lengths([1000], max_seqlen=1023)) == 1024  # the bound, aligned
    # a collator's max_seqlen that is the batch's own longest: still 1024, never 1000 or 1008
    # (the H100's SDPA took 2.4x as long at those)
    assert sdpa.padded_length(SeqInfo.from_lengths([1000, 3], max_seqlen=1000)) == 1024
    assert sdpa.padded_length(SeqInfo.from_lengths([200], max_seqlen=200)) == 256
    assert sdpa.padded_length(SeqInfo.from_lengths([5000], max_seqlen=5000)) == 5056  # the bound, aligned to 64
    huge = SeqInfo.from_lengths([60000] * 64, max_seqlen=60000)
    with pytest.raises(MemoryError, match="64 sequences padded to 60032 tokens need"):
        sdpa.check_fits(huge, 16, sdpa.padded_length(huge))


@pytest.mark.parametrize("bound", [100, 256, 1024, 5000, 16384, 131072])
def test_seqlen_bucket_bounds_the_graphs_and_the_padding(bound):
    from varlen.buckets import MAX_SEQLEN_BUCKETS, seqlen_bucket

    values = {seqlen_bucket(n, bound) for n in range(1, bound + 1)}
    assert len(values) <= MAX_SEQLEN_BUCKETS and max(values) == bound
    smallest = min(values)
    for n in range(1, bound + 1, max(1, bound // 997)):
        b = seqlen_bucket(n, bound)
        assert n <= b <= bound and b <= max(2 * n - 1, smallest), (n, b)


@pytest.mark.parametrize("per_octave", [1, 4, 8])
def test_token_bucket_is_few_sizes_an_octave_within_one_step(per_octave):
    from varlen.buckets import token_bucket

    for k in range(12):  # the octave (2**k, 2**(k+1)]
        sizes = {token_bucket(n, per_octave) for n in range(2**k + 1, 2 ** (k + 1) + 1)}
        assert len(sizes) <= per_octave and max(sizes) == 2 ** (k + 1)
    for n in range(1, 40000, 7):
        b = token_bucket(n, per_octave)
        assert n <= b and b - n < max(1, n / per_octave) and token_bucket(b, per_octave) == b


def test_compiled_sdpa_pads_to_the_batch_bucket_not_the_bound():
    # varlen train --compile on the sdpa path used to pad every batch to --max-len; the backend's own
    # prepare(info) buckets max_seqlen per batch, the collator knows nothing of kernels
    from varlen.attention import prepare
    from varlen.data import PackCollator

    samples = [(torch.arange(n), torch.arange(n) + 1) for n in (100, 37, 5)]
    collated = PackCollator(max_seqlen=5000)(samples).info
    assert collated.max_seqlen == 5000
    for backend in ("flex", "reference", "nested"):  # they take the bound: constant, no recompile
        assert prepare(collated, backend, "cpu") is collated
    info = prepare(collated, "sdpa", "cpu")
    assert info.max_seqlen == 128 and info.lengths == (100, 37, 5)
    assert prepare(collated, "auto", "cpu").max_seqlen == 128  # auto on a CPU: sdpa first
    assert prepare(info, "sdpa", "cpu") is info  # a bucket is its own bucket
    # filler stays within the samples' bucket, so it never raises the padding
    filled = PackCollator(max_seqlen=5000, pad_to=1000)(samples).info
    assert max(filled.lengths) <= 128 and filled.total_tokens == 1000
    assert prepare(filled, "sdpa", "cpu").max_seqlen == 128
    # CUDA graphs' fixed sequence count shares the filler out up to the bound: correct, padded further
    graphed = PackCollator(max_seqlen=5000, pad_to=1000, num_seqs=4)(samples).info
    assert graphed.lengths[3] == 858 and prepare(graphed, "sdpa", "cpu").max_seqlen == 1024

    from varlen.attention import sdpa
    seen = []
    real = sdpa.padded_attention

    def spy(q, k, v, mask, *, scale=None):
        seen.append(q.shape[2])
        return real(q, k, v, mask, scale=scale)

    q = torch.randn(info.total_tokens, 2, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdpa, "padded_attention", spy)
        torch._dynamo.reset()
        fn = torch.compile(lambda q: sdpa.attention(q, q, q, info, causal=True, scale=None, window_size=(-1, -1)),
                           backend="eager", fullgraph=True)
        out = fn(q)
    assert seen == [128] and out.shape == q.shape
