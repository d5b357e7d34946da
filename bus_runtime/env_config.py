"""One way to read a config dataclass from environment variables, and to write it back, driven by its fields.

`env_config(TrainerConfig, "TINKER_BUS_TRAINER_")` reads TINKER_BUS_TRAINER_<FIELD> for every field:
int / float / str, bool (1/true/yes/on, 0/false/no/off), `X | None` ("auto" or "" means None), Literal choices,
tuples (comma-separated) and nested dataclasses (<PREFIX><FIELD>_<SUBFIELD>; a field's metadata "env" renames
its part of the name). `env_of(config, prefix)` is the inverse: the variables a child process needs to rebuild
the same config. A bad value raises ValueError naming the variable.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass, replace
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")

AUTO = "auto"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(raw: str, name: str = "value") -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (use one of {', '.join(sorted(_TRUE | _FALSE))})")


def _optional_inner(tp: Any) -> Any | None:
    """X for `X | None`, else None."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0]
    return None


def _parse(tp: Any, raw: str, name: str) -> Any:
    inner = _optional_inner(tp)
    if inner is not None:
        return None if raw.strip().lower() in (AUTO, "") else _parse(inner, raw, name)
    origin = get_origin(tp)
    if origin is Literal:
        if raw not in get_args(tp):
            raise ValueError(f"{name}={raw!r} is not one of {', '.join(map(str, get_args(tp)))}")
        return raw
    if origin is tuple:
        item = get_args(tp)[0] if get_args(tp) else str
        return tuple(_parse(item, part.strip(), name) for part in raw.split(",") if part.strip())
    if tp is bool:
        return parse_bool(raw, name)
    if tp in (int, float, str):
        try:
            return tp(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a valid {tp.__name__}") from None
    raise TypeError(f"{name}: fields of type {tp!r} cannot be read from the environment")


def _var(prefix: str, f: Any) -> str:
    return prefix + str(f.metadata.get("env", f.name)).upper()


def env_config(cls: type[T], prefix: str, environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """An instance of dataclass `cls` from `environ` (default os.environ), then `overrides` on top."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        tp, var = hints[f.name], _var(prefix, f)
        if is_dataclass(tp):
            values[f.name] = env_config(tp, var + "_", environ)  # type: ignore[arg-type]
        elif (raw := environ.get(var)) is not None:
            values[f.name] = _parse(tp, raw, var)
    return replace(cls(**values), **overrides)  # type: ignore[type-var]


def _render(value: Any) -> str:
    if value is None:
        return AUTO
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(_render(v) for v in value)
    return str(value)


def env_of(config: Any, prefix: str) -> dict[str, str]:
    """The variables `env_config(type(config), prefix)` rebuilds `config` from."""
    out: dict[str, str] = {}
    for f in fields(config):
        value, var = getattr(config, f.name), _var(prefix, f)
        if is_dataclass(value):
            out.update(env_of(value, var + "_"))
        else:
            out[var] = _render(value)
    return out
