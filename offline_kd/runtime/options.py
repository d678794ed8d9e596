"""Command-line options generated from the settings dataclasses of `offline_kd.runtime.settings`.

A setting is declared once, as a dataclass field made by `setting(...)`: its type, default and help.
`add_arguments` (argparse: ``cli/train.py``) and `click_options` (click: ``kd precompute``,
``kd eval``) build the options from those fields; `from_namespace` and `from_click_params` build
the dataclass back from the parsed values.

A flag is the field's name with dashes (``max_steps`` → ``--max-steps``) unless the field names its
``flags``; a nested dataclass field (``TrainConfig.loss``) adds its own fields, without a prefix.
By type:

- ``bool``: a flag when the default is False (``--resume``), a pair when it is True
  (``--kl-tail/--no-kl-tail``);
- ``int``, ``float``, ``str`` (or None): one value;
- ``list[str]``: repeatable (``--corpus A --corpus B``); ``list[float]``/``list[int]``:
  comma-separated (``--temperatures 1,2``);
- ``dict``: repeatable ``KEY=VALUE`` (``--storage-option anon=true``).

``deprecated`` flags still work and warn (``FutureWarning``) naming the new flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

KINDS = ("value", "flag", "switch", "list", "csv", "mapping")


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    flags: tuple[str, ...] = (),
    deprecated: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    group: str | None = None,
    metavar: str | None = None,
    hidden: bool = False,
    cli: bool = True,
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A dataclass field carrying its command-line description.

    `factory` replaces `default` for mutable defaults (lists, nested dataclasses); `group` is the
    argparse help section; `hidden` keeps a flag out of ``--help``; ``cli=False`` keeps a setting
    off the command line (library use only). `at_least`, `above` and `below` bound a number
    (`check_ranges` refuses a value outside them; None always passes).
    """
    metadata = dict(
        help=help, flags=tuple(flags), deprecated=tuple(deprecated), choices=choices, group=group,
        metavar=metavar, hidden=hidden, cli=cli, at_least=at_least, above=above, below=below,
    )  # fmt: skip
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    """One command-line option: which field it sets and how it parses."""

    path: tuple[str, ...]  # field names from the top dataclass, e.g. ("loss", "alpha_kl")
    flags: tuple[str, ...]
    kind: str  # one of KINDS
    type: type  # of one value (the element type for lists)
    default: Any  # the dataclass default; MISSING when the option is required
    help: str
    group: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    hidden: bool = False
    deprecated: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def dest(self) -> str:
        """The parsed value's name (argparse dest, click parameter name)."""
        return "__".join(self.path)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def _value_type(hint: Any) -> Any:
    """The type without None: ``int | None`` → int; ``str | dict | None`` → str (the first)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)][0]
    return hint


def _kind(hint: Any, default: Any) -> tuple[str, type]:
    base = _value_type(hint)
    origin = typing.get_origin(base) or base
    if origin is list:
        (elem,) = typing.get_args(base)
        return ("list" if elem is str else "csv"), elem
    if origin is dict:
        return "mapping", str
    if base is bool:
        return ("switch" if default is True else "flag"), bool
    return "value", base


def options(cls: type, prefix: tuple[str, ...] = (), group: str | None = None) -> list[Option]:
    """The command-line options of a settings dataclass, in field order (nested ones flattened)."""
    hints = typing.get_type_hints(cls)
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += options(hint, prefix + (f.name,), meta.get("group") or group)
            continue
        default = _field_default(f)
        kind, value_type = _kind(hint, default)
        if meta.get("deprecated") and kind != "value":
            raise TypeError(f"{cls.__name__}.{f.name}: deprecated flags are only supported for values")
        out.append(
            Option(
                path=prefix + (f.name,),
                flags=meta.get("flags") or ("--" + f.name.replace("_", "-"),),
                kind=kind,
                type=value_type,
                default=default,
                help=meta.get("help", ""),
                group=meta.get("group") or group,
                choices=meta.get("choices"),
                metavar=meta.get("metavar"),
                hidden=meta.get("hidden", False),
                deprecated=meta.get("deprecated", ()),
            )
        )
    return out


def build(cls: type, values: dict[tuple[str, ...], Any], prefix: tuple[str, ...] = ()) -> Any:
    """`cls` from values keyed by field path; settings without a value keep their default."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + (f.name,)
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values, path)
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


