"""Hazards a process pool hides: writes to module globals, and drawing with pyplot.

An iteration that fills a global dict, or draws into matplotlib's current figure, does so in
a worker process: the caller's process never sees it. A loop whose iterations all return
None and that does such a thing has most likely lost its whole output, silently.
`warn_if_writes_lost` says so once per function; `global_names` is the analysis behind it, a
walk over the function's bytecode (its code objects, nested ones included), cached per code
object.
"""

from __future__ import annotations

import builtins
import dis
import functools
import os
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

__all__ = ["global_names", "plotting_names", "unwrap", "warn_if_writes_lost"]

MUTATING_METHODS = frozenset(
    {
        "append",
        "extend",
        "insert",
        "add",
        "update",
        "setdefault",
        "pop",
        "popitem",
        "remove",
        "discard",
        "clear",
        "appendleft",
        "extendleft",
        "sort",
        "reverse",
        "__setitem__",
        "__delitem__",
    }
)
"""Methods that change their object in place: calling one on a global writes it."""

PLOTTING_MODULES = frozenset({"matplotlib.pyplot", "matplotlib.pylab", "pylab"})
"""Modules whose functions draw into a current figure, a state of the process they run in."""

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
_JUMPS = frozenset(getattr(dis, "hasjump", ())) | frozenset(dis.hasjrel) | frozenset(dis.hasjabs)
_NO_OP = frozenset({"NOP", "CACHE", "EXTENDED_ARG", "RESUME", "PRECALL", "KW_NAMES", "NOT_TAKEN"})
# Instructions that pop their operands and push one new value, unrelated to them; how many
# they pop is 1 - their stack effect (CALL on 3.11 is the exception: see _pops).
_ONE_RESULT = frozenset(
    {
        "CALL",
        "CALL_KW",
        "CALL_FUNCTION_EX",
        "CALL_INTRINSIC_1",
        "CALL_INTRINSIC_2",
        "BINARY_OP",
        "COMPARE_OP",
        "IS_OP",
        "CONTAINS_OP",
        "UNARY_NEGATIVE",
        "UNARY_NOT",
        "UNARY_INVERT",
        "UNARY_POSITIVE",
        "TO_BOOL",
        "GET_ITER",
        "GET_LEN",
        "BUILD_TUPLE",
        "BUILD_LIST",
        "BUILD_SET",
        "BUILD_MAP",
        "BUILD_CONST_KEY_MAP",
        "BUILD_STRING",
        "BUILD_SLICE",
        "LIST_TO_TUPLE",
        "FORMAT_VALUE",
        "FORMAT_SIMPLE",
        "FORMAT_WITH_SPEC",
        "CONVERT_VALUE",
        "MAKE_FUNCTION",
        "SET_FUNCTION_ATTRIBUTE",
    }
)
# Instructions that only pop: stores into locals, and adding to a container being built.
_ONLY_POP = {
    "POP_TOP": 1,
    "STORE_FAST": 1,
    "STORE_DEREF": 1,
    "STORE_GLOBAL": 1,
    "STORE_NAME": 1,
    "STORE_FAST_STORE_FAST": 2,
    "LIST_APPEND": 1,
    "SET_ADD": 1,
    "MAP_ADD": 2,
    "LIST_EXTEND": 1,
    "SET_UPDATE": 1,
    "DICT_UPDATE": 1,
    "DICT_MERGE": 1,
}
# Instructions that write into an object, and where that object is: 1 is the top of the stack.
_WRITES_INTO = {"STORE_SUBSCR": 2, "DELETE_SUBSCR": 2, "STORE_ATTR": 1, "DELETE_ATTR": 1, "STORE_SLICE": 3}
_WRITE_POPS = {"STORE_SUBSCR": 3, "DELETE_SUBSCR": 2, "STORE_ATTR": 2, "DELETE_ATTR": 1, "STORE_SLICE": 4}

