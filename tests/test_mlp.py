"""The decoder's MLP kernels (``DecoderConfig.activation`` / ``mlp_kernel``): GELU's tanh approximation
on the torch kernels, and the wiring of quack's fused GEMMs. quack's CuTe kernels need a Hopper GPU
(``tests/test_gpu.py`` runs them against float64); here a torch stand-in with quack's contract
(``gemm_act`` -> pre-activation, activation; ``gemm_dact`` -> the pre-activation's gradient and the
activation) checks which tensor goes where, forward and gradients."""

from __future__ import annotations

import math
from dataclasses import replace
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from varlen import SeqInfo
from varlen.models import Decoder, DecoderConfig
from varlen.models.mlp import _GeluMLP, quack_mlp, torch_mlp


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _stand_in():
    """quack.gemm_interface's gemm_act / gemm_dact with quack's contract, in torch."""

    def gemm_act(A, B, bias=None, activation=None, store_preact=True, tuned=True):
        assert activation == "gelu_tanh_approx" and not tuned
        preact = A @ B + bias
        return (preact if store_preact else None), _gelu_tanh(preact)

    def gemm_dact(A, B, PreAct, activation=None, tuned=True):
        assert activation == "gelu_tanh_approx" and not tuned
        with torch.enable_grad():
            p = PreAct.detach().requires_grad_()
            post = _gelu_tanh(p)
            (dpre,) = torch.autograd.grad(post, p, A @ B)
        return dpre, post.detach()

    quack = types.ModuleType("quack")
    quack.gemm_interface = types.SimpleNamespace(gemm_act=gemm_act, gemm_dact=gemm_dact)
    return quack


