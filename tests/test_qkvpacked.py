"""``varlen.attention_qkvpacked``: one projection's output ``[T, 3, H, D]`` in, the same attention as
:func:`varlen.attention` on its three views, forward and gradients, on every backend this machine
runs; and on FA4's op (a torch stand-in for its kernels here) the compiled backward has no cat of
three gradients, which is what the entry point is for."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from varlen import BACKENDS, SeqInfo, attention_qkvpacked
from varlen.attention import backend_reasons, fa4

from helpers import assert_matches_truth, random_qkv
from test_fa4_op import torch_bwd, torch_fwd

LENGTHS = {"len1": [1], "one_seq": [37], "many_tiny": [1, 2, 1, 1, 3, 1, 2], "mixed": [64, 3, 29, 1]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_truth_on_every_backend(backend, lengths, causal):
    lengths = LENGTHS[lengths]
    q, k, v = (x.requires_grad_() for x in random_qkv(lengths, 4, 4, 16, torch.float32, seed=len(lengths)))
    info = SeqInfo.from_lengths(lengths)
    why = backend_reasons(backend, q, k, v, info, causal, (-1, -1))
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")
    out = attention_qkvpacked(torch.stack((q, k, v), 1), info, causal=causal, backend=backend)
    assert_matches_truth(out, q, k, v, lengths, causal)


@pytest.mark.parametrize("shape", [(10, 4, 16), (10, 2, 4, 16), (10, 3, 4, 16, 1)])
def test_bad_shape_refused_in_one_line(shape):
    with pytest.raises(ValueError, match=r"qkv must be a packed \[T, 3, H, D\] tensor"):
        attention_qkvpacked(torch.randn(shape), SeqInfo.from_lengths([10]))


def test_tokens_checked_against_info():
    with pytest.raises(ValueError, match="q has 10 tokens but cu_seqlens ends at 12"):
        attention_qkvpacked(torch.randn(10, 3, 4, 16), SeqInfo.from_lengths([12]))


def _backward_ops(f, *args) -> set[str]:
    """The aten ops of ``f``'s compiled backward graph."""
    graphs = []

    def record(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    loss = torch.compile(f, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)(*args)
    loss.backward()
    return {str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"}


def test_fa4_backward_writes_one_gradient_buffer(monkeypatch):
    # the projection [T, 3C] -> attention: split into q, k, v, the backward cats dq, dk, dv; packed, it
    # takes FA4's [T, 3, H, D] gradient as it is
    monkeypatch.setattr(fa4, "_kernels", lambda: (torch_fwd, torch_bwd))
    x, w = torch.randn(13, 64), torch.randn(192, 64, requires_grad=True)
    cu = torch.tensor([0, 3, 12, 13], dtype=torch.int32)
    kw = dict(scale=0.25, causal=True, left=-1, right=0)

    def split(x, w):
        q, k, v = (t.unflatten(-1, (4, 16)) for t in (x @ w.T).chunk(3, -1))
        return fa4.attention(q, k, v, cu, 9, **kw).square().sum()

    def packed(x, w):
        return fa4.attention_qkvpacked((x @ w.T).unflatten(-1, (3, 4, 16)), cu, 9, **kw).square().sum()

    assert "aten.cat.default" in _backward_ops(split, x, w)  # what the test would miss
    assert "aten.cat.default" not in _backward_ops(packed, x, w)
    (g_split,) = torch.autograd.grad(split(x, w), w)
    (g_packed,) = torch.autograd.grad(packed(x, w), w)
    torch.testing.assert_close(g_packed, g_split)
