"""Which part of a loop function or keyword argument keeps it from being pickled.

"the function could not be pickled" leaves the user to guess among everything that travels
with it. Here each part is pickled on its own, and the first that fails is named: an
attribute of a method's instance, a closure variable, a default, a global that a function
sent by value reads, a ``functools.partial``'s argument, an attribute or item of a keyword
argument.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import CodeType, FunctionType, MethodType
from typing import Any

import wrapt

from autopar._errors import SerializationError
from autopar._serialize import dumps, stage_error

__all__ = ["pickling_error", "unpicklable_error"]


def pickling_error(obj: Any) -> Exception | None:
    """What pickling ``obj`` alone raises, or None when it pickles."""
    try:
        dumps(obj)
    except Exception as exc:
        return exc
    return None


def unpicklable_error(what: str, obj: Any, exc: Exception) -> SerializationError:
    """`stage_error` for ``obj`` (a loop function, a keyword argument) that failed to pickle
    with ``exc``, naming the part of it that fails: "<what>: its instance's attribute 'lock'
    (a _thread.lock) cannot be pickled: TypeError: ..."."""
    found = _failing_part(_unwrapped(obj), "its ")
    if found is None:
        return stage_error(what, exc)
    part, error = found
    return stage_error(f"{what}: {part} cannot be pickled", error)


def _failing_part(obj: Any, prefix: str) -> tuple[str, Exception] | None:
    """The first of ``obj``'s parts that fails to pickle on its own, named, and its error;
    within a method's instance or a partial's function, the part of it that fails."""
    for name, part, look_inside in _parts(obj):
        error = pickling_error(part)
        if error is not None:
            inner = _failing_part(part, f"{prefix}{name}'s ") if look_inside else None
            return inner or (f"{prefix}{name} ({_a(type(part))})", error)
    return None


def _parts(obj: Any) -> Iterator[tuple[str, Any, bool]]:
    """What travels inside ``obj`` when it is pickled, by name, and whether to look inside it
    in turn: a bound method's function's parts and its instance, a function's closure
    variables, defaults and globals, a partial's function and arguments, an object's
    attributes, a dict's or a list's items."""
    if isinstance(obj, MethodType):
        function = obj.__func__
        if isinstance(function, FunctionType) and pickling_error(function) is not None:  # what a script's method reads
            yield from _function_parts(function)
        yield ("class" if isinstance(obj.__self__, type) else "instance"), obj.__self__, True
    elif isinstance(obj, FunctionType):
        yield from _function_parts(obj)
    elif isinstance(obj, functools.partial):
        yield "function", _unwrapped(obj.func), True
        yield from ((f"argument {position}", value, False) for position, value in enumerate(obj.args))
        yield from ((f"keyword argument {name!r}", value, False) for name, value in obj.keywords.items())
    elif isinstance(obj, dict):
        yield from ((f"item {key!r}", value, False) for key, value in obj.items())
    elif isinstance(obj, list | tuple):
        yield from ((f"item {position}", value, False) for position, value in enumerate(obj))
    elif not isinstance(obj, type):
        yield from ((f"attribute {name!r}", value, False) for name, value in _attributes(obj).items())


def _unwrapped(obj: Any) -> Any:
    """The function (or bound method) a loop function wraps: its parts are the ones to name."""
    return obj.__wrapped__ if isinstance(obj, wrapt.FunctionWrapper | wrapt.BoundFunctionWrapper) else obj


def _function_parts(function: FunctionType) -> Iterator[tuple[str, Any, bool]]:
    """A function's closure variables, default values, and the globals its code reads (all
    travel with a function pickled by value)."""
    code = function.__code__
    for name, cell in zip(code.co_freevars, function.__closure__ or (), strict=False):
        with contextlib.suppress(ValueError):  # a variable not assigned yet
            yield f"closure variable {name!r}", cell.cell_contents, False
    defaults = function.__defaults__ or ()
    positional = code.co_varnames[: code.co_argcount]
    named_defaults = dict(zip(positional[len(positional) - len(defaults) :], defaults, strict=True))
    named_defaults.update(function.__kwdefaults__ or {})
    yield from ((f"default for {name!r}", value, False) for name, value in named_defaults.items())
    namespace = function.__globals__
    for name in dict.fromkeys(_names(code)):
        if name in namespace:
            yield f"global {name!r}", namespace[name], False


def _names(code: CodeType) -> Iterator[str]:
    """The names a code object and the functions nested in it read."""
    yield from code.co_names
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            yield from _names(constant)


def _attributes(obj: Any) -> dict[str, Any]:
    """What pickling ``obj`` saves of it by name: its ``__getstate__()`` (its ``__dict__`` and
    ``__slots__`` unless its class says otherwise); nothing when that is not a dict."""
    try:
        state = obj.__getstate__()
    except Exception:
        return {}
    if isinstance(state, tuple) and len(state) == 2 and all(isinstance(d, dict | None) for d in state):
        state = {**(state[0] or {}), **state[1]}  # ``__dict__`` and ``__slots__``
    return {name: value for name, value in state.items() if isinstance(name, str)} if isinstance(state, dict) else {}


def _a(cls: type) -> str:
    """``"a _thread.lock"``, ``"an __main__.Model"``."""
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"
