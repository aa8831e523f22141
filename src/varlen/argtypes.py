"""argparse types that refuse a bad number at parse time, with argparse's one-line error."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def _number(kind, low, strict: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, False, "a positive integer")
nonneg_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a number > 0")


def usage_error(prog: str, message: str) -> NoReturn:
    """A bad argument found after parsing: argparse's one-line form and exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)
