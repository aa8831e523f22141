"""The study decoder's shape built from NVIDIA TransformerEngine's ``TransformerLayer``: what a user
chasing Hopper speed through Megatron or NeMo runs instead of varlen. A peer measured beside
varlen's strategies (``varlen bench --strategies packed-te``), not a varlen attention backend.

Each of the 24 layers is TE's fused LayerNorm + QKV GEMM, its ``DotProductAttention`` on packed
THD rows (``cu_seqlens``; cuDNN's fused attention or the FlashAttention TE finds), the output
projection, and a fused LayerNorm + MLP (GELU); embeddings, the last LayerNorm and the head are the
decoder's. TE's LayerNorms carry a bias where the decoder's have none: a 0.01% difference in
parameters, none in the work. Eager only: TE's modules are not traced by ``torch.compile``
(Megatron runs them eager, or as CUDA graphs of its own).
"""

from __future__ import annotations

import ctypes
import glob
import os

import torch
from torch import Tensor, nn

from ..seqinfo import SeqInfo
from .decoder import DecoderConfig, packed_ids


def te_unavailable() -> str | None:
    """Why TransformerEngine cannot run here, or None."""
    if not torch.cuda.is_available():
        return "TransformerEngine needs a CUDA GPU"
    try:
        _share_torch_cudnn()
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # an ImportError, or its extension failing to load its CUDA libraries
        return f"TransformerEngine not installed (benchmarks/te_wheels.sh carries it to a GPU machine): {e}"
    return None


def _share_torch_cudnn() -> None:
    """Load the cuDNN of torch's ``nvidia-cudnn`` wheel globally before TE's extension loads cuDNN.
    TE finds cuDNN's sub-libraries by name: once torch has used its cuDNN in the process (a cuDNN
    attention, a convolution), a system cuDNN of another version can be found instead and the import
    fails with an undefined symbol (the H100 machine: ``libcudnn_cnn.so.9`` in /lib/x86_64-linux-gnu
    against torch's ``libcudnn_graph.so.9``). With the wheel's libraries loaded first, both share one."""
    try:
        import nvidia.cudnn
    except ImportError:  # no cuDNN wheel: torch and TE both find the system's
        return
    for path in sorted(glob.glob(os.path.join(list(nvidia.cudnn.__path__)[0], "lib", "libcudnn*.so.*"))):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


class TEDecoder(nn.Module):
    """Packed ``[T]`` token ids and their :class:`~varlen.SeqInfo` -> logits ``[T, V]``."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.residual_dtype is not None:
            raise ValueError(f"residual_dtype={cfg.residual_dtype!r}: TransformerEngine's layers keep their own "
                             "residual stream; the TE peer runs with the default")
        if cfg.mlp_kernel != "torch":
            raise ValueError(f"mlp_kernel={cfg.mlp_kernel!r}: TransformerEngine's LayerNormMLP runs its own kernels")
        why = te_unavailable()
        if why:
            raise RuntimeError(why)
        import transformer_engine.pytorch as te

        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = nn.ModuleList(
            te.TransformerLayer(cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.n_heads, hidden_dropout=0.0,
                                attention_dropout=0.0, layer_number=i + 1, self_attn_mask_type="padding_causal",
                                attn_input_format="thd", fuse_qkv_params=True, bias=True, activation="gelu",
                                normalization="LayerNorm", params_dtype=torch.float32)
            for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim, bias=False)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)

    def forward(self, input_ids: Tensor, *, info: SeqInfo, causal: bool | None = None) -> Tensor:
        """``causal`` defaults to ``self.training``, as the decoder's (the study evaluates non-causal)."""
        causal = self.training if causal is None else causal
        input_ids = packed_ids(input_ids, info)
        if info.max_seqlen > self.cfg.max_len:
            raise ValueError(f"a sequence of {info.max_seqlen} tokens is longer than max_len={self.cfg.max_len}")
        x = self.tok_emb(input_ids) + self.pos_emb(info.position_ids)  # [T, C]: TE's THD layout
        mask = "padding_causal" if causal else "padding"
        # one max_seqlen for every batch (an upper bound is valid): TE's attention keys its set-up on it,
        # and the batch's own value, new every batch, would redo that set-up every step
        cu, m = info.cu_seqlens, self.cfg.max_len
        for block in self.blocks:
            x = block(x, self_attn_mask_type=mask, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m, max_seqlen_kv=m)
        return self.head(self.ln_f(x))
