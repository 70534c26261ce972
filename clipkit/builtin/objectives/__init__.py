"""Builtin training objectives (``clipkit-train --objective``): ``clip``, ``siglip`` and ``distill``.

Registered through the same hook, with the same lazy targets, as a third party's objective; the
objectives themselves are in :mod:`clipkit.train.objectives`. No torch here.
"""
from ...hookspecs import Register, hookimpl
from ...train.objectives import register_builtin_objectives


@hookimpl
def register_objectives(register: Register) -> None:
    register_builtin_objectives(register)
