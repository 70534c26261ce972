"""Builtin reporters (``clipkit-train --report-to``): ``tensorboard``, ``wandb``, and ``results``
(``checkpoints/results.jsonl``, on in every run that has a run folder: registered with ``always=True``).

Registered through the same hook as a third party's reporter; the reporters are in
:mod:`clipkit.train.report`. No torch here.
"""
from ...hookspecs import Register, hookimpl
from ...train.report import register_builtin_reporters


@hookimpl
def register_reporters(register: Register) -> None:
    register_builtin_reporters(register)
