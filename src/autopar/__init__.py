"""autopar: turn an existing for-loop into a parallel one with a decorator.

from autopar import parallel_loop

@parallel_loop(workers=4)
def calc_stuff(parameter):
    ...
    return out1, out2, out3

output1, output2, output3 = calc_stuff.map(j * offset for j in range(10)).unzip()
"""

import contextlib

from autopar._backends import shutdown
from autopar._calls import each
from autopar._collect import LoopIterator
from autopar._decorator import BoundLoopFunction, LoopFunction, parallel_loop
from autopar._errors import (
    AutoparError,
    IterationTimeout,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    UnsafeLoopError,
    WorkerCrashed,
)
from autopar._random import rng
from autopar._results import Failure, LoopResult, LoopStats
from autopar._verify import Mismatch, VerifyReport

__version__ = "0.1.0"

__all__ = [
    "AutoparError",
    "BoundLoopFunction",
    "Failure",
    "IterationTimeout",
    "LoopFunction",
    "LoopIterator",
    "LoopResult",
    "LoopStats",
    "Mismatch",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "UnsafeLoopError",
    "VerifyReport",
    "WorkerCrashed",
    "__version__",
    "each",
    "parallel_loop",
    "rng",
    "shutdown",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or callable(_obj):
        with contextlib.suppress(AttributeError, TypeError):
            _obj.__module__ = "autopar"
del _name, _obj
