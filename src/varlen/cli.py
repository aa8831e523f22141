"""The ``varlen`` command: ``varlen info``, ``varlen bench``, ``varlen train``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"info": "varlen.info", "bench": "varlen.bench", "train": "varlen.train.cli"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: varlen {info,bench,train} [options]   (varlen COMMAND --help for each)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