# What a stack slot holds, as far as the walk is concerned.
_OTHER, _THE_GLOBAL, _PART_OF_IT = 0, 1, 2


class _CodeGlobals(NamedTuple):
    reads: frozenset[str]
    writes: frozenset[str]
    method_calls: frozenset[str]
    """Globals a mutating method is called on directly (``X.update(...)``): a write, unless
    ``X`` turns out to be a module (``os.remove(path)``)."""


def global_names(function: Callable[..., Any]) -> tuple[frozenset[str], frozenset[str]]:
    """The module-global names ``function`` reads, and those it writes (assigned, deleted, or
    changed in place: ``X[k] = v``, ``X.attr = v``, ``X.append(v)``...), inner functions,
    lambdas and comprehensions included. Builtins it only reads are left out."""
    target = unwrap(function)
    code = getattr(target, "__code__", None)
    if not isinstance(code, types.CodeType):
        return frozenset(), frozenset()
    found = _code_globals(code)
    namespace: dict[str, Any] = getattr(target, "__globals__", {})
    reads = frozenset(name for name in found.reads if name in namespace or not hasattr(builtins, name))
    called = {name for name in found.method_calls if name in namespace and not _is_module(namespace[name])}
    return reads, found.writes | called


def plotting_names(function: Callable[..., Any]) -> frozenset[str]:
    """The globals ``function`` reads that are a plotting state machine (``plt``, ``pylab``,
    or a function of ``matplotlib.pyplot`` imported by name)."""
    target = unwrap(function)
    namespace: dict[str, Any] = getattr(target, "__globals__", {})
    reads, _ = global_names(target)
    return frozenset(name for name in reads if name in namespace and _is_plotting(namespace[name]))


def _is_module(value: object) -> bool:
    return isinstance(value, types.ModuleType)


def _is_plotting(value: object) -> bool:
    if isinstance(value, types.ModuleType):
        return value.__name__ in PLOTTING_MODULES
    return callable(value) and getattr(value, "__module__", None) == "matplotlib.pyplot"


def unwrap(function: Any) -> Any:
    """The plain function that runs: through ``__wrapped__`` (autopar's own wrapper
    included), bound methods, ``functools.partial`` and callable objects."""
    for _ in range(100):  # a wrapper chain that loops back on itself ends here
        if isinstance(function, types.FunctionType):
            return function
        wrapped = getattr(function, "__wrapped__", None)
        if wrapped is not None:
            function = wrapped
        elif isinstance(function, types.MethodType | classmethod | staticmethod):
            function = function.__func__
        elif isinstance(function, functools.partial):
            function = function.func
        elif isinstance(call := _class_attribute(type(function), "__call__"), types.FunctionType):
            function = call  # a callable object: its class's __call__
        else:
            break
    return function


def _class_attribute(cls: type, name: str) -> object:
    return next((vars(klass)[name] for klass in cls.__mro__ if name in vars(klass)), None)


@functools.lru_cache(maxsize=1024)
def _code_globals(code: types.CodeType) -> _CodeGlobals:
    """The globals one code object and the code objects nested in it read and write."""
    reads: set[str] = set()
    writes: set[str] = set()
    method_calls: set[str] = set()
    instructions = list(dis.get_instructions(code))
    module_level = code.co_name == "<module>"
    # In a class body, LOAD_NAME finds the class's own names first: those are not globals.
    class_names = set() if module_level else {i.argval for i in instructions if i.opname == "STORE_NAME"}
    for position, instruction in enumerate(instructions):
        opname, name = instruction.opname, instruction.argval
        if opname in ("STORE_GLOBAL", "DELETE_GLOBAL") or (module_level and opname in ("STORE_NAME", "DELETE_NAME")):
            writes.add(name)
        elif opname in _LOADS and name not in class_names:
            reads.add(name)
            try:
                found = _changed_in_place(instructions, position + 1, _loaded(instruction))
            except ValueError:  # dis.stack_effect of an instruction this Python did not foresee
                found = _OTHER
            if found == _THE_GLOBAL:
                method_calls.add(name)
            elif found == _PART_OF_IT:
                writes.add(name)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            inner = _code_globals(constant)
            reads |= inner.reads
            writes |= inner.writes
            method_calls |= inner.method_calls
    return _CodeGlobals(frozenset(reads), frozenset(writes), frozenset(method_calls))


