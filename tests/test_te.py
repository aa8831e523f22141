"""The TransformerEngine peer (``packed-te``, :mod:`varlen.models.te_decoder`): chosen like any
strategy, refused in one line where TE cannot run (every CPU, a GPU without TE) or is asked to
compile; its numerics are checked on the GPU (tests/test_gpu.py, benchmarks/run_gpu.sh smoke)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from varlen.bench.cases import Case, WORKLOADS, strategies_of, strategy
from varlen.bench.runner import precheck
from varlen.models import DecoderConfig, family
from varlen.models.te_decoder import TEDecoder, te_unavailable


def test_te_peer_is_a_decoder_strategy_measured_against_padding():
    s = strategy("packed-te")
    assert s.family == "te-decoder" and s.baseline == "padded" and s.packed and not s.causal_lm
    assert "packed-te" in strategies_of("decoder") and "packed-te" not in strategies_of("hf-gpt2")
    fam = family("te-decoder")
    assert fam.own_attention and not fam.compiles and not family("decoder").own_attention


def test_te_refused_in_one_line_where_it_cannot_run(monkeypatch):
    import torch

    w = WORKLOADS["tiny"]
    assert "eager only" in precheck(Case("packed-te", "train", True, w))
    if not torch.cuda.is_available():
        assert te_unavailable() == "TransformerEngine needs a CUDA GPU"
        assert precheck(Case("packed-te", "eval", False, w)) == "TransformerEngine needs a CUDA GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine without TE installed
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    assert te_unavailable().startswith("TransformerEngine not installed (benchmarks/te_wheels.sh")
    with pytest.raises(RuntimeError, match="TransformerEngine not installed"):
        TEDecoder(DecoderConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="residual_dtype='bfloat16': TransformerEngine's layers"):
        TEDecoder(DecoderConfig.from_name("tiny", residual_dtype="bfloat16"))


def test_bench_lists_the_te_peer_as_not_applicable_here(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "varlen.bench", "--preset", "tiny", "--strategies", "padded,packed-te",
                           "--modes", "eval", "--steps", "1", "--warmup", "1", "--num-workers", "0",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = {(c["strategy"], c["compile"]): c for c in json.loads((tmp_path / "results.json").read_text())["cases"]}
    assert cases[("padded", False)]["error"] is None
    assert not cases[("packed-te", False)]["applicable"] and "TransformerEngine" in cases[("packed-te", False)]["error"]
    assert "eager only" in cases[("packed-te", True)]["error"]
