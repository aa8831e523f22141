"""FP8 linears (``varlen.fp8.apply_fp8``, torchao's float8): the right layers converted, the
step's loss and gradients within float8's own rounding of float64, refused where nothing would run
in fp8. torchao emulates the fp8 GEMMs on the CPU, so the numerics are checked here; the speed only
on a GPU (``benchmarks/run_gpu.sh levers``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from varlen import SeqInfo
from varlen.models import Decoder, DecoderConfig, lm_loss
from varlen.fp8 import apply_fp8, fp8_eligible
from varlen.levers import Levers

LENGTHS = [64, 32, 1, 31, 96]  # 224 tokens: float8 GEMMs take multiples of 16


def _step(model, ids, labels, info, autocast: bool):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        logits = model(ids, info=info, causal=True, backend="sdpa")
    loss = lm_loss(logits.double(), labels)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_step_is_within_float8_rounding_of_float64(recipe):
    torch.manual_seed(0)
    cfg = DecoderConfig.from_name("small")
    ref = Decoder(cfg).double()
    info = SeqInfo.from_lengths(LENGTHS)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1024, (info.total_tokens,), generator=gen)
    labels = torch.randint(1, 1024, (info.total_tokens,), generator=gen)
    want_loss, want_grads = _step(ref, ids, labels, info, autocast=False)
    errors = {}
    for name in ("bf16", recipe):
        model = Decoder(cfg)
        model.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        if name != "bf16":
            converted = apply_fp8(model, recipe)
            assert "head" not in converted and len(converted) == 4 * cfg.n_layers  # qkv, proj, fc1, fc2
            assert type(model.blocks[0].fc1).__name__ == "Float8Linear" and type(model.head) is nn.Linear
        loss, grads = _step(model, ids, labels, info, autocast=True)
        errors[name] = (abs(loss - want_loss), ((grads - want_grads).norm() / want_grads.norm()).item())
    # float8 keeps 3 (e4m3) or 2 (e5m2) mantissa bits: its gradients are coarser than bf16's (which
    # shows the conversion took), yet within a tenth of float64's, and the loss within the 1e-2 bar
    assert errors[recipe][1] > 2 * errors["bf16"][1], errors
    assert errors[recipe][1] < 0.1 and errors[recipe][0] < 1e-2, errors


def test_fp8_refusals():
    assert not fp8_eligible(nn.Linear(64, 1000), "blocks.0.fc1")  # 1000 is not a multiple of 16
    assert not fp8_eligible(nn.Linear(64, 64), "head") and fp8_eligible(nn.Linear(64, 64), "blocks.0.fc1")
    with pytest.raises(ValueError, match="fp8 recipe 'e3m4'"):
        apply_fp8(Decoder(DecoderConfig.from_name("tiny")), "e3m4")
    with pytest.raises(ValueError, match="nothing would run in fp8"):
        apply_fp8(nn.Sequential(nn.Conv1d(4, 4, 1), nn.Linear(10, 10)), "tensorwise")


def test_fp8_refuses_a_token_count_float8_cannot_take():
    model = Decoder(DecoderConfig.from_name("tiny"))
    apply_fp8(model, "tensorwise")
    info = SeqInfo.from_lengths([7, 9, 1])  # 17 tokens
    with pytest.raises(ValueError, match="a batch of 17 tokens; float8 GEMMs need a multiple of 16"):
        model(torch.ones(17, dtype=torch.long), info=info)
    nested = torch.nested.nested_tensor([torch.ones(5, dtype=torch.long), torch.ones(11, dtype=torch.long)],
                                        layout=torch.jagged)
    with pytest.raises(ValueError, match="nested"):
        model(nested, position_ids=nested)


def test_fp8_rows_are_padded_to_whole_gemm_tiles():
    """The bench's packed rows (and varlen train's, via TrainCollator) carry filler up to a multiple of
    16 tokens under --fp8, with ignored labels; a nested case is refused before it starts."""
    from dataclasses import replace

    from varlen.bench.cases import WORKLOADS, Case
    from varlen.bench.runner import precheck
    from varlen.bench.worker import _collator
    from varlen.data.synthetic import SyntheticDataset
    from varlen.data import TrainCollator

    w = replace(WORKLOADS["tiny"], levers=Levers(fp8="rowwise"))
    ds = SyntheticDataset(6, max_len=w.max_len, vocab_size=w.vocab_size, seed=3)
    samples = [ds[i] for i in range(6)]
    real = sum(len(s[0]) for s in samples)
    for compiled in (False, True):
        case = Case("packed-sdpa", "train", compiled, w)
        batch = _collator(case, DecoderConfig.from_name("tiny"), [list(range(6))])(samples)
        assert batch.info.total_tokens % 16 == 0 and batch.info.total_tokens - real < 16
        assert (batch.labels[real:] == -100).all()
    packed = TrainCollator(multiple_of=2 * 16)(samples)
    assert packed.input_ids.numel() % 32 == 0
    assert "multiple of 16" in precheck(Case("nested", "train", False, w))
    assert precheck(Case("packed-sdpa", "train", False, replace(w, levers=Levers()))) is None


def test_fp8_missing_torchao_is_one_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torchao(name, *a, **kw):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(RuntimeError, match=r"fp8: torchao not installed \(pip install torchao"):
        apply_fp8(Decoder(DecoderConfig.from_name("tiny")), "tensorwise")


def test_bench_fp8_flag(capsys, monkeypatch):
    from varlen.bench.cli import parse_args, workload_from

    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        _, w = workload_from(parse_args(["--preset", "study", "--fp8", "rowwise"]))
    assert w.levers.fp8 == "rowwise"
    for argv, message in ((["--preset", "tiny", "--fp8", "rowwise"], "need a CUDA GPU"),
                          (["--preset", "tiny", "--model", "hf-gpt2", "--fp8", "rowwise"], "--fp8 rowwise is the decoder's")):
        with pytest.raises(SystemExit) as e:
            workload_from(parse_args(argv))
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_train_fp8_runs_and_is_tied_to_its_checkpoint(tmp_path):
    common = [sys.executable, "-m", "varlen.train", "--preset", "tiny", "--device", "cpu", "--dtype", "bf16",
              "--max-tokens", "1024", "--seed", "0", "--lr", "0.05", "--no-progress", "--out", str(tmp_path / "r")]
    subprocess.run([*common, "--steps", "3", "--fp8", "tensorwise", "--save-every", "3"], check=True,
                   capture_output=True, timeout=600)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(abs(x - 6.93) < 0.5 for x in losses)  # ln(1024) at init, finite
    # resuming without --fp8 would change what the run computes: refused, naming the field
    proc = subprocess.run([*common, "--steps", "4", "--resume"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "fp8: 'tensorwise' in the checkpoint, None now" in proc.stderr
