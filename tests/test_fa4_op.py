"""The FA4 custom ops' plumbing on a CPU: schema, fake (shape-only) implementations, the autograd
formula's wiring and one-graph compilation. FA4's CuTe kernels need a Hopper GPU, so here a
torch implementation with FA4's contract (out ``[T, H, D]``, lse ``[H, T]`` float32; backward
from out, lse and dout) stands in for them; ``tests/test_gpu.py`` runs the real kernels
(``flash:fa4``) against float64.
"""

import pytest
import torch

from varlen.attention import fa4

from helpers import assert_matches_truth, random_qkv, scale_of


def _scores(q, k, cu, i, scale, causal, left, right, softcap=0.0):
    """Sequence i's masked scores [H, n, n] in float64, and the soft-cap's derivative (1 without one)."""
    a, b = int(cu[i]), int(cu[i + 1])
    qs = q[a:b].double().transpose(0, 1)  # [H, n, D]
    ks = k[a:b].double().transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0)
    s = qs @ ks.transpose(1, 2) * scale
    dcap = torch.ones_like(s)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
        dcap = 1 - (s / softcap) ** 2
    pos = torch.arange(b - a)
    right = 0 if causal else right
    ok = torch.ones(b - a, b - a, dtype=torch.bool)
    if right >= 0:
        ok &= pos[None, :] <= pos[:, None] + right
    if left >= 0:
        ok &= pos[None, :] >= pos[:, None] - left
    return a, b, s.masked_fill(~ok, float("-inf")), dcap


def _with_sink(s, sinks):  # [H, n, n] -> [H, n, n + 1]: the sink's logit as one more column
    if sinks is None:
        return s
    return torch.cat([s, sinks.double()[:, None, None].expand(*s.shape[:2], 1)], -1)


def torch_fwd(q, k, v, cu, max_seqlen, scale, causal, left, right, softcap=0.0, sinks=None):
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)  # FA4's: the sink's term counted
    g = q.shape[1] // k.shape[1]
    for i in range(cu.numel() - 1):
        a, b, s, _ = _scores(q, k, cu, i, scale, causal, left, right, softcap)
        lse[:, a:b] = torch.logsumexp(_with_sink(s, sinks), -1).float()
        p = torch.softmax(_with_sink(s, sinks), -1)[..., : b - a]
        out[a:b] = (p @ v[a:b].double().transpose(0, 1).repeat_interleave(g, 0)).transpose(0, 1).to(q.dtype)
    return out, lse


def torch_bwd(dout, q, k, v, out, lse, cu, max_seqlen, scale, causal, left, right, softcap=0.0, sinks=None,
              dq_out=None, dk_out=None, dv_out=None):
    # FlashAttention's backward: P from the saved lse, D = rowsum(dO * O); into dq_out.. where given;
    # a sink's gradient is -sum over rows of P_sink * D
    dq, dk, dv = (torch.zeros_like(x, dtype=torch.float64) for x in (q, k, v))
    dsinks = None if sinks is None else torch.zeros(q.shape[1], dtype=torch.float64)
    hk, g = k.shape[1], q.shape[1] // k.shape[1]
    for i in range(cu.numel() - 1):
        a, b, s, dcap = _scores(q, k, cu, i, scale, causal, left, right, softcap)
        p = torch.exp(s - lse[:, a:b, None].double())  # [H, n, n]
        do, o = dout[a:b].double().transpose(0, 1), out[a:b].double().transpose(0, 1)
        vs = v[a:b].double().transpose(0, 1).repeat_interleave(g, 0)
        ks = k[a:b].double().transpose(0, 1).repeat_interleave(g, 0)
        d = (do * o).sum(-1, keepdim=True)  # [H, n, 1]
        ds = p * (do @ vs.transpose(1, 2) - d) * dcap * scale
        dq[a:b] = (ds @ ks).transpose(0, 1)
        dk[a:b] = (ds.transpose(1, 2) @ q[a:b].double().transpose(0, 1)).view(hk, g, b - a, -1).sum(1).transpose(0, 1)
        dv[a:b] = (p.transpose(1, 2) @ do).view(hk, g, b - a, -1).sum(1).transpose(0, 1)
        if sinks is not None:
            dsinks -= (torch.exp(sinks.double()[:, None] - lse[:, a:b].double()) * d[..., 0]).sum(-1)
    grads = []
    for given, x in ((dq_out, dq), (dk_out, dk), (dv_out, dv)):
        if given is None:
            grads.append(x.to(q.dtype))
        else:
            given.copy_(x)
            grads.append(given)
    return (*grads, None if sinks is None else dsinks.to(sinks.dtype))


