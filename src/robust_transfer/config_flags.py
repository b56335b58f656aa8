"""Command-line flags generated from a configuration dataclass's fields, so each setting is described once.

A field becomes a flag when its metadata has ``help``; the flag's type comes from the field's annotation
(``int``, ``float``, ``str``, their ``| None`` forms, ``list[...]`` as several values, ``dict`` as a
repeatable ``NAME=VALUE``, ``bool`` as a switch: ``--no-NAME`` for a default of True, ``--NAME`` for
False). Metadata may also set ``flag`` (another name), ``parse`` (a function reading the text, e.g.
``parse_eps`` for ``8/255``), ``choices``, ``required`` and ``nargs``. Defaults are shown by the parser's
``ArgumentDefaultsHelpFormatter``, never written into the help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING
from typing import Any

from .attack import APGD_STEPS, ATTACK_KINDS, Attack
from .parsing import parse_eps, parse_options


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default once: not for required flags, switches, None, or help that already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def helped(help: str, **more: Any) -> dict[str, Any]:
    """Field metadata for a flag: ``field(default=..., metadata=helped("what it is"))``."""
    return {"help": help, **more}


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not MISSING else field.default


def _base(annotation: Any) -> Any:
    """``int | None`` -> ``int``; other annotations as they are."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return options[0] if len(options) == 1 else str
    return annotation


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``cls`` that has help in its metadata (``skip`` leaves some out)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "help" not in meta or field.name in skip:
            continue
        flag = meta.get("flag", "--" + field.name.replace("_", "-"))
        kind, default = _base(hints[field.name]), _default(field)
        options: dict[str, Any] = {"dest": field.name, "help": meta["help"]}
        if kind is bool:
            if default:
                flag = meta.get("flag", "--no-" + field.name.replace("_", "-"))
            # The config's default stands unless the switch is given (so --help shows no confusing default).
            parser.add_argument(flag, action="store_false" if default else "store_true", default=argparse.SUPPRESS,
                                **options)
            continue
        if typing.get_origin(kind) is list:
            element: Callable[[str], Any] = meta.get("parse") or typing.get_args(kind)[0]
            options.update(type=element, nargs=meta.get("nargs", "*"), default=default)
        elif kind is dict or typing.get_origin(kind) is dict:
            options.update(action="append", default=argparse.SUPPRESS, metavar="NAME=VALUE")
        else:
            options.update(type=meta.get("parse") or kind, default=default)
        for key in ("choices", "required", "metavar"):
            if key in meta:
                options[key] = meta[key]
        parser.add_argument(flag, **options)


def config_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that ``args`` holds, ``NAME=VALUE`` lists read into dicts."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        kind = _base(hints[field.name])
        if (kind is dict or typing.get_origin(kind) is dict) and isinstance(value, list):
            value = parse_options(value)
        values[field.name] = value
    return values


def add_attack_flags(parser: argparse.ArgumentParser, prefix: str = "", steps: int = 20, more: bool = True,
                     what: str = "the attack") -> None:
    """``--{prefix}norm``, ``--{prefix}eps``, ``--{prefix}steps`` (and with ``more`` ``--{prefix}step-size``,
    ``--{prefix}restarts``): the settings of one `Attack`, read back by `attack_from_flags`."""
    dest = prefix.replace("-", "_")
    parser.add_argument(f"--{prefix}attack", dest=f"{dest}attack_kind", default="pgd", choices=ATTACK_KINDS,
                        help=f"{what}: pgd, autoattack (APGD-CE, APGD-T, FAB-T, Square: what RobustBench reports), "
                             "apgd (APGD-CE + APGD-T, the fast part) or one of AutoAttack's attacks")
    parser.add_argument(f"--{prefix}norm", dest=f"{dest}norm", default="l2", help=f"norm of {what}: l2 or linf")
    parser.add_argument(f"--{prefix}eps", dest=f"{dest}eps", default=None,
                        help=f"radius of {what} in [0,1] pixel units, e.g. 1.0 or 8/255 (none: no attack)")
    parser.add_argument(f"--{prefix}steps", dest=f"{dest}steps", type=int, default=None,
                        help=f"steps of {what} (default: {steps} for pgd, {APGD_STEPS} for AutoAttack's attacks)")
    parser.set_defaults(**{f"{dest}default_steps": steps})
    if more:
        parser.add_argument(f"--{prefix}step-size", dest=f"{dest}step_size", default=None,
                            help=f"step size of {what} in pixel units (default: 2.5*eps/steps)")
        parser.add_argument(f"--{prefix}restarts", dest=f"{dest}restarts", type=int, default=0,
                            help=f"extra random restarts of {what}")


def attack_from_flags(args: argparse.Namespace, prefix: str = "") -> Attack | None:
    """The `Attack` the flags of `add_attack_flags` describe; None without an eps (or with eps 0)."""
    dest = prefix.replace("-", "_")
    eps = getattr(args, f"{dest}eps")
    if eps is None or parse_eps(eps) == 0:
        return None
    step_size = getattr(args, f"{dest}step_size", None)
    kind = getattr(args, f"{dest}attack_kind")
    steps = getattr(args, f"{dest}steps")
    if steps is None:
        steps = getattr(args, f"{dest}default_steps") if kind == "pgd" else APGD_STEPS
    return Attack.of(getattr(args, f"{dest}norm"), eps, steps=steps, restarts=getattr(args, f"{dest}restarts", 0),
                     step_size=parse_eps(step_size) if step_size else None, kind=kind)
