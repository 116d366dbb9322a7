"""Class specialisation: turn a module into a subclass that adds communication, in place.

The parallel layers keep the model's own modules (same object, same parameters and names, so
optimizers, hooks and checkpoints need no remapping) and only swap the class for one that mixes
in the collectives. One subclass is made per (mixin, base class) and reused.
"""
from __future__ import annotations

_SPECIALISED: dict[tuple[type, type], type] = {}


def specialise(module, mixin: type, prefix: str, **attrs):
    """Make `module` an instance of `prefix + type(module).__name__` = (mixin, type(module)), then set
    `attrs` on it. A module that already has the mixin only gets the attributes."""
    if not isinstance(module, mixin):
        base = type(module)
        cls = _SPECIALISED.get((mixin, base))
        if cls is None:
            cls = type(f"{prefix}{base.__name__}", (mixin, base), {"__module__": mixin.__module__})
            _SPECIALISED[(mixin, base)] = cls
        module.__class__ = cls
    for k, v in attrs.items():
        setattr(module, k, v)
    return module
