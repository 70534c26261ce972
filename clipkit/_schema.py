"""JSON Schema (draft 2020-12) of model configs, built from the config classes installed now.

``clipkit config schema > clipkit.schema.json`` gives editors validation and completion. Every tower
type's keys, types, bounds, defaults and descriptions come from its config dataclass, so an installed
plugin's types are in it. It states what JSON Schema can: also which type a section without ``"type"``
is inferred as, and which tokenizer keys go with which tokenizer. Rules that relate values of several
keys (a config class's ``check()``, e.g. width divisible by heads) are left to ``clipkit config check``.
No torch here.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Optional, Tuple

from ._typed import json_schema
from .config import SCHEMA_VERSION, ModelCfg, TokenizerCfg
from .hookspecs import Infer
from .kinds import MODEL_FAMILY, TOKENIZER, Kind, spec, towers
from .registry import FIRST_PARTY, FIRST_PARTY_INFER, registry

_NOT_ALLOWED = {"type": "null"}  # a key that does not apply may be absent or null, as the validator accepts


def _tower_defs(kind: Kind, tokenizer_keys: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    defs = {}
    for entry in registry.entries(kind):
        extra = {"type": {"const": entry.name, "description": f"{entry.name!r}, provided by {entry.plugin.label}"}}
        extra.update(tokenizer_keys or {})
        cls = entry.config_class()
        # a type without a config class validates its section itself: any keys
        defs[f"{kind}.{entry.name}"] = (json_schema(cls, f"{kind} {entry.name}", extra) if cls
                                        else {"title": f"{kind} {entry.name}", "type": "object", "properties": extra})
    return defs


def _inference(kind: Kind) -> List[Tuple[str, Infer]]:
    """``(name, rule)`` in the order config.py tries them for a section that names no part of ``kind``."""
    rules = [(entry.name, rule) for entry in registry.inferring(kind) for rule in entry.infer]
    claimed = {name for name, _ in rules}
    rules += [(name, rule) for (hint_kind, name), rule in FIRST_PARTY_INFER.items()
              if hint_kind == kind and name not in claimed]
    return rules


def _inferred_as(kind: Kind) -> Dict[str, Dict[str, Any]]:
    """For each part a section without a name may be inferred as: the schema of such sections."""
    conditions: Dict[str, List[Dict[str, Any]]] = {}
    earlier: List[Dict[str, Any]] = []
    for name, rule in _inference(kind):
        this = rule.json_schema()
        conditions.setdefault(name, []).append({"allOf": [*({"not": e} for e in earlier), this]})
        earlier.append(this)
    default = spec(kind).default
    if default is not None:
        conditions.setdefault(default, []).append({"allOf": [{"not": e} for e in earlier]} if earlier else {})
    return {name: {"anyOf": alternatives} if len(alternatives) > 1 else alternatives[0]
            for name, alternatives in conditions.items()}


def _section(kind: Kind) -> Dict[str, Any]:
    """Dispatch on ``"type"``; without it, on the inference rules, first match wins."""
    names = registry.names(kind)

    def ref(name: str) -> Dict[str, Any]:
        if name in names:
            return {"$ref": f"#/$defs/{kind}.{name}"}
        dist = FIRST_PARTY.get((kind, name))
        hint = f" (pip install {dist})" if dist else ""
        return {"not": {}, "description": f"this section is inferred to be of type {name!r}, which is not "
                                          f"installed{hint}"}

    inferred: Dict[str, Any] = {"not": {}}  # reached only when no rule and no default applies
    for name, condition in reversed(list(_inferred_as(kind).items())):
        inferred = {"if": condition, "then": ref(name), "else": inferred}
    explicit = {"allOf": [{"if": {"properties": {"type": {"const": name}}}, "then": ref(name)} for name in names]}
    return {"type": "object", "properties": {"type": {"enum": names, "description": "Registered tower type."}},
            "if": {"required": ["type"]}, "then": explicit, "else": inferred}


def _tokenizer_rules() -> List[Dict[str, Any]]:
    """Which tokenizer a text_cfg selects (named, or inferred as config.py does), and its keys."""
    no_name = {"anyOf": [{"not": {"required": ["tokenizer"]}}, {"properties": {"tokenizer": {"type": "null"}}}]}
    inferred = _inferred_as(TOKENIZER)

    def selects(name: str) -> Dict[str, Any]:
        named = {"required": ["tokenizer"], "properties": {"tokenizer": {"const": name}}}
        if name in inferred:
            return {"anyOf": [named, {"allOf": [no_name, inferred[name]]}]}
        return named

    rules = [{"if": {"not": selects("hf")}, "then": {"properties": {"hf_tokenizer_name": _NOT_ALLOWED,
                                                                    "tokenizer_mode": _NOT_ALLOWED}}}]
    for entry in registry.entries(TOKENIZER):
        options = entry.meta.get("options")
        if options is not None:
            rules.append({"if": selects(entry.name), "then": {"properties": {"tokenizer_kwargs": {
                "anyOf": [{"type": "null"}, {"type": "object", "propertyNames": {"enum": list(options)}}]}}}})
    return rules


def _family_keys() -> Dict[str, Any]:
    """``model_family`` and the top-level keys the installed model families add (a dataclass field: a section)."""
    family = spec(MODEL_FAMILY)
    keys: Dict[str, Any] = {str(family.select_key): {
        "anyOf": [{"enum": registry.names(MODEL_FAMILY)}, {"type": "null"}],
        "description": f"Registered model family; inferred when absent, else {family.default!r}."}}
    for entry in registry.entries(MODEL_FAMILY):
        cls = entry.config_class()
        if cls is None:
            continue
        hints = typing.get_type_hints(cls)
        plain = json_schema(cls, f"model family {entry.name}")["properties"]
        for f in dataclasses.fields(cls):
            keys[f.name] = (json_schema(hints[f.name], f"{entry.name} {f.name}") if dataclasses.is_dataclass(hints[f.name])
                            else plain[f.name])
    return keys


def model_config_schema() -> Dict[str, Any]:
    """JSON Schema of a model config, reflecting the tower types and tokenizers installed now."""
    tokenizer = json_schema(TokenizerCfg, "tokenizer keys")["properties"]
    tokenizer["tokenizer"] = {"anyOf": [{"enum": registry.names(TOKENIZER)}, {"type": "null"}],
                              "description": tokenizer["tokenizer"].get("description", "")}
    defs: Dict[str, Any] = {}
    sections: Dict[str, Any] = {}
    for kind in towers():
        # the tokenizer's keys sit in the section of the tower that reads its ids
        defs.update(_tower_defs(kind.name, tokenizer if kind.section == spec(TOKENIZER).section else None))
        sections[kind.section or ""] = _section(kind.name)  # a tower kind always has its section
    sections[spec(TOKENIZER).section or ""]["allOf"] = _tokenizer_rules()
    sections.update(_family_keys())
    top = json_schema(ModelCfg, "clipkit model config", sections)
    top["properties"]["schema_version"]["maximum"] = SCHEMA_VERSION  # a newer file needs a newer clipkit
    top["required"] = ["embed_dim", "vision_cfg", "text_cfg"]
    top["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    top["$defs"] = defs
    return top
