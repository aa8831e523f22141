"""The decoder's bf16 residual stream (``DecoderConfig.residual_dtype``): as close to float64 as
autocast's float32 stream is, within bf16's own rounding; refused where it cannot mean anything."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from varlen import SeqInfo
from varlen.models import Decoder, DecoderConfig, lm_loss

LENGTHS = [1, 37, 5, 64, 2, 19]  # a length-1 sample, the tiny preset's positions well inside


def _run(model: Decoder, ids, labels, info, autocast: bool):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        logits = model(ids, info=info, causal=True, backend="sdpa")
    loss = lm_loss(logits.double(), labels)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()
    return logits.double(), loss.detach(), grads


def _models(residual_dtype):
    torch.manual_seed(0)
    ref = Decoder(DecoderConfig.from_name("tiny")).double()
    model = Decoder(DecoderConfig.from_name("tiny", residual_dtype=residual_dtype))
    model.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    return ref, model


def test_bf16_residual_is_as_close_to_float64_as_autocast_is():
    info = SeqInfo.from_lengths(LENGTHS)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1024, (info.total_tokens,), generator=gen)
    labels = torch.randint(1, 1024, (info.total_tokens,), generator=gen)
    ref, base = _models(None)
    _, bf16 = _models("bfloat16")
    want_logits, want_loss, want_grads = _run(ref, ids, labels, info, autocast=False)
    errors = {}
    for name, model in (("autocast", base), ("bf16 residual", bf16)):
        logits, loss, grads = _run(model, ids, labels, info, autocast=True)
        errors[name] = ((logits - want_logits).abs().max().item(), (loss - want_loss).abs().item(),
                        ((grads - want_grads).norm() / want_grads.norm()).item())
    base_err, bf16_err = errors["autocast"], errors["bf16 residual"]
    # the float32 stream under autocast already rounds every GEMM input to bf16: the bf16 stream
    # adds rounding of the same size (eps 2^-8), not more
    for i, what in enumerate(("logits", "loss", "gradients")):
        assert bf16_err[i] <= 4 * base_err[i] + 1e-6, (what, errors)
    assert bf16_err[1] < 1e-2  # the bar for the loss


def test_bf16_residual_needs_autocast_and_is_refused_without():
    _, model = _models("bfloat16")
    info = SeqInfo.from_lengths([4, 3])
    with pytest.raises(ValueError, match="residual_dtype='bfloat16' needs autocast"):
        model(torch.ones(7, dtype=torch.long), info=info)
    with pytest.raises(ValueError, match="residual_dtype 'int8'"):
        DecoderConfig.from_name("tiny", residual_dtype="int8")


def test_bf16_residual_compiles():
    _, model = _models("bfloat16")
    info = SeqInfo.from_lengths([4, 9, 1])
    ids = torch.randint(1, 1024, (info.total_tokens,))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        eager = model(ids, info=info, causal=True, backend="sdpa")
        compiled = torch.compile(model, backend="aot_eager")(ids, info=info, causal=True, backend="sdpa")
    assert compiled.dtype == eager.dtype and torch.allclose(compiled.float(), eager.float(), atol=0, rtol=0)


def test_bench_flag_sets_the_workload_and_refuses_hf(capsys, monkeypatch):
    from varlen.bench.cli import parse_args, workload_from

    with monkeypatch.context() as m:  # the study preset on a GPU machine, as far as the parser looks
        m.setattr(torch.cuda, "is_available", lambda: True)
        _, w = workload_from(parse_args(["--preset", "study", "--residual-dtype", "bf16"]))
    assert w.levers.residual_dtype == "bf16" and w.device == "cuda"
    with pytest.raises(SystemExit) as e:  # the CPU bench runs float32, without autocast
        workload_from(parse_args(["--preset", "tiny", "--residual-dtype", "bf16"]))
    assert e.value.code == 2 and "needs bf16 autocast" in capsys.readouterr().err
    _, w = workload_from(parse_args(["--preset", "tiny"]))
    assert w.levers.residual_dtype == "fp32"
    with pytest.raises(SystemExit) as e:
        workload_from(parse_args(["--preset", "tiny", "--model", "hf-gpt2", "--residual-dtype", "bf16"]))
    assert e.value.code == 2 and "--residual-dtype bf16 is the decoder's; --model hf-gpt2" in capsys.readouterr().err


def test_train_refuses_bf16_residual_without_bf16_autocast(tmp_path, capsys):
    from varlen.train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--device", "cpu", "--residual-dtype", "bf16", "--steps", "1", "--no-progress"])
    assert e.value.code == 2 and "--residual-dtype bf16 needs bf16 autocast; this run's autocast dtype is fp32" \
        in capsys.readouterr().err


def test_train_bf16_residual_tracks_the_autocast_run(tmp_path):
    import subprocess

    common = [sys.executable, "-m", "varlen.train", "--preset", "tiny", "--device", "cpu", "--dtype", "bf16",
              "--steps", "4", "--max-tokens", "1024", "--seed", "0", "--lr", "0.05", "--no-progress"]
    for name, extra in (("base", []), ("bf16", ["--residual-dtype", "bf16"])):
        subprocess.run([*common, *extra, "--out", str(tmp_path / name)], check=True, capture_output=True, timeout=600)
    logs = {name: [json.loads(x)["loss"] for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
            for name in ("base", "bf16")}
    assert len(logs["bf16"]) == 4
    for a, b in zip(logs["base"], logs["bf16"]):
        assert abs(a - b) < 1e-2, logs
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["steps"] == 4
