"""Values checked against the constructor's annotations before anything is built, with the field's full config name.

Hydra passes whatever the command line said (``workload.rate=fast`` is the string "fast", ``max_requests=2.5`` a
float) and a constructor would fail deep inside, or not at all. ``check_node`` walks a resolved config node and,
for every ``_target_``, checks each given argument against its annotation: numbers are finite numbers (never NaN,
infinity, a bool or a string), integers are whole, booleans are booleans, strings are strings, sequences are
sequences, ``X | None`` also takes null. Ranges (``> 0``, divisibility) stay with the constructors, which name their
field too. A key the target does not take is refused here too, naming it and what the target takes: Hydra would
only find it when the object is built, and a partial (``cost``) not until its first call.
"""
from __future__ import annotations

import collections.abc as cabc
import functools
import inspect
import math
import types
import typing
from typing import Any

from hydra.utils import get_method


class ConfigValueError(ValueError):
    """A config value of the wrong kind; the message starts with the field's full config name."""


def check_node(node: Any, path: str) -> None:
    """Check every ``_target_`` node inside ``node`` (a plain container: OmegaConf.to_container(resolve=True))."""
    if isinstance(node, dict):
        target = node.get("_target_")
        hints = _hints(target) if isinstance(target, str) else {}
        takes = _params(target) if isinstance(target, str) else None
        for key, value in node.items():
            if key.startswith("_"):
                continue
            where = f"{path}.{key}" if path else str(key)
            if takes is not None and key not in takes:
                raise ConfigValueError(f"{where}: not a setting of {target} (it takes {', '.join(sorted(takes))})")
            if isinstance(value, dict) and "_target_" in value:
                check_node(value, where)
                continue
            if key in hints:
                _check(value, hints[key], where)
            if isinstance(value, (dict, list)):
                check_node(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_node(value, f"{path}[{i}]")


@functools.lru_cache(maxsize=None)
def _hints(target: str) -> dict[str, Any]:
    try:
        obj = get_method(target)  # classes too
    except Exception:  # noqa: BLE001 - Hydra reports a target it cannot import, naming it
        return {}
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against
        return {}
    hints.pop("return", None)
    return hints


@functools.lru_cache(maxsize=None)
def _params(target: str) -> frozenset[str] | None:
    """The keyword arguments ``target`` takes, or None when it takes any (``**kwargs``) or cannot be inspected."""
    try:
        params = inspect.signature(get_method(target)).parameters.values()
    except Exception:  # noqa: BLE001 - Hydra reports a target it cannot import, naming it
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params
                     if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _check(value: Any, hint: Any, where: str) -> None:
    problem = _mismatch(value, hint)
    if problem:
        raise ConfigValueError(f"{where}: expected {problem}, got {_kind(value)}")


def _mismatch(value: Any, hint: Any) -> str | None:
    """None if ``value`` fits ``hint`` (or the hint is not one of the plain kinds checked), else what was expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        problems = [_mismatch(value, a) for a in args if a is not type(None)]
        if any(p is None for p in problems):
            return None
        return " or ".join(problems) + (" or null" if type(None) in args else "")
    if hint is Any or hint is object:
        return None
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        if isinstance(value, bool):
            return "a whole number"
        if isinstance(value, int):
            return None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return None
        return "a whole number"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin in (list, tuple, cabc.Sequence) or hint in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return "a list"
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(args) == 1:
            for item in value:
                inner = _mismatch(item, args[0])
                if inner:
                    return f"a list of {inner}"
        return None
    return None  # classes, protocols, dicts: built by Hydra from nested nodes, or checked by the constructor
