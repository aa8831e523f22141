"""Non-finite values never reach the weights or a checkpoint.

Read every step (the default), the loss and the gradients' norm are read in one host read before
the optimizer's update: a NaN or inf there stops the run with the weights of the step before.
Read every N steps (``FiniteGuard(defer=True)``), nothing is read between reads: a non-finite step
sets a flag on the device that a fused optimizer's update honours (``found_inf``, as AMP's
GradScaler uses it), so that step's update and every later one is skipped until the next read
stops the run with the same weights. The weights' norm after an update (a learning rate that
overflows them) is computed on the device right away and read with the next values, or before a
checkpoint is written, so no extra synchronisation is added to a step.
"""

from __future__ import annotations

import math

import torch

from ..engine import StepStats, total_norm


class NonFinite(Exception):
    """The message names the step and the value."""


class FiniteGuard:
    def __init__(self, params, defer: bool = False):
        self.params = list(params)
        self.pending: torch.Tensor | None = None  # the weights' norm after the last update, not yet read
        self.pending_step = 0
        self.defer = defer
        self.bad: torch.Tensor | None = None  # deferred: a non-finite step since the start (device bool)
        self.window: list[tuple[int, torch.Tensor | None, torch.Tensor]] = []  # deferred, not yet read

    def before_update(self, stats: StepStats, step: int, optimizer=None) -> tuple[float, float] | None:
        """Read the step's loss and gradient norm (and the last update's weight norm) in one go;
        raise :class:`NonFinite` before the update if any is not finite. Returns (loss, grad_norm).
        Deferred: nothing is read; a non-finite value makes ``optimizer`` (fused) skip this update
        and every later one, and :meth:`read` raises."""
        values = torch.stack([stats.loss.float().reshape(()), stats.grad_norm.float().reshape(()).to(stats.loss.device)])
        if self.defer:
            finite = torch.isfinite(values).all()
            self.bad = ~finite if self.bad is None else self.bad | ~finite
            optimizer.found_inf = self.bad.float()  # read by the fused update: 1 skips it
            self.window.append((step, self.pending, values))
            self.pending = None
            return None
        if self.pending is not None:
            values = torch.cat([values, self.pending.float().reshape(1).to(values.device)])
        read = values.tolist()
        if len(read) == 3:
            self.pending = None
            self._weights(read[2], step - 1)
        return self._check(step, read[0], read[1])

    def read(self) -> tuple[list[tuple[float, float]], NonFinite | None]:
        """Deferred: the (loss, grad_norm) of each step since the last read, in one host read, up to
        the first step with a non-finite value, and the :class:`NonFinite` naming it (its update and
        every later one were skipped on the device: the weights are the step before's)."""
        steps, self.window = self.window, []
        if not steps:
            return [], None
        zero = steps[0][2].new_zeros(1)
        flat = torch.cat([torch.cat([(w.float().reshape(1) if w is not None else zero), v]) for _, w, v in steps])
        out = []
        for (step, weights, _), (norm_before, loss, norm) in zip(steps, flat.view(len(steps), 3).tolist()):
            try:
                if weights is not None:
                    self._weights(norm_before, step - 1)
                out.append(self._check(step, loss, norm))
            except NonFinite as e:
                return out, e
        return out, None

    def _check(self, step: int, loss: float, norm: float) -> tuple[float, float]:
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
            norm, self.pending = float(self.pending), None
            self._weights(norm, self.pending_step)

    @staticmethod
    def _weights(norm: float, step: int) -> None:
        if not math.isfinite(norm):
            raise NonFinite(f"the weights are not finite after step {step}'s update (their norm is {norm}); "
                            "nothing of that step was saved (lower --lr)")