def from_fields(cls: type, **values: Any) -> Any:
    """`cls` from values named by their field, nested sections included, as on the command line:
    ``from_fields(TrainConfig, store=..., save_every=5)`` sets ``TrainConfig.checkpoint.save_every``.
    A nested section can also be passed whole (``loss=LossConfig(...)``)."""
    paths = {opt.path[-1]: opt.path for opt in options(cls)}
    hints = typing.get_type_hints(cls)
    sections = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}
    keyed: dict[tuple[str, ...], Any] = {}
    whole = {k: values.pop(k) for k in list(values) if k in sections}
    for name, value in values.items():
        if name not in paths:
            raise TypeError(f"{cls.__name__} has no setting {name!r}")
        keyed[paths[name]] = value
    built = build(cls, keyed)
    return dataclasses.replace(built, **whole) if whole else built


def _out_of_range(meta, value) -> str | None:
    """Why a number is outside its field's bounds, or None."""
    if meta.get("at_least") is not None and value < meta["at_least"]:
        return f"must be at least {meta['at_least']:g}"
    if meta.get("above") is not None and value <= meta["above"]:
        return f"must be above {meta['above']:g}"
    if meta.get("below") is not None and value >= meta["below"]:
        return f"must be below {meta['below']:g}"
    return None


def check_ranges(obj: Any) -> None:
    """Refuse, in one line naming the flag, any number of a settings dataclass (nested sections too) outside
    the bounds its declaration gives."""
    from offline_kd.runtime.errors import UsageError

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value)
            continue
        numbers = value if isinstance(value, list) else [value]
        for v in numbers:
            if isinstance(v, int | float) and not isinstance(v, bool):
                why = _out_of_range(f.metadata, v)
                if why:
                    flag = (f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),))[0]
                    raise UsageError(f"{flag} {value}: {why}")


# ------------------------------------------------------------------------------------------ parsing