@pytest.fixture
def torch_kernels(monkeypatch):
    monkeypatch.setattr(fa4, "_kernels", lambda: (torch_fwd, torch_bwd))


CASES = {
    "random": [5, 17, 1, 30],
    "one_sequence": [40],
    "length_1": [1],
    "many_tiny": [1, 2, 3] * 6,
}


@pytest.mark.parametrize("lengths", CASES)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 2))],
                         ids=["full", "causal", "window"])
def test_op_forward_and_grads_match_truth(torch_kernels, lengths, causal, window):
    lengths = CASES[lengths]
    q, k, v = random_qkv(lengths, 4, 2, 16, torch.float32, seed=len(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    for x in (q, k, v):
        x.requires_grad_()
    left, right = window[0], 0 if causal else window[1]
    out = fa4.attention(q, k, v, cu, max(lengths), scale=scale_of(16), causal=causal, left=left, right=right)
    assert_matches_truth(out, q, k, v, lengths, causal, window)


@pytest.mark.parametrize("lengths", CASES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_qkvpacked_op_forward_and_grads_match_truth(torch_kernels, lengths, causal):
    # one [T, 3, H, D] input whose gradient comes back as one [T, 3, H, D] buffer (stack's backward
    # hands each of q, k, v its third)
    lengths = CASES[lengths]
    q, k, v = (x.requires_grad_() for x in random_qkv(lengths, 4, 4, 16, torch.float32, seed=len(lengths)))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.stack((q, k, v), 1)
    out = fa4.attention_qkvpacked(qkv, cu, max(lengths), scale=scale_of(16), causal=causal, left=-1,
                                  right=0 if causal else -1)
    assert_matches_truth(out, q, k, v, lengths, causal)


@pytest.mark.parametrize("lengths", ["random", "length_1", "many_tiny"])
def test_qkvpacked_softcap_and_sinks_match_the_split_call(torch_kernels, lengths):
    # packed and split are one op: the same forward and gradients, soft-capping and sinks included
    lengths = CASES[lengths]
    q, k, v = random_qkv(lengths, 4, 4, 16, torch.float64, seed=len(lengths) + 3)
    qkv, sinks = torch.stack((q, k, v), 1).requires_grad_(), torch.randn(4, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    kw = dict(scale=scale_of(16), causal=True, left=-1, right=0, softcap=3.0, sinks=sinks)
    packed = fa4.attention_qkvpacked(qkv, cu, max(lengths), **kw)
    split = fa4.attention(*qkv.unbind(1), cu, max(lengths), **kw)
    torch.testing.assert_close(packed, split, rtol=0, atol=0)
    w = torch.randn_like(split)
    for g, r in zip(torch.autograd.grad((packed * w).sum(), (qkv, sinks)),
                    torch.autograd.grad((split * w).sum(), (qkv, sinks))):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("softcap,with_sinks", [(0.0, False), (2.0, True)], ids=["plain", "softcap_sinks"])
def test_qkvpacked_opcheck(torch_kernels, softcap, with_sinks):
    # the same pair with k and v None: q is the whole [T, 3, H, D], its gradient one buffer of that shape
    qkv = torch.randn(13, 3, 4, 16, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True) if with_sinks else None
    cu = torch.tensor([0, 3, 12, 13], dtype=torch.int32)
    args = (qkv, None, None, cu, 9, 0.25, True, -1, 0, softcap, sinks)
    torch.library.opcheck(fa4.fa4_varlen_fwd, args)
    out, lse = fa4.fa4_varlen_fwd(*args)
    assert out.shape == (13, 4, 16) and lse.shape == (4, 13) and not lse.requires_grad
    bwd_args = (torch.randn_like(out), qkv.detach(), None, None, out.detach(), lse, cu, 9, 0.25, True, -1, 0, softcap,
                None if sinks is None else sinks.detach())
    torch.library.opcheck(fa4.fa4_varlen_bwd, bwd_args)
    dqkv, dk, dv, dsinks = fa4.fa4_varlen_bwd(*bwd_args)
    assert dqkv.shape == qkv.shape and dk.numel() == dv.numel() == 0
    assert dsinks.shape == ((4,) if with_sinks else (0,))


def test_opcheck(torch_kernels):
    # schema, fake tensors, autograd registration and AOT dispatch (with dynamic shapes)
    q, k, v = (x.requires_grad_() for x in random_qkv([3, 9, 1], 4, 2, 16, torch.float32))
    cu = torch.tensor([0, 3, 12, 13], dtype=torch.int32)
    torch.library.opcheck(fa4.fa4_varlen_fwd, (q, k, v, cu, 9, 0.25, True, -1, 0))
    out, lse = fa4.fa4_varlen_fwd(q, k, v, cu, 9, 0.25, True, -1, 0)
    assert lse.shape == (4, 13) and lse.dtype == torch.float32 and not lse.requires_grad
    dout = torch.randn_like(out)
    torch.library.opcheck(fa4.fa4_varlen_bwd, (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu,
                                               9, 0.25, True, -1, 0))


def test_opcheck_with_softcap_and_sinks(torch_kernels):
    q, k, v = (x.requires_grad_() for x in random_qkv([3, 9, 1], 4, 2, 16, torch.float32))
    sinks = torch.randn(4, requires_grad=True)
    cu = torch.tensor([0, 3, 12, 13], dtype=torch.int32)
    torch.library.opcheck(fa4.fa4_varlen_fwd, (q, k, v, cu, 9, 0.25, True, -1, 0, 2.0, sinks))
    out, lse = fa4.fa4_varlen_fwd(q, k, v, cu, 9, 0.25, True, -1, 0, 2.0, sinks)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, 9, 0.25, True, -1, 0,
            2.0, sinks.detach())
    torch.library.opcheck(fa4.fa4_varlen_bwd, args)
    assert fa4.fa4_varlen_bwd(*args)[3].shape == (4,)


@pytest.mark.parametrize("lengths", ["random", "length_1", "many_tiny"])
@pytest.mark.parametrize("softcap", [0.0, 3.0], ids=["no_cap", "softcap"])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["no_sinks", "sinks"])
def test_softcap_and_sinks_match_reference(torch_kernels, lengths, softcap, with_sinks):
    # the op's wiring of soft-capping and sinks (forward, the backward from the saved lse, the sinks'
    # gradient) against varlen's reference backend, on the same inputs, by autograd in float64
    from varlen import SeqInfo
    from varlen.attention import attention

    lengths = CASES[lengths]
    q, k, v = random_qkv(lengths, 4, 2, 16, torch.float64, seed=len(lengths) + 7)
    sinks = torch.randn(4) if with_sinks else None  # float32: FA4 takes sinks in half or single precision
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    leaves = [x.requires_grad_() for x in (q, k, v, sinks) if x is not None]
    out = fa4.attention(q, k, v, cu, max(lengths), scale=scale_of(16), causal=True, left=-1, right=0,
                        softcap=softcap, sinks=sinks)
    ref = attention(q, k, v, SeqInfo.from_lengths(lengths), causal=True, backend="reference", softcap=softcap,
                    sinks=sinks)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    w = torch.randn_like(ref)
    # the backward recomputes probabilities from the saved lse, float32 in FA4's contract: exp(s - lse)
    # carries lse's rounding, |lse| * float32's epsilon relative
    lse = fa4.fa4_varlen_fwd(q, k, v, cu, max(lengths), scale_of(16), True, -1, 0, softcap, sinks)[1]
    tol = 8 * torch.finfo(torch.float32).eps * max(1.0, lse.abs().max().item())
    for g, r in zip(torch.autograd.grad((out * w).sum(), leaves), torch.autograd.grad((ref * w).sum(), leaves)):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * max(r.abs().max().item(), 1e-6))


def test_compiles_to_one_graph(torch_kernels):
    # the reason for the ops: dynamo sees one opaque node per call, no graph break, forward and
    # backward; batches of other token counts reuse the graph (dynamic T)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def f(q, k, v, cu, m):
        return fa4.attention(q, k, v, cu, m, scale=0.25, causal=True, left=-1, right=0).square().sum()

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    # (cu_seqlens sizes unlike the head counts: duck sizing would tie them and recompile)
    for lengths in ([3, 9, 1, 4], [7, 2, 2, 5, 1], [20, 1, 1, 1, 1, 1, 1]):
        q, k, v = (x.requires_grad_() for x in random_qkv(lengths, 4, 2, 16, torch.float32, seed=len(lengths)))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        loss = cf(q, k, v, cu, 20)
        grads = torch.autograd.grad(loss, (q, k, v))
        ref = f(q, k, v, cu, 20)
        ref_grads = torch.autograd.grad(ref, (q, k, v))
        torch.testing.assert_close(loss, ref)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_window_translation():
    # varlen's -1 (unbounded) is FA4's None; bounds pass through
    assert fa4._window(-1, 0) == (None, 0)
    assert fa4._window(-1, -1) == (None, None)
    assert fa4._window(64, 32) == (64, 32)