def _loaded(load: dis.Instruction) -> list[int]:
    """The tags of what a global load pushes. A LOAD_GLOBAL may push a NULL as well, for a
    call: below the value on 3.11-3.12 (``X.append(*args)`` loads ``NULL + X`` on 3.11), above
    it on 3.13."""
    if _stack_effect(load) == 2 and sys.version_info >= (3, 13):
        return [_THE_GLOBAL, _OTHER]
    return [_THE_GLOBAL]


def _changed_in_place(instructions: Sequence[dis.Instruction], start: int, tags: list[int]) -> int:
    """Follow the value a global load just pushed through the straight-line code after it:
    `_PART_OF_IT` when it, or an attribute or element of it, is stored into, deleted from, or
    has a mutating method called on it (an attribute or element of it: ``X.items.append``);
    `_THE_GLOBAL` when the only change is a mutating method called on the global itself;
    `_OTHER` when the value is consumed otherwise, or at a jump, or an instruction this walk
    does not model (the change is missed then, never invented).

    ``tags`` says, for each value on the stack since the load (the load's own first), whether
    it is the global, part of it, or other; each instruction pops and pushes tags as it does
    values. What ``dis`` shows for the patterns, on 3.11 to 3.13::

        X[k] = v       LOAD v; LOAD_GLOBAL X; LOAD k; STORE_SUBSCR
        X.a = v        LOAD v; LOAD_GLOBAL X; STORE_ATTR a
        X[k] += 1      LOAD_GLOBAL X; LOAD k; COPY 2; COPY 2; BINARY_SUBSCR; ...; SWAP 3; SWAP 2; STORE_SUBSCR
        X.a.append(v)  LOAD_GLOBAL X; LOAD_ATTR a; LOAD_METHOD append (3.11) / LOAD_ATTR append (3.12+); ...
        del X[k]       LOAD_GLOBAL X; LOAD k; DELETE_SUBSCR
    """
    found = _OTHER
    for instruction in _straight_line(instructions, start):
        opname = instruction.opname
        if opname in _NO_OP:
            continue
        if opname in _WRITES_INTO:
            depth = _WRITES_INTO[opname]
            if depth <= len(tags) and tags[-depth] != _OTHER:
                return _PART_OF_IT
            _pop(tags, _WRITE_POPS[opname])
        elif opname in ("LOAD_ATTR", "LOAD_METHOD"):
            tag = tags.pop()
            if tag != _OTHER and instruction.argval in MUTATING_METHODS:
                if tag == _PART_OF_IT:
                    return _PART_OF_IT
                found = _THE_GLOBAL  # go on: ``X.setdefault(k, []).append(v)`` is one either way
                tag = _OTHER
            # An attribute is part of the object (``X.items``); so is a method, until called.
            tags += [_PART_OF_IT if tag != _OTHER else _OTHER] * (1 + _stack_effect(instruction))
        elif opname in ("BINARY_SUBSCR", "BINARY_SLICE"):  # an element of X is part of X
            operands = 2 if opname == "BINARY_SUBSCR" else 3
            container = tags[-operands] if operands <= len(tags) else _OTHER
            _pop(tags, operands)
            tags.append(_PART_OF_IT if container != _OTHER else _OTHER)
        elif opname == "COPY":  # a copy of what is below the loaded value is not it
            depth = instruction.arg or 0
            tags.append(tags[-depth] if depth <= len(tags) else _OTHER)
        elif opname == "SWAP":
            depth = instruction.arg or 0
            if depth > len(tags):
                return found  # the value goes where this walk does not see
            tags[-1], tags[-depth] = tags[-depth], tags[-1]
        elif opname in _ONE_RESULT:
            _pop(tags, _pops(instruction))
            tags.append(_OTHER)
        elif opname in _ONLY_POP:
            _pop(tags, _ONLY_POP[opname])
        elif (opname.startswith("LOAD_") or opname == "PUSH_NULL") and _stack_effect(instruction) > 0:
            tags += [_OTHER] * _stack_effect(instruction)  # loads push, and pop nothing
        else:
            return found
        if _THE_GLOBAL not in tags and _PART_OF_IT not in tags:
            return found
    return found


