"""Non-finite values never reach the weights or a checkpoint.

Each step the loss and the gradients' norm are read in one host read, before the optimizer's
update (the loop reads the loss to log it anyway): a NaN or inf there stops the run with the
weights of the step before. The weights' norm after an update (a learning rate that overflows
them) is computed on the device right away and read with the next step's values, or before a
checkpoint is written, so no extra synchronisation is added to a step.
"""

from __future__ import annotations

import math

import torch

from .step import StepStats, total_norm


class NonFinite(Exception):
    """The message names the step and the value."""


class FiniteGuard:
    def __init__(self, params):
        self.params = list(params)
        self.pending: torch.Tensor | None = None  # the weights' norm after the last update, not yet read
        self.pending_step = 0

    def before_update(self, stats: StepStats, step: int) -> tuple[float, float]:
        """Read the step's loss and gradient norm (and the last update's weight norm) in one go;
        raise :class:`NonFinite` before the update if any is not finite. Returns (loss, grad_norm)."""
        values = [stats.loss.float(), stats.grad_norm.float()]
        if self.pending is not None:
            values.append(self.pending.float())
        read = torch.stack([v.reshape(()).to(values[0].device) for v in values]).tolist()
        if len(read) == 3:
            self._weights(read[2])
        loss, norm = read[0], read[1]
        if not math.isfinite(loss):
            raise NonFinite(f"the loss is {loss} at step {step}; the weights are left as they were after step "
                            f"{step - 1} (lower --lr, or set --max-grad-norm)")
        if not math.isfinite(norm):
            raise NonFinite(f"the gradient norm is {norm} at step {step} (loss {loss:.4g}); the weights are left as "
                            f"they were after step {step - 1} (lower --lr, or set --max-grad-norm)")
        return loss, norm

    def after_update(self, step: int) -> None:
        """Queue the weights' norm after step ``step``'s update (read later, with other values)."""
        self.pending, self.pending_step = total_norm(self.params), step

    def check_weights(self) -> None:
        """Before a checkpoint or the end: the last update's weights, read now."""
        if self.pending is not None:
            self._weights(float(self.pending))

    def _weights(self, norm: float) -> None:
        step, self.pending = self.pending_step, None
        if not math.isfinite(norm):
            raise NonFinite(f"the weights are not finite after step {step}'s update (their norm is {norm}); "
                            "nothing of that step was saved (lower --lr)")