def _layers(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(16, 64).double(), torch.nn.Linear(64, 16).double()


def test_tanh_gelu_is_the_approximation_and_not_exact():
    fc1, fc2 = _layers()
    x = torch.randn(9, 16, dtype=torch.float64)
    torch.testing.assert_close(torch_mlp(x, fc1, fc2, "tanh"), fc2(_gelu_tanh(fc1(x))))
    assert not torch.allclose(torch_mlp(x, fc1, fc2, "none"), torch_mlp(x, fc1, fc2, "tanh"))


@pytest.fixture
def quack_stand_in(monkeypatch):
    quack = _stand_in()
    monkeypatch.setitem(sys.modules, "quack", quack)
    monkeypatch.setitem(sys.modules, "quack.gemm_interface", quack.gemm_interface)


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_fused_function_matches_torch_mlp_forward_and_grads(quack_stand_in, tokens):
    # the autograd wiring in float64: which GEMM gets which tensor, forward and all five gradients
    fc1, fc2 = _layers(tokens)
    x = torch.randn(tokens, 16, dtype=torch.float64, requires_grad=True)
    params = [x, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    want = torch_mlp(x, fc1, fc2, "tanh")
    want_grads = torch.autograd.grad(want.square().sum(), params)
    got = _GeluMLP.apply(*params)
    got_grads = torch.autograd.grad(got.square().sum(), params)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # eval: no pre-activation kept
        torch.testing.assert_close(_GeluMLP.forward(None, *params), want)


def test_quack_mlp_runs_16_bit_and_keeps_the_shape(quack_stand_in):
    fc1, fc2 = _layers(3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="mlp_kernel='quack' runs 16-bit GEMMs; this MLP would run torch.float64"):
        quack_mlp(x, fc1, fc2)
    fc1, fc2 = fc1.bfloat16(), fc2.bfloat16()
    out = quack_mlp(x.bfloat16(), fc1, fc2)  # [2, 5, C]: flattened to [T, C] and back
    assert out.shape == (2, 5, 16) and out.dtype == torch.bfloat16
    want = torch_mlp(x, fc1.double(), fc2.double(), "tanh")
    torch.testing.assert_close(out.double(), want, atol=0.05 * want.abs().max().item(), rtol=0)


def test_config_refuses_what_quack_cannot_honour():
    with pytest.raises(ValueError, match="fuses GELU's tanh approximation only; activation='gelu' would change"):
        DecoderConfig.from_name("tiny", mlp_kernel="quack")
    with pytest.raises(ValueError, match="activation 'relu': choose from gelu, gelu_tanh"):
        DecoderConfig.from_name("tiny", activation="relu")
    with pytest.raises(ValueError, match="mlp_kernel 'triton': choose from torch, quack"):
        DecoderConfig.from_name("tiny", mlp_kernel="triton")


def test_decoder_refuses_a_cpu_batch_before_any_kernel(monkeypatch):
    model = Decoder(DecoderConfig.from_name("tiny", activation="gelu_tanh", mlp_kernel="quack"))
    monkeypatch.setattr(F, "embedding", lambda *a, **k: pytest.fail("a kernel ran"))
    with pytest.raises(ValueError, match="mlp_kernel='quack' runs dense CUDA rows; this batch is cpu"):
        model(torch.ones(5, dtype=torch.long), info=SeqInfo.from_lengths([5]))


def test_bench_flags(capsys, monkeypatch):
    from varlen.bench.cases import Case, strategy
    from varlen.bench.cli import parse_args, workload_from
    from varlen.bench.runner import precheck

    with monkeypatch.context() as m:  # the study preset on a GPU machine, as far as the parser looks
        m.setattr(torch.cuda, "is_available", lambda: True)
        _, w = workload_from(parse_args(["--preset", "study", "--gelu", "tanh", "--mlp-kernel", "quack"]))
    assert (w.levers.gelu, w.levers.mlp_kernel) == ("tanh", "quack")
    case = Case(strategy=strategy("packed-sdpa").name, mode="train", compile=False, workload=replace(w, device="cpu"))
    assert precheck(case) == "no CUDA device"  # n/a on this machine, with its reason
    for argv, message in ((["--mlp-kernel", "quack"], "--mlp-kernel quack: it fuses GELU's tanh approximation only"),
                          (["--gelu", "tanh", "--mlp-kernel", "quack"], "under bf16 autocast; this run's autocast dtype is fp32"),
                          (["--model", "hf-gpt2", "--gelu", "tanh"], "--gelu tanh is the decoder's; --model hf-gpt2")):
        with pytest.raises(SystemExit) as e:
            workload_from(parse_args(["--preset", "tiny", *argv]))
        assert e.value.code == 2 and message in capsys.readouterr().err
    _, w = workload_from(parse_args(["--preset", "tiny", "--gelu", "tanh"]))
    assert (w.levers.gelu, w.levers.mlp_kernel) == ("tanh", "torch")


@pytest.mark.parametrize("flags,message", [
    (["--mlp-kernel", "quack"], "--mlp-kernel quack: it fuses GELU's tanh approximation only: add --gelu tanh"),
    (["--mlp-kernel", "quack", "--gelu", "tanh"], "--mlp-kernel quack: it runs 16-bit GEMMs under bf16 autocast; "
                                                   "this run's autocast dtype is fp32"),
    (["--model", "hf-llama", "--gelu", "tanh"], "--gelu tanh is the decoder's; --model hf-llama keeps its own layers"),
])
def test_train_refuses_in_one_line(capsys, flags, message):
    from varlen.train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--device", "cpu", "--steps", "1", "--no-progress", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_train_with_tanh_gelu_records_it(tmp_path, capsys):
    # the setting is part of the run's config: resuming with exact GELU is refused as a change
    from varlen.train.cli import main

    out = tmp_path / "run"
    common = ["--preset", "tiny", "--device", "cpu", "--num-samples", "64", "--no-progress", "--out", str(out),
              "--save-every", "2"]
    assert main([*common, "--steps", "2", "--gelu", "tanh"]) == 0
    with pytest.raises(SystemExit) as e:
        main([*common, "--steps", "4", "--resume"])
    assert e.value.code == 2 and "gelu: 'tanh' in the checkpoint, None now" in capsys.readouterr().err
    assert main([*common, "--steps", "4", "--resume", "--gelu", "tanh"]) == 0
