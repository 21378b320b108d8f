"""How `--help` reads: commands in workflow order, value names instead of Python types.

Every manifpt app is an :class:`App`; its groups list commands in the order they were mounted
(or in ``order``), and every option without a ``metavar`` gets a plain one (``N``, ``PATH``,
``TEXT``; none for a flag), so no ``<bool>`` or ``<list[Path]>`` reaches the reader.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin

import typer
from typer.core import TyperCommand, TyperGroup

# A value's type (Python's for Typer ≥ 0.20, Click's name before) → the metavar an option shows
# when it does not name its value.
TYPE_METAVARS = {int: "N", float: "NUMBER", str: "TEXT", Path: "PATH"}
CLICK_TYPE_METAVARS = {"integer": "N", "integer range": "N", "float": "NUMBER", "float range": "NUMBER", "path": "PATH"}


def _value_type(param) -> object:
    """The Python type of one value of ``param`` (``int`` for ``list[int]``), or Click's type name."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:
        return CLICK_TYPE_METAVARS.get(param.type.name, param.type.name)
    annotation = descriptor.annotation
    while get_origin(annotation) in (list, Union, UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    return annotation


def _metavar(param) -> str:
    if param.param_type_name == "argument":
        return param.name.upper()
    if getattr(param, "is_flag", False):
        return ""  # a flag takes no value
    value_type = _value_type(param)
    if isinstance(value_type, type) and issubclass(value_type, Enum):
        return "|".join(str(member.value) for member in value_type)
    if isinstance(value_type, str):
        return value_type.upper()
    return TYPE_METAVARS.get(value_type, "VALUE")


class _PlainMetavars:
    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if param.metavar is None:
                param.metavar = _metavar(param)
            if param.param_type_name == "argument":
                # Typer prints an argument's Python type beside its name; the name says enough.
                param.display_type_rich = lambda ctx: None
        return params


class HelpCommand(_PlainMetavars, TyperCommand):
    """A command whose usage line names arguments as Click does (``SUSPECT...``, ``[ROOT]``)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class HelpGroup(_PlainMetavars, TyperGroup):
    """A group that lists its commands in mount order (Typer lists sub-apps after commands)."""

    order: tuple[str, ...] = ()

    def list_commands(self, ctx) -> list[str]:
        names = list(self.commands)
        known = [name for name in self.order if name in self.commands]
        # A command missing from ``order`` goes before the last one (the demo), not out of sight.
        unknown = [name for name in names if name not in self.order]
        return known[:-1] + unknown + known[-1:] if known else names


class App(typer.Typer):
    """A Typer app whose commands read as this module describes; ``order`` lists its commands."""

    def __init__(self, *, order: tuple[str, ...] = (), **kwargs) -> None:
        group = type("OrderedGroup", (HelpGroup,), {"order": order})
        super().__init__(cls=group, rich_markup_mode="rich", no_args_is_help=True, **kwargs)

    def command(self, *args, **kwargs):
        return super().command(*args, cls=HelpCommand, **kwargs)
