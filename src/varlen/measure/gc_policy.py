"""Python's garbage collector kept out of timed steps, for ``varlen train`` and ``varlen bench`` alike."""

from __future__ import annotations

import gc


class GarbageCollection:
    """Python's automatic collector off; a young-generation collection every ``every`` steps instead,
    on every rank at the same step (``every=0`` leaves Python's collector alone).

    An automatic collection stops a process for milliseconds to tens of them at a moment of its own
    choosing. With several ranks every step waits for whichever rank collected, so the pauses of all
    ranks add up; collecting at the same step on all ranks makes them one pause (torchtitan does this).
    """

    def __init__(self, every: int):
        self.every, self.steps = every, 0
        if every > 0:
            gc.disable()
            gc.collect()

    def step(self) -> None:
        """Call once per step, outside anything timed."""
        self.steps += 1
        if self.every > 0 and self.steps % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        if self.every > 0:
            gc.enable()
