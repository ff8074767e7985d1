"""`diffjax.sample(...)` for notebooks (and, with the converter, `python -m diffjax.sample`).

This module is callable: `diffjax.sample(key, model, schedule, shape, ...)` is
`diffjax.samplers.sample` (see its docstring). A package attribute and a submodule cannot share
the name `sample` otherwise: importing the command-line module would replace the function.
"""
from __future__ import annotations

import sys
import types

from diffjax.samplers import sample as _sample


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _sample(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