def parse_csv(text: str, value_type: type) -> list:
    """``"1,2"`` → ``[1.0, 2.0]`` for float; ValueError names the text."""
    try:
        return [value_type(x) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from e


def parse_key_value(text: str) -> tuple[str, str]:
    """``"KEY=VALUE"`` → ``("KEY", "VALUE")``; ValueError without an ``=``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _final_value(opt: Option, value: Any) -> Any:
    """The parsed value as the dataclass wants it (an unset repeatable option keeps the default)."""
    if opt.kind == "list":
        return list(value) if value else opt.default
    if opt.kind == "mapping":
        return dict(value) if value else opt.default
    return value


def _deprecation(flag: str, opt: Option) -> None:
    warnings.warn(f"{flag} is deprecated; use {opt.flags[0]}", FutureWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------ argparse


class _DeprecatedFlag(argparse.Action):
    """Stores like the option it stands for, after a warning."""

    def __init__(self, option_strings, dest, option: Option, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.option = option

    def __call__(self, parser, namespace, values, option_string=None):
        _deprecation(option_string, self.option)
        setattr(namespace, self.dest, values)


def _argparse_type(opt: Option) -> Callable[[str], Any]:
    if opt.kind not in ("csv", "mapping"):
        return opt.type  # argparse's own "invalid int value: 'x'" errors

    def parse(text: str) -> Any:
        try:
            return parse_csv(text, opt.type) if opt.kind == "csv" else parse_key_value(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argparse option per setting of `cls`, in help sections by `group`."""
    groups: dict[str, Any] = {}
    for opt in options(cls):
        target = parser
        if opt.group is not None:
            if opt.group not in groups:
                groups[opt.group] = parser.add_argument_group(opt.group)
            target = groups[opt.group]
        kw: dict[str, Any] = dict(dest=opt.dest, help=argparse.SUPPRESS if opt.hidden else opt.help)
        if opt.required:
            kw["required"] = True
        else:
            kw["default"] = None if opt.kind in ("list", "mapping") else opt.default
        if opt.kind == "flag":
            kw["action"] = "store_true"
        elif opt.kind == "switch":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            metavar = opt.metavar or opt.path[-1].upper()
            kw.update(type=_argparse_type(opt), choices=opt.choices, metavar=metavar)
            if opt.kind in ("list", "mapping"):
                kw["action"] = "append"
        target.add_argument(*opt.flags, **kw)
        if opt.deprecated:
            target.add_argument(
                *opt.deprecated, dest=opt.dest, type=_argparse_type(opt), default=argparse.SUPPRESS,
                help=argparse.SUPPRESS, action=_DeprecatedFlag, option=opt,
            )  # fmt: skip


def from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """The settings dataclass from `add_arguments`' parsed options."""
    return build(cls, {o.path: _final_value(o, getattr(namespace, o.dest)) for o in options(cls)})


# ------------------------------------------------------------------------------------------ click


def _click_option(opt: Option):
    import click

    kw: dict[str, Any] = dict(help=opt.help, hidden=opt.hidden, required=opt.required)
    decls: list[str] = list(opt.flags)
    if opt.kind == "switch":
        decls = [f"{f}/--no-{f[2:]}" for f in opt.flags]
    if not opt.required:
        kw["default"] = opt.default
        kw["show_default"] = opt.default is not None
    if opt.kind == "flag":
        kw["is_flag"] = True
    elif opt.kind == "list":
        kw.update(multiple=True, type=opt.type)
        kw.pop("default", None)
    elif opt.kind == "mapping":
        kw.update(multiple=True, metavar=opt.metavar or "KEY=VALUE", callback=_click_callback(opt))
        kw.pop("default", None)
    elif opt.kind == "csv":
        kw.update(type=str, callback=_click_callback(opt), metavar=opt.metavar)
        if opt.default not in (MISSING, None):
            kw["default"] = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in opt.default)
    elif opt.kind == "value":
        kw.update(type=click.Choice(opt.choices) if opt.choices else opt.type, metavar=opt.metavar)
    return click.option(*decls, opt.dest, **kw)


def _click_callback(opt: Option):
    import click

    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            if opt.kind == "csv":
                return parse_csv(value, opt.type)
            return [parse_key_value(v) for v in value]
        except ValueError as e:
            raise click.BadParameter(str(e)) from e

    return parse


def _click_deprecated(opt: Option):
    import click

    def warn(ctx, param, value):
        if value is not None:
            _deprecation(param.opts[0], opt)
        return value

    return click.option(
        *opt.deprecated, opt.dest + "__deprecated", type=opt.type, default=None, hidden=True, callback=warn
    )


def click_options(cls: type) -> Callable:
    """A decorator adding one click option per setting of `cls` (in field order) to a command."""

    def decorate(fn: Callable) -> Callable:
        for opt in reversed(options(cls)):
            if opt.deprecated:
                fn = _click_deprecated(opt)(fn)
            fn = _click_option(opt)(fn)
        return fn

    return decorate


def from_click_params(cls: type, params: dict[str, Any]) -> Any:
    """The settings dataclass from `click_options`' parameters (other parameters are refused)."""
    params = dict(params)
    values = {}
    for opt in options(cls):
        value = params.pop(opt.dest)
        if opt.deprecated:
            alias = params.pop(opt.dest + "__deprecated")
            value = value if alias is None else alias
        values[opt.path] = _final_value(opt, value)
    if params:
        raise TypeError(f"parameters that are not settings of {cls.__name__}: {sorted(params)}")
    return build(cls, values)
