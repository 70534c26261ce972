"""Deprecated name of :mod:`clipkit.weights` (weights loading), kept for one release.

It was renamed so that loading weights into a model is not one letter away from the trainer's
checkpoints (:mod:`clipkit.train.checkpointer`). ``clipkit.load_checkpoint`` is unchanged.
"""
from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    from . import weights

    value = getattr(weights, name)  # AttributeError for a name the module never had
    warnings.warn(f"clipkit.checkpoint.{name} moved to clipkit.weights.{name}; clipkit.checkpoint goes away in the "
                  f"next release", DeprecationWarning, stacklevel=2)
    return value
