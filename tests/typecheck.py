"""The runtime type checker of the test run (tests/conftest.py installs it with jaxtyping's import hook).

beartype, except while torch.compile traces: dynamo cannot trace beartype's checks (it raises a
desynchronisation error), and a compiled block checked only at trace time would check nothing at run time
anyway. Eager calls, the compiled blocks' callers and every test without compile are checked in full.
"""

import functools
from collections.abc import Callable

import torch
from beartype import beartype


def beartype_unless_compiling(fn: Callable) -> Callable:
    checked = beartype(fn)

    @functools.wraps(fn)
    def check(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        return checked(*args, **kwargs)

    return check
