"""Builtin poolers: token features ``[B, L, D]`` and an attention mask ``[B, L]`` to ``[B, D]``.

Names are OpenCLIP's ``hf_pooler_type`` values. This module is the plugin (no torch); the
poolers are in ``model.py``.
"""
from ...hookspecs import Register, hookimpl


@hookimpl
def register_poolers(register: Register) -> None:
    for name in ("mean_pooler", "max_pooler", "cls_pooler", "cls_last_hidden_state_pooler"):
        register(name, f"clipkit.builtin.poolers.model:{name}")
