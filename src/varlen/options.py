"""Typed option groups whose command-line flags are generated from their fields.

A group is a frozen dataclass whose fields are made with :func:`option`: the field's name is the
flag (``reduce_dtype`` -> ``--reduce-dtype``), its default the flag's, and the rest (help, type,
choices, action) goes to ``argparse`` as it is. Commands add a group's flags with :func:`add_flags`
and read it back with :func:`from_args`, so two commands that take a group spell, default and check
its flags alike.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, field, fields


def option(default, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (), **argparse_kwargs):
    """A field of an option group: its default and what ``argparse`` needs for its flag. ``flag``
    spells the flag otherwise than the field's name does (as another command spells the same
    setting); ``aliases`` are older spellings that still parse."""
    return field(default=default, metadata={"help": help, "flag": flag, "aliases": aliases, **argparse_kwargs})


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(group: type, p: argparse.ArgumentParser) -> None:
    """One ``--flag`` for each field of ``group``, its default the field's."""
    for f in _flagged(group):
        kwargs = {k: v for k, v in f.metadata.items() if k not in ("flag", "aliases")}
        p.add_argument(f.metadata.get("flag") or flag_of(f.name), *f.metadata.get("aliases", ()), dest=f.name,
                       default=f.default, **kwargs)


def from_args(group: type, args: argparse.Namespace):
    return group(**{f.name: getattr(args, f.name) for f in _flagged(group)})


def _flagged(group: type) -> list:
    """The fields made with :func:`option` (a group may hold other groups, whose flags are their own)."""
    return [f for f in fields(group) if "help" in f.metadata]


def changed(options) -> dict[str, object]:
    """The fields set away from their defaults, as the flags spell them."""
    return {f.name: getattr(options, f.name) for f in fields(options)
            if f.default is not MISSING and getattr(options, f.name) != f.default}
