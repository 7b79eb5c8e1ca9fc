"""Flags made from config dataclass fields: default and help come from the field itself, so a flag
cannot drift from its field, and every number is checked where the flag is defined.

The fields are read with `ast` from the module's source (default values are literals there), so
building the parser imports neither torch nor megatron; a test compares what is read with the real
dataclasses.
"""

from __future__ import annotations

import argparse
import ast
import functools
import sys
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True, kw_only=True)
class FieldInfo:
    """One field of a config dataclass, as declared."""

    name: str
    """The field's name."""
    default: Any
    """Its default value (a literal)."""
    doc: str
    """The docstring under it, joined to one line."""


@functools.lru_cache(maxsize=None)
def config_fields(module: str, cls: str) -> dict[str, FieldInfo]:
    """Fields of dataclass `cls` in `module` that have a literal default and a docstring."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"module {module} not found")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    body = next(node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name == cls)
    out = {}
    for node, after in zip(body, body[1:] + [None]):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None):
            continue
        if not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            continue
        try:
            default = ast.literal_eval(node.value)
        except ValueError:  # a default_factory: not a flag
            continue
        out[node.target.id] = FieldInfo(name=node.target.id, default=default, doc=" ".join(after.value.value.split()))
    return out


class Bounded:
    """An argparse `type` for a number with a lower bound: `--flag -1` fails while the flags are
    parsed, naming the flag (argparse prefixes "argument --flag:")."""

    def __init__(self, kind: type, minimum: float, *, strict: bool = False) -> None:
        self.kind, self.minimum, self.strict = kind, minimum, strict
        self.__name__ = kind.__name__

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}") \
                from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < self.minimum or (self.strict and value == self.minimum):
            relation = ">" if self.strict else ">="
            raise argparse.ArgumentTypeError(f"must be {relation} {self.minimum}, got {text}")
        return value

    def __repr__(self) -> str:
        return f"Bounded({self.kind.__name__}, {'>' if self.strict else '>='} {self.minimum})"


def positive(kind: type = int) -> Bounded:
    """An integer >= 1, or a float > 0."""
    return Bounded(int, 1) if kind is int else Bounded(float, 0.0, strict=True)


def non_negative(kind: type = int) -> Bounded:
    """A number >= 0."""
    return Bounded(kind, 0)


class FieldDefault(int):
    """A default that was not given on the command line (an int equal to the field's default), so a
    derived value may replace it with a note while an explicit value is taken as given."""


def field_argument(group, module: str, cls: str, name: str, *, flag: Optional[str] = None,
                   type: Optional[Callable] = None, choices=None, note: str = "", **kwargs) -> argparse.Action:
    """Add the flag of one config field (default `--name-with-dashes`); its help is the field's docstring
    followed by `note` and the default. Booleans that default to False become store_true flags,
    Optional booleans --flag/--no-flag. The action remembers its field (`action.field`)."""
    info = config_fields(module, cls)[name]
    flag = flag or "--" + name.replace("_", "-")
    default = info.default
    doc = (info.doc + (f" {note}" if note else "")).replace("%", "%%")  # argparse formats help with %
    if isinstance(default, bool):
        action = group.add_argument(flag, action="store_true", default=default, help=doc, **kwargs)
    elif default is None and type is None:
        action = group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc, **kwargs)
    else:
        shown = f" (default {default})" if default not in (None, (), "") else ""
        if isinstance(default, int) and type is not None:
            default = FieldDefault(default)
        action = group.add_argument(flag, type=type, choices=choices, default=default, help=doc + shown, **kwargs)
    action.field = (module, cls, name)
    return action


def short_run_warmup(warmup: int, iters: int, *, flag: str, iters_flag: str) -> int:
    """A warm-up as given; its default, when it is not below the run's steps (a short run), is cut to
    a tenth of the run with a note on stderr, so that no default makes a run fail."""
    if isinstance(warmup, FieldDefault) and warmup >= iters:
        short = iters // 10
        print(f"note: the default --{flag.replace('_', '-')} {int(warmup)} is not below --{iters_flag.replace('_', '-')} "
              f"{iters}; warming up for {short} steps (a tenth of the run)", file=sys.stderr, flush=True)
        return short
    return int(warmup)
