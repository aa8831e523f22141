"""argparse types that refuse a bad number or name at parse time, with argparse's one-line error."""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn

import torch

from .options import option

# A learning rate or any number the run multiplies float32 weights by: beyond this it is inf there.
FLOAT32_MAX = torch.finfo(torch.float32).max


def _number(kind, low, strict: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what} (not finite)")
        if kind is float and abs(value) > FLOAT32_MAX:
            raise argparse.ArgumentTypeError(f"{text} is not {what} (it overflows float32, whose largest is "
                                             f"{FLOAT32_MAX:.3g})")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, False, "a positive integer")
nonneg_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a number > 0")
nonneg_float = _number(float, 0.0, False, "a number >= 0")


def backend_name(text: str) -> str:
    """``auto``, a backend of :data:`varlen.attention.BACKENDS`, or ``flash:<impl>``: unknown names are
    refused here, before any data is read (whether it can run on this machine is decided later)."""
    from .attention.api import backend_module, split_backend

    if text != "auto":
        try:
            backend_module(split_backend(text)[0])
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


backend_name.__name__ = "an attention backend"


def device_name(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (one GPU of several); whether it exists here is
    :func:`device_problem`'s to say, once the command knows it needs it."""
    kind, sep, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (sep and (kind == "cpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r} is not cpu, cuda or cuda:N")
    return text


device_name.__name__ = "a device"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


BACKEND_CHOICES = "auto, flash, flash:fa4|fa2|torch, xformers, flex, sdpa, nested, reference"


def backend_option(what: str = "attention backend", default: str = "auto"):
    """The ``--backend`` field every command's options spell alike (:func:`varlen.options.option`)."""
    return option(default, f"{what}: {BACKEND_CHOICES}", type=backend_name)


def device_option(more: str = ""):
    """The ``--device`` field every command's options spell alike; ``more``: what it means there."""
    return option(default_device(), "cpu, cuda or cuda:N" + (f" ({more})" if more else ""), type=device_name)


def device_problem(name: str) -> str | None:
    """Why ``name`` (a :func:`device_name`) cannot be used on this machine, or None."""
    if name == "cpu":
        return None
    if not torch.cuda.is_available():
        return f"--device {name}: no CUDA device here; pass --device cpu"
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
    return None


def usage_error(prog: str, message: str) -> NoReturn:
    """A bad argument found after parsing: argparse's one-line form and exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def runtime_error(prog: str, message: str) -> NoReturn:
    """A failure while running (a stalled rank, a non-finite loss, a failed save): one line, exit code 1."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


# One spelling of each dtype across the commands (the short one, as run.json records it); torch's
# long names are taken too.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LONG = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(*allowed: str):
    """An argparse type taking ``allowed`` short dtype names (or torch's long ones), returning the short."""
    def parse(text: str) -> str:
        short = _LONG.get(text, text)
        if short not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(allowed)}")
        return short

    parse.__name__ = "dtype"
    return parse