def _straight_line(instructions: Sequence[dis.Instruction], start: int) -> Iterator[dis.Instruction]:
    """The instructions from ``start`` up to the next jump, or the next jump target."""
    for instruction in instructions[start : start + 200]:
        if instruction.is_jump_target or instruction.opcode in _JUMPS:
            return
        yield instruction


def _pop(tags: list[int], count: int) -> None:
    del tags[max(len(tags) - count, 0) :]


def _pops(instruction: dis.Instruction) -> int:
    if instruction.opname == "CALL":  # callable, self or NULL, arguments (3.11 splits the
        return (instruction.arg or 0) + 2  # stack effect between PRECALL and CALL)
    return 1 - _stack_effect(instruction)


def _stack_effect(instruction: dis.Instruction) -> int:
    return dis.stack_effect(instruction.opcode, instruction.arg, jump=False)


_warned: weakref.WeakSet[types.CodeType] = weakref.WeakSet()
_warned_lock = threading.Lock()


def warn_if_writes_lost(
    function: Callable[..., Any], name: str, values: Sequence[object], failed: int, *, in_process: bool
) -> None:
    """After a ``map`` whose every iteration returned None, on a backend out of this process:
    warn (once per function) if the function writes module globals or draws with pyplot, as
    those writes stayed in the worker processes."""
    if in_process or not values or values[0] is not None or failed >= len(values):
        return  # the common case, a loop that returns values, stops at values[0]
    target = unwrap(function)
    code = getattr(target, "__code__", None)
    if not isinstance(code, types.CodeType) or code in _warned:
        return
    _, writes = global_names(target)  # cached: cheaper than looking at every value
    plotting = plotting_names(target)
    if not (writes or plotting) or any(value is not None for value in values):
        return
    with _warned_lock:
        if code in _warned:
            return
        _warned.add(code)
    warnings.warn(_message(name, getattr(target, "__name__", name), writes, plotting), RuntimeWarning, _stacklevel())


def _message(name: str, short: str, writes: frozenset[str], plotting: frozenset[str]) -> str:
    done = []
    if writes:
        done.append(f"writes the module global{'s' if len(writes) > 1 else ''} {', '.join(sorted(writes))}")
    if plotting:
        done.append("draws with matplotlib.pyplot")
    if writes and plotting:
        lost = "those writes and that drawing stayed in the worker processes and are lost here"
        advice = "return the values and the data to draw: build the dict (or list) and draw in this process"
    elif writes:
        lost = "those writes stayed in the worker processes (each changed its own copy) and are lost here"
        advice = "return the values and build the dict (or list) from the loop's result"
    else:
        lost = "that drawing stayed in the worker processes (each drew in its own figure) and is lost here"
        advice = "return the data to draw and draw in this process from the loop's result"
    return (
        f"{name}() returned None in every iteration and {' and '.join(done)}: {lost}. Instead, {advice}. "
        f"{short}.verify(xs) compares this parallel loop with the serial one."
    )


def _stacklevel() -> int:
    """The stack level, for a warning issued by our caller, of the first frame outside autopar:
    the user's ``f.map(...)`` line."""
    level = 1
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level
