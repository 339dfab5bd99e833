"""Strict conversion between JSON data and frozen dataclasses, driven by their type hints.

One loader for every typed JSON file of the project: the bundle manifest
(`runtime/manifest.py`) and the bench result (`benchmarks/result.py`). A class derives
from `Strict` and names its `Rules` (the error to raise, what a key is called, a hint
for a missing key). `from_dict` rejects an unknown or a missing key naming it by its
path (`decoder.quants.q8_0.file`), and a value of the wrong type; `to_dict` writes
JSON-ready data that `from_dict` reads back to an equal object.

Supported field types: `int`, `float`, `str`, `bool`, `Any` (kept as it is), nested
`Strict` dataclasses, `X | None`, `tuple[X, ...]`, `dict[str, X]`. A field declared
with `omitted()` may be left out of the JSON (and is left out when it is None).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Union

_OMIT = "strict_omit_if_none"


def omitted(**kwargs):
    """A dataclass field that defaults to None and is absent from the JSON while it is None."""
    return dataclasses.field(default=None, metadata={_OMIT: True}, **kwargs)


@dataclasses.dataclass(frozen=True)
class Rules:
    """How a family of classes reports bad data."""

    error: type[Exception]  # raised for any problem
    noun: str  # what a key is called in messages: "manifest key", "bench.json key"
    missing_hint: str = ""  # appended to a missing-key message (what to do about it)
    finite: bool = False  # reject NaN and infinite numbers


class Strict:
    """from_dict/to_dict for a frozen dataclass; subclasses set `rules`."""

    rules: ClassVar[Rules]

    @classmethod
    def from_dict(cls, data: Any, where: str = "", path: str = ""):
        """Build from JSON data; `rules.error` naming the key on unknown/missing keys or wrong types."""
        return load(cls, data, where, path, cls.rules)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists) that `from_dict` reads back to an equal object."""
        return dump(self)


@functools.lru_cache(maxsize=None)
def _fields(cls) -> tuple[dict[str, Any], tuple[str, ...], frozenset[str]]:
    """(type hints, field names, names that may be left out) of a dataclass."""
    fields = dataclasses.fields(cls)
    return (typing.get_type_hints(cls), tuple(f.name for f in fields),
            frozenset(f.name for f in fields if f.metadata.get(_OMIT)))


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _fail(rules: Rules, where: str, path: str, what: str) -> Exception:
    return rules.error(f"{where}: {rules.noun} {path or '(top)'!r} {what}")


def load(tp: Any, value: Any, where: str, path: str, rules: Rules) -> Any:
    """`value` (JSON data) as an instance of the type `tp`; raises `rules.error` naming `path`."""
    if tp is float:  # scalars first: they are most of a manifest (routing weights, shapes)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(rules, where, path, f"expected a number, found {value!r}")
        if rules.finite and not math.isfinite(value):
            raise _fail(rules, where, path, f"expected a finite number, found {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(rules, where, path, f"expected an integer, found {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise _fail(rules, where, path, f"expected {tp.__name__}, found {value!r}")
        return value
    if tp is Any:
        return copy.deepcopy(value)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _fail(rules, where, path, f"expected an object, found {type(value).__name__}")
        hints, names, optional = _fields(tp)
        unknown = [k for k in value if k not in names]
        if unknown:
            raise _fail(rules, where, _key(path, str(unknown[0])), f"is unknown (expected one of {', '.join(names)})")
        missing = [n for n in names if n not in value and n not in optional]
        if missing:
            raise rules.error(f"{where}: expected the key {_key(path, missing[0])!r}, found none{rules.missing_hint}")
        return tp(**{n: load(hints[n], value[n], where, _key(path, n), rules) for n in names if n in value})
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(value) in (int, str) and type(value) in args:  # fast path: a shape's dims
            return value
        if value is None:
            if type(None) in args:
                return None
            raise _fail(rules, where, path, f"expected {_name(tp)}, found null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return load(arg, value, where, path, rules)
            except rules.error as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(rules, where, path, f"expected {_name(tp)}, found {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(rules, where, path, f"expected a list, found {type(value).__name__}")
        (elem, *_rest) = typing.get_args(tp)
        exact = EXACT.get(elem)
        if exact is not None and not rules.finite and all(type(v) in exact for v in value):  # fast path: weights, shapes
            return tuple(value)
        return tuple(load(elem, v, where, f"{path}[{i}]", rules) for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _fail(rules, where, path, f"expected an object, found {type(value).__name__}")
        _k, vt = typing.get_args(tp)
        return {str(k): load(vt, v, where, _key(path, str(k)), rules) for k, v in value.items()}
    raise TypeError(f"field type {tp!r} is not supported")  # a bug in the declaring module, not in the data


def _name(tp: Any) -> str:
    args = typing.get_args(tp)
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args) or str(tp)


def dump(value: Any) -> Any:
    """JSON-ready data of a Strict dataclass (or any value inside one)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        _hints, names, optional = _fields(type(value))
        out = {}
        for n in names:
            v = getattr(value, n)
            if v is None and n in optional:
                continue
            out[n] = dump(v)
        return out
    if isinstance(value, Mapping):
        return {str(k): dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [dump(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


Dim = Union[int, str]  # a concrete size, or a symbolic axis name in a graph signature
EXACT = {float: (float,), int: (int,), str: (str,), Dim: (int, str)}  # element types taken as they are
