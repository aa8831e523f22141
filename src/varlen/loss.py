"""Labels and the language-model loss: the one place that says what a label means.

A label convention is stated by whoever builds the batch, never guessed from a key name:

- :attr:`Labels.SHIFTED`: ``labels[t]`` is position ``t``'s target (the next token); varlen's
  decoder and ``varlen train``. A packed row needs nothing at a boundary: a sample's last label
  is its own next token or ignored.
- :attr:`Labels.UNSHIFTED`: the labels are the inputs and the model shifts them inside its loss
  (position ``t`` learns ``labels[t + 1]``); HuggingFace causal LMs. In a packed row the label at
  each sample's start would train the previous sample's last token to predict it, so it is
  ignored (:func:`ignore_starts`) -- the one boundary rule.

The loss is token-normalised: the sum of every target's cross-entropy divided by the number of
targets (of the whole step, over micro-batches and ranks, in ``varlen.engine.step``).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class Labels(Enum):
    SHIFTED = "shifted"  # labels[t] is position t's target
    UNSHIFTED = "unshifted"  # labels are the inputs; the model shifts them (HF)

    def check(self, input_ids: Tensor, labels: Tensor, where: str) -> None:
        """Refuse labels that plainly follow the other convention: every target equal to the
        input at the same position (unshifted) or at the next one (shifted), and not both."""
        if input_ids.numel() < 3:
            return
        live = labels != IGNORE_INDEX
        same = bool(live.any()) and bool(((labels == input_ids) | ~live).all())
        ahead = bool(live[:-1].any()) and bool(((labels[:-1] == input_ids[1:]) | ~live[:-1]).all())
        if self is Labels.SHIFTED and same and not ahead:
            raise ValueError(f"{where}: its labels are its input_ids (Labels.UNSHIFTED, HF's convention: the "
                             "model shifts them), but the collator takes Labels.SHIFTED (labels[t] is position "
                             "t's target); pass labels=Labels.UNSHIFTED or shift them")
        if self is Labels.UNSHIFTED and ahead and not same:
            raise ValueError(f"{where}: its labels are its input_ids shifted by one (Labels.SHIFTED), but the "
                             "collator takes Labels.UNSHIFTED (the model shifts them again); pass "
                             "labels=Labels.SHIFTED or give the unshifted labels")

    def aligned(self, labels: Tensor) -> Tensor:
        """Labels aligned with the logits (position t's target at t). UNSHIFTED labels move one to
        the left within each row, as HF's loss does (a row's last position gets no target); in a
        packed row the label at each sample's start must already be ignored (the collators do it)."""
        if self is Labels.SHIFTED:
            return labels
        if labels.is_nested:
            return torch.nested.nested_tensor([_left(x) for x in labels.unbind()], layout=torch.jagged)
        return _left(labels)

    def packed(self, labels: Tensor, starts: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
        """``labels`` [T] of sequences starting at ``starts`` as a packed row needs them."""
        return ignore_starts(labels, starts, ignore_index) if self is Labels.UNSHIFTED else labels


def _left(labels: Tensor) -> Tensor:
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def ignore_starts(labels: Tensor, starts: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``labels`` (any shape, flattened row-major) with the label at each flat index in ``starts``
    ignored: a model that shifts its labels would otherwise train across the boundary."""
    out = labels.clone()
    out.view(-1)[starts.long()] = ignore_index
    return out


def num_targets(labels: Tensor) -> Tensor:
    """The number of real targets (a device scalar, no sync); nested labels too."""
    return ((labels.values() if labels.is_nested else labels) != IGNORE_INDEX).sum()


def num_shifted_targets(labels: Tensor) -> Tensor:
    """The targets an HF model's own loss averages over, for ``Labels.UNSHIFTED`` labels [..., L]: it
    shifts them left by one in every row, so each row's first label is never a target."""
    return num_targets(labels[..., 1:])


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy of ``logits`` [..., V] against aligned ``labels`` [...], in float32 at
    least (float64 stays float64), ignoring ``IGNORE_INDEX``; nested tensors too."""
    if logits.is_nested:
        logits, labels = logits.values(), labels.values()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the real targets of one batch (packed, padded or nested), for
    ``Labels.SHIFTED`` labels aligned with ``logits``."""
    return cross_entropy_sum(logits, labels) / num_targets(labels).clamp_min(1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` without the ``[T, V]`` logits at once: chunk by
    chunk, the gradients of hidden and weight are made in the forward pass (as Liger's fused
    linear cross-entropy does), so no chunk's logits are kept for backward and none is recomputed."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, compute: torch.dtype):
        w = weight.to(compute)
        total = torch.zeros((), dtype=torch.float64 if compute == torch.float64 else torch.float32,
                            device=hidden.device)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=total.dtype)
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s:s + chunk].to(compute), labels[s:s + chunk]
            logits = (h @ w.T).to(total.dtype)  # as the model's head gives them, then upcast (HF's loss)
            live = y != IGNORE_INDEX
            picked = torch.where(live, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, picked[:, None])[:, 0]) * live).sum()
            p = torch.exp(logits - lse[:, None])  # d(loss)/d(logits): softmax - one-hot, on live rows
            p[torch.arange(len(y), device=y.device), picked] -= 1
            p = (p * live[:, None]).to(compute)
            grad_h[s:s + chunk] = (p @ w).to(hidden.dtype)
            grad_w += (p.T @ h).to(total.dtype)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), grad_w * grad_total.to(grad_w.dtype), None, None, None


def linear_cross_entropy_sum(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 4096) -> Tensor:
    """``cross_entropy_sum(hidden @ weight.T, labels)`` for an LM head without a bias or anything after
    it, ``chunk`` rows of logits at a time: peak memory one chunk's ``[chunk, V]`` float32 logits
    instead of all ``T``'s (8 GiB at 16K tokens and a 128K vocabulary). Under autocast the GEMMs run
    in its dtype, as the model's head would. ``hidden`` [..., D], ``labels`` [...] aligned."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = hidden.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                         chunk, compute)
