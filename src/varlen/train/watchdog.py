"""``--stall-timeout``: a run that stops making steps ends, with one line naming who stopped.

A rank that hangs (a wedged GPU, a stalled file system, a process stopped by a signal) leaves
every other rank waiting in a collective, silently, until the process group's timeout (tens of
minutes) or forever. Each rank runs a thread that notes the rank's step and a tick in the run's
store (torchrun's TCPStore) every few seconds. When a rank has made no step for ``timeout``
seconds it reads everyone's notes: a rank whose tick no longer moves has stopped (its process is
frozen or gone), a rank at an earlier step is the one the others wait for. The lowest rank not
named prints one line, and every rank exits with code 1, so torchrun ends the job.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import timedelta

# The first step compiles (minutes for a large model): it gets this much longer than the others.
FIRST_STEP_EXTRA_S = 1800.0


class Watchdog:
    def __init__(self, timeout: float, rank: int = 0, world_size: int = 1, prog: str = "varlen train"):
        self.timeout, self.rank, self.world_size, self.prog = timeout, rank, world_size, prog
        self.step = 0
        self.beaten = False  # a step has finished since the watchdog started
        self.last = time.monotonic()
        self.ticks = 0
        self.stop = threading.Event()
        self.store = _store() if world_size > 1 else None
        self.period = max(0.5, min(timeout / 4, 10.0))
        self.thread = threading.Thread(target=self._watch, name="varlen-watchdog", daemon=True)
        if timeout > 0:
            self.thread.start()

    def beat(self, step: int | None = None) -> None:
        """Progress: a step finished (``step``), or a long phase (a checkpoint save) began or ended."""
        if step is not None:
            self.step, self.beaten = step, True
        self.last = time.monotonic()

    def close(self) -> None:
        self.stop.set()

    def _limit(self) -> float:
        return self.timeout + (0.0 if self.beaten else FIRST_STEP_EXTRA_S)

    def _watch(self) -> None:
        first = None  # everyone's notes when this rank found itself idle too long
        self._note()
        while not self.stop.wait(self.period):
            self.ticks += 1
            self._note()  # keeps ticking while deciding: the others judge this rank by it
            idle = time.monotonic() - self.last
            if idle <= self._limit() or self.stop.is_set():
                first = None
            elif self.store is None:
                self._end(idle, "this process is stuck (a kernel, the data loader or the disk)", set())
            elif first is None:
                first = (self._read(), time.monotonic())
            elif time.monotonic() - first[1] >= 2.5 * self.period:  # every live rank has ticked since
                self._end(idle, *self._verdict(first[0], self._read()))

    def _note(self) -> None:
        if self.store is not None:
            try:
                self.store.set(f"varlen/watchdog/{self.rank}", json.dumps({"step": self.step, "tick": self.ticks}))
            except Exception:  # the store's host is stuck too: found out when the others are read
                pass

    def _read(self) -> dict[int, dict | None]:
        notes = {}
        for r in range(self.world_size):
            key = f"varlen/watchdog/{r}"
            try:  # check first: get() waits for a key that is not there
                notes[r] = json.loads(self.store.get(key)) if self.store.check([key]) else None
            except Exception:
                notes[r] = None
        return notes

    def _verdict(self, before: dict, after: dict) -> tuple[str, set[int]]:
        """Who the run waits for, in words, and the ranks named."""
        frozen = {r for r in after if r != self.rank and
                  (after[r] is None or before[r] is None or after[r]["tick"] == before[r]["tick"])}
        if frozen:
            heard = lambda r: f"last heard at step {after[r]['step']}" if after[r] else "never heard from"  # noqa: E731
            who = ", ".join(f"rank {r} ({heard(r)})" for r in sorted(frozen))
            return f"{who} stopped answering: its process is frozen or gone", frozen
        low = min(a["step"] for a in after.values() if a)
        behind = {r for r, a in after.items() if a and a["step"] == low}
        if len(behind) == len(after):
            return f"every rank waits in step {low + 1} (a collective, the data loader or the disk)", set()
        names = ", ".join(f"rank {r}" for r in sorted(behind))
        return f"{names} still in step {low + 1} while the others finished it", behind

    def _end(self, idle: float, what: str, named: set[int]) -> None:
        speaker = min((r for r in range(self.world_size) if r not in named), default=self.rank)
        if self.rank == speaker:
            print(f"{self.prog}: error: no step for {idle:.0f} s after step {self.step}: {what}; "
                  f"--stall-timeout sets the limit ({self.timeout:g} s)", file=sys.stderr, flush=True)
        os._exit(1)  # the main thread may sit in a collective that never returns


def _store():
    """A client of the run's store (torchrun's, at MASTER_ADDR:MASTER_PORT), or None without one."""
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port):
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=10), wait_for_workers=False)
    except Exception:
        return None


def process_group_timeout(stall_timeout: float) -> timedelta:
    """The process group's own timeout: a backstop behind the watchdog (which fires first), long
    enough for the first step's compile on every rank."""
    return timedelta(seconds=max(stall_timeout, 300.0) + FIRST_STEP_EXTRA_S + 60.0)
