"""What the process's exit does to autopar's pools, and the loops it knows to be running.

At interpreter exit, concurrent.futures waits for every running work item; then the
``atexit`` hook that `install` registers when the first pool is made closes the pools.
Before that wait, `_stop_abandoned` stops the workers still running a chunk that no loop
wants (a failure raised, an imap dropped, Ctrl-C), which could take minutes; pools that a
running loop (`loop_started`) still uses are left alone. A multiprocessing child ends without
``atexit`` hooks, after joining its children: a finalizer closes our pools before that join.
A child made by ``os.fork()`` starts afresh (`forked`): its parent's pools are not its own.

Imports, one way: `_backends` imports this module and hands `install` the functions that
close the pools and list them; this module imports `_pool` (the records whose workers it
stops) and never `_backends`.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.util
import os
import threading
import traceback
import weakref
from collections.abc import Callable, Iterable
from typing import Protocol

from autopar._pool import Pool

__all__ = ["forked", "install", "loop_ended", "loop_started"]


class _Loop(Protocol):
    def pools_in_use(self) -> set[int]: ...

    def give_up(self) -> dict[int, list[int]]: ...


_live_loops: weakref.WeakSet[_Loop] = weakref.WeakSet()
_live_loops_lock = threading.Lock()
_pid = os.getpid()
"""The process whose pools and loops these are: a forked child's exit leaves them alone."""
_hooks_installed = False  # inherited by a forked child, as the hooks are
_finalizer_pid = 0  # multiprocessing clears its finalizers in each child it starts


def loop_started(loop: _Loop) -> None:
    """A loop runs: at exit, the pools it uses are left alone (stopping a worker breaks the
    whole pool, and the loop could not resend its chunks once the interpreter shuts down)."""
    with _live_loops_lock:
        _live_loops.add(loop)


def loop_ended(loop: _Loop) -> None:
    """The loop is over: at exit, what it left running on its pools may be stopped."""
    with _live_loops_lock:
        _live_loops.discard(loop)


def forked() -> bool:
    """True the first time it is asked (by `_backends`, which then drops its pools) in a
    child forked from the process that knew these loops and pools: they are the parent's."""
    global _pid
    if _pid == os.getpid():
        return False
    _live_loops.clear()  # without the lock: a thread of the parent may have held it
    _pid = os.getpid()
    return True


def install(close_all: Callable[[], None], pools: Callable[[], Iterable[Pool]]) -> None:
    """When a pool is made (so that importing autopar has no effect): at exit, stop the
    workers running abandoned chunks of ``pools()``, then call ``close_all``."""
    global _hooks_installed, _finalizer_pid
    if not _hooks_installed:
        atexit.register(close_all)
        # Runs before concurrent.futures' own hook (registered earlier, run later), which
        # waits for running work items. A private API, which that module uses.
        getattr(threading, "_register_atexit", lambda hook: None)(functools.partial(_stop_abandoned, pools))
        _hooks_installed = True
    if multiprocessing.parent_process() is not None and _finalizer_pid != os.getpid():
        # A multiprocessing child (an ``mp.Process``, a joblib/loky worker) ends without atexit
        # hooks, after joining its child processes, which would wait forever for our idle
        # workers. This finalizer runs before that join, and before the finalizers of its
        # queues (priority 10), whose feeder threads carry the pools' stop messages.
        multiprocessing.util.Finalize(None, _close_at_child_exit, args=(close_all, pools), exitpriority=100)
        _finalizer_pid = os.getpid()


def _stop_abandoned(pools: Callable[[], Iterable[Pool]]) -> None:
    """At interpreter exit, before concurrent.futures waits for the workers: stop those
    still running an abandoned chunk, or the exit would wait for it to end (an iteration a
    raised failure or Ctrl-C left behind can take minutes). Pools that loops of other
    threads still use are left alone."""
    if os.getpid() != _pid:
        return  # a forked child's exit: the pools are its parent's
    try:
        with _live_loops_lock:
            loops = list(_live_loops)
        in_use = [loop.pools_in_use() for loop in loops]
        busy = set().union(*in_use)
        # Loops name their pools by the id of the executor, as loop.give_up() does.
        idle = {id(pool.executor): pool for pool in pools() if id(pool.executor) not in busy}
        given_up: dict[int, list[int]] = {}
        for loop, used in zip(loops, in_use, strict=True):
            if not used:  # none can go on with it (an imap the main thread left unfinished)
                for key, chunk_ids in loop.give_up().items():
                    given_up.setdefault(key, []).extend(chunk_ids)
        for key, pool in idle.items():
            pool.stop_abandoned(given_up.get(key, ()))
    except Exception:  # an error here would stop the interpreter from joining its threads
        traceback.print_exc()


def _close_at_child_exit(close_all: Callable[[], None], pools: Callable[[], Iterable[Pool]]) -> None:
    _stop_abandoned(pools)  # as at the exit of a main process: not waited for
    close_all()
