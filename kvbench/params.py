"""Typed, validated parameters for plugins (methods and tasks are dataclasses).

A field's type annotation gives its type; `field(metadata={"choices": (...), "help": "..."})`
gives allowed values and a description. `build` turns a YAML mapping into an instance and
reports the exact place of any problem, e.g. `methods[2].params.bits: 5 is not one of 2, 3, 4, 8`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from kvbench.errors import ConfigError, did_you_mean


class ParamError(ValueError):
    """Raised by a plugin's __post_init__ for a bad value: `ParamError("bits", "must be ...")`."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ParamError(field, message)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: Any
    default: Any
    choices: tuple | None
    help: str

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in args)
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def describe(cls) -> list[ParamInfo]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        out.append(
            ParamInfo(
                name=f.name,
                type=hints[f.name],
                default=default,
                choices=f.metadata.get("choices"),
                help=f.metadata.get("help", ""),
            )
        )
    return out


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null")
        return None
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {value!r} is not a list")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)}")
    return value


def build(cls, params: dict[str, Any] | None, where: str):
    """Instantiate the dataclass `cls` from a mapping, with errors naming `where.<param>`."""
    params = dict(params or {})
    infos = {p.name: p for p in describe(cls)}
    for key in params:
        if key not in infos:
            raise ConfigError(
                f"{where}.{key}: unknown parameter of {cls.name!r}{did_you_mean(key, infos)}; "
                f"allowed: {', '.join(infos)}"
            )
    values = {}
    for key, value in params.items():
        info = infos[key]
        value = _coerce(value, info.type, f"{where}.{key}")
        if info.choices is not None and value not in info.choices:
            raise ConfigError(f"{where}.{key}: {value!r} is not one of {', '.join(map(str, info.choices))}")
        values[key] = value
    try:
        return cls(**values)
    except ParamError as e:
        raise ConfigError(f"{where}.{e.field}: {e.message}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
