"""The decoder's MLP, ``fc2(GELU(fc1(x)))``, on one of two kernel sets chosen once per model
(``DecoderConfig.mlp_kernel``):

- ``torch``: two linears and GELU (exact or tanh); under ``torch.compile`` Inductor runs GELU as
  its own elementwise kernel, forward and backward, each a pass over the ``[T, 4C]`` activation.
- ``quack``: the two GEMMs that carry GELU on quack-kernels' CuTe GEMMs (Tri Dao's; they come with
  FlashAttention-4): GELU in fc1's epilogue (writing the pre-activation kept for backward and the
  activation in one pass) and GELU's derivative in the epilogue of fc2's input-gradient GEMM, so no
  elementwise pass over ``[T, 4C]`` is left; cuBLAS runs the other four GEMMs. quack's epilogues
  have GELU's tanh approximation only, so this kernel set takes ``activation="gelu_tanh"`` and
  nothing else (refused by ``DecoderConfig``). Hopper or newer, 16-bit (bf16 autocast). Its launch
  path is Python per call: it pays where the step runs as CUDA graphs (docs/gpu-notes.md).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # DecoderConfig.activation -> F.gelu's approximate
GELU_FLAGS = {"exact": "gelu", "tanh": "gelu_tanh"}  # bench / train --gelu -> DecoderConfig.activation


def quack_unavailable() -> str | None:
    """Why quack's fused MLP cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        return f"quack's GEMMs need Hopper or newer (compute capability >= 9.0), have {major}.x"
    if importlib.util.find_spec("quack") is None:
        return "quack-kernels not installed (pip install quack-kernels; it comes with flash-attn-4)"
    return None


def torch_mlp(x: Tensor, fc1: nn.Linear, fc2: nn.Linear, approximate: str) -> Tensor:  # [..., C] -> [..., C]
    return fc2(F.gelu(fc1(x), approximate=approximate))


def check_batch(kernel: str, input_ids: Tensor) -> None:
    """Refuse, in one line and before any kernel runs, a batch ``kernel`` cannot take."""
    if kernel == "quack" and (input_ids.is_nested or input_ids.device.type != "cuda"):
        where = "nested (jagged)" if input_ids.is_nested else input_ids.device.type
        raise ValueError(f"mlp_kernel='quack' runs dense CUDA rows; this batch is {where}: use mlp_kernel='torch'")


def quack_mlp(x: Tensor, fc1: nn.Linear, fc2: nn.Linear, approximate: str = "tanh") -> Tensor:  # [..., C] -> [..., C]
    if approximate != "tanh":
        raise ValueError(f"quack's GEMM epilogues have GELU's tanh approximation only, not approximate={approximate!r}")
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"mlp_kernel='quack' runs 16-bit GEMMs; this MLP would run {dtype} (use bf16 autocast)")
    args = [t.to(dtype) for t in (x.flatten(0, -2), fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
    with torch.autocast("cuda", enabled=False):
        out = _GeluMLP.apply(*args) if torch.is_grad_enabled() else _GeluMLP.forward(None, *args)
    return out.unflatten(0, x.shape[:-1])


class _GeluMLP(torch.autograd.Function):
    """``fc2(gelu_tanh(fc1(x)))`` on ``x`` ``[T, C]`` in 16 bits: quack runs the two GEMMs that carry
    GELU (fc1 forward, fc2's input gradient), cuBLAS the other four. quack's GEMMs run untuned (its
    autotuner keys on shapes, and a packed row changes its token count every batch), and untuned
    they were slower than cuBLAS: moving all six MLP GEMMs to quack cost the study's train step
    more than the fused GELU saved (docs/gpu-notes.md)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):  # x [T, C], w1 [4C, C], w2 [C, 4C]
        from quack.gemm_interface import gemm_act

        # preact [T, 4C] is kept for backward only where there is one
        preact, postact = gemm_act(x, w1.T, bias=b1, activation="gelu_tanh_approx", store_preact=ctx is not None,
                                   tuned=False)
        if ctx is not None:
            ctx.save_for_backward(x, w1, w2, preact)
        return F.linear(postact, w2, b2)

    @staticmethod
    def backward(ctx, dout):  # dout [T, C]
        from quack.gemm_interface import gemm_dact

        x, w1, w2, preact = ctx.saved_tensors
        dout = dout.contiguous()
        # dpreact = (dout @ w2) * gelu'(preact), and postact recomputed, in one GEMM's epilogue
        dpreact, postact = gemm_dact(dout, w2, preact, activation="gelu_tanh_approx", tuned=False)
        dw2, db2 = dout.T @ postact, dout.sum(0, dtype=torch.float32).to(dout.dtype)
        dx, dw1, db1 = dpreact @ w1, dpreact.T @ x, dpreact.sum(0, dtype=torch.float32).to(dpreact.dtype)
        return dx, dw1, db1, dw2, db2


MLP_KERNELS = {"torch": torch_mlp, "quack": quack_mlp}
