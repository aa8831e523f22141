"""The ``varlen`` command: ``varlen info``, ``varlen bench``, ``varlen train``, ``varlen check``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"info": "varlen.info", "bench": "varlen.bench.cli", "train": "varlen.train.cli", "check": "varlen.check_cli"}
    usage = "usage: varlen [--version] {info,bench,train,check} [options]   (varlen COMMAND --help for each)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv and argv[0] == "--version":
        from . import __version__

        print(f"varlen {__version__}")
        return 0
    if not argv or argv[0] not in commands:
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"varlen: {what}\n{usage}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
