"""Options declared once: a config dataclass's field says its type, default, bounds and help;
the check of every value and the command-line flag are made from that one declaration.

    @dataclass(frozen=True)
    class HttpLimits:
        max_headers: int = option(64, "header fields; more: 431", ge=1)
        keep_alive_s: float = option(5.0, "seconds an idle connection stays open", gt=0, flag="--keep-alive")

        def __post_init__(self) -> None:
            check_fields(self)

    add_flags(parser, HttpLimits)                 # --max-headers, --keep-alive, with their help and defaults
    limits = from_flags(HttpLimits, args)         # the dataclass back from the parsed flags

The check follows the field's annotation: ``int`` is an integer and never a bool, ``float`` a
finite number (an int is one; a bool is not), ``str`` a string, ``bool`` a bool, ``X | None``
also None, ``tuple[str, ...]`` a tuple of strings, any other class an instance of it; then the
bounds (``ge``, ``gt``, ``le``) and ``choices``. A field declared with plain ``field()`` or a
plain default is checked by type only and gets no flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from .errors import InputError

_OPTION = "obclip.option"


@dataclasses.dataclass(frozen=True)
class Option:
    """What a field's metadata holds: its help, bounds, choices and flag."""

    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None          # the command-line name; default: --field-name
    cli: bool = True                 # False: checked, but no flag (set in code only)
    metavar: str | None = None       # the value's name in --help


def option(default: Any = dataclasses.MISSING, help: str = "", *, ge: float | None = None,
           gt: float | None = None, le: float | None = None, choices: Sequence[str] | None = None,
           flag: str | None = None, cli: bool = True, metavar: str | None = None,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its check and its flag (see the module docstring)."""
    meta = {_OPTION: Option(help, ge, gt, le, None if choices is None else tuple(choices), flag, cli, metavar)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_of(f: dataclasses.Field[Any]) -> Option | None:
    value = f.metadata.get(_OPTION)
    return value if isinstance(value, Option) else None


_HINTS: dict[type, dict[str, Any]] = {}
_OPTIONS: dict[type, dict[str, Option | None]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (hint, False)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _describe(base: Any, opt: Option | None, optional: bool) -> str:
    if base is int or base is float:
        noun = "an integer" if base is int else "a number"
        bounds = []
        if opt is not None and opt.gt == 0 and opt.ge is None:
            noun = "a positive integer" if base is int else "a positive number"
        elif opt is not None and opt.gt is not None:
            bounds.append(f"> {opt.gt:g}")
        if opt is not None and opt.ge is not None:
            bounds.append(f">= {opt.ge:g}")
        if opt is not None and opt.le is not None:
            bounds.append(f"<= {opt.le:g}")
        text = " ".join([noun, " and ".join(bounds)]).strip()
    elif opt is not None and opt.choices is not None:
        text = "one of " + ", ".join(opt.choices)
    elif base is str:
        text = "a string"
    elif base is bool:
        text = "True or False"
    elif typing.get_origin(base) is tuple:
        text = "a tuple of strings"
    else:
        text = f"a {getattr(base, '__name__', base)}"
    return text + (" or None" if optional else "")


def _valid(value: Any, base: Any, opt: Option | None) -> bool:
    if base is bool:
        return isinstance(value, bool)
    if base is int or base is float:
        if isinstance(value, bool) or not isinstance(value, int if base is int else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if opt is None:
            return True
        return ((opt.ge is None or value >= opt.ge) and (opt.gt is None or value > opt.gt)
                and (opt.le is None or value <= opt.le))
    if base is str:
        return isinstance(value, str) and (opt is None or opt.choices is None or value in opt.choices)
    origin = typing.get_origin(base)
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if isinstance(origin, type):       # dict[str, str] and the like: the container's type
        return isinstance(value, origin)
    if isinstance(base, type):
        return isinstance(value, base)
    return True    # an annotation this checker does not read (e.g. a Protocol): left to the class


def check_value(cls: type, name: str, value: Any) -> None:
    """InputError naming the field, what it must be and what it got, unless ``value`` fits field ``name``."""
    base, optional = _split_optional(_hints(cls)[name])
    if value is None and optional:
        return
    opt = _options(cls).get(name)
    if not _valid(value, base, opt):
        raise InputError(f"{name} must be {_describe(base, opt, optional)}, got {value!r}")


def _options(cls: type) -> dict[str, Option | None]:
    if cls not in _OPTIONS:
        _OPTIONS[cls] = {f.name: option_of(f) for f in dataclasses.fields(cls)}
    return _OPTIONS[cls]


def check_fields(config: Any) -> None:
    """Check every field of a config dataclass against its declaration (call in __post_init__)."""
    cls = type(config)
    for name in _options(cls):
        check_value(cls, name, getattr(config, name))


# -- command-line flags ----------------------------------------------------------------------------
def flag_of(f: dataclasses.Field[Any]) -> str:
    opt = option_of(f)
    return opt.flag if opt is not None and opt.flag else "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
              skip: Sequence[str] = ()) -> None:
    """One flag per option field of ``cls`` (in declaration order), with its help and default.

    A bool defaulting to False is ``--flag`` (store_true); one defaulting to True is its
    ``--no-...`` flag (store_false). ``X | None`` takes X. ``tuple[str, ...]`` takes several values.
    """
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        opt = option_of(f)
        if opt is None or not opt.cli or f.name in skip:
            continue
        base, optional = _split_optional(hints[f.name])
        default = _default(f)
        flag = flag_of(f)
        if base is bool:
            parser.add_argument(flag, dest=f.name, action="store_false" if default else "store_true",
                                help=opt.help)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        shown = "" if default is None or "default" in opt.help else " (default %(default)s)"
        if typing.get_origin(base) is tuple:
            kwargs.update(nargs="*", default=list(default or ()))
            shown = ""
        elif base in (int, float):
            kwargs["type"] = base
        if opt.choices is not None:
            kwargs["choices"] = list(opt.choices)
        if opt.choices is None:   # named after the flag, not the field (--timeout SECONDS, not REQUEST_TIMEOUT_S)
            kwargs["metavar"] = opt.metavar or flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, help=opt.help + shown, **kwargs)


def from_flags(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """``cls`` built from the flags ``add_flags`` made (and ``given`` for the other fields)."""
    hints = _hints(cls)
    values = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in values or not hasattr(args, f.name):
            continue
        opt = option_of(f)
        if opt is None or not opt.cli:
            continue
        value = getattr(args, f.name)
        if typing.get_origin(_split_optional(hints[f.name])[0]) is tuple:
            value = tuple(value)
        values[f.name] = value
    return cls(**values)
