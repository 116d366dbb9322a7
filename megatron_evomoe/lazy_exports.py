"""A package's public names imported on first use (PEP 562), for packages whose submodules run as
scripts (`python -m pkg.module`): importing the package then imports none of them, so runpy does
not find the module already imported (a second copy of it, and a RuntimeWarning on stderr), and a
light script does not pay for the heavy imports of its siblings.

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"module": ("Name", ...), ...})
"""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]):
    """The `__getattr__`, `__dir__` and `__all__` of `package`; each name is imported (and cached in the
    package) the first time it is read."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, sorted(where)
