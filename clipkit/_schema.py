"""JSON Schema (draft 2020-12) of model configs, built from the config classes installed now.

``clipkit config schema > clipkit.schema.json`` gives editors validation and completion. Every tower
type's keys, types, bounds, defaults and descriptions come from its config dataclass, so an installed
plugin's types are in it. It states what JSON Schema can: also which type a section without ``"type"``
is inferred as, and which tokenizer keys go with which tokenizer. Rules that relate values of several
keys (a config class's ``check()``, e.g. width divisible by heads) are left to ``clipkit config check``.
No torch here.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ._typed import json_schema
from .config import DEFAULT_TYPES, SCHEMA_VERSION, TEXT_TYPE_RULES, VISION_TYPE_RULES, ModelCfg, TokenizerCfg
from .registry import FIRST_PARTY, registry

_NOT_ALLOWED = {"type": "null"}  # a key that does not apply may be absent or null, as the validator accepts


def _tower_defs(kind: str, tokenizer_keys: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    defs = {}
    for entry in registry.entries(kind):
        extra = {"type": {"const": entry.name, "description": f"{entry.name!r}, provided by {entry.plugin.label}"}}
        extra.update(tokenizer_keys or {})
        cls = entry.config_class()
        # a type without a config class validates its section itself: any keys
        defs[f"{kind}.{entry.name}"] = (json_schema(cls, f"{kind} {entry.name}", extra) if cls
                                        else {"title": f"{kind} {entry.name}", "type": "object", "properties": extra})
    return defs


def _has_value(key: str, test: str) -> Dict[str, Any]:
    """The schema of a section whose ``key`` passes an inference test of config.py."""
    value = {"type": "array"} if test == "list" else {"not": {"enum": [None, "", 0, False, [], {}]}}
    return {"required": [key], "properties": {key: value}}


def _section(kind: str, rules, default: str) -> Dict[str, Any]:
    """Dispatch on ``"type"``; without it, on the inference rules, first match wins."""
    names = registry.names(kind)

    def ref(name: str) -> Dict[str, Any]:
        if name in names:
            return {"$ref": f"#/$defs/{kind}.{name}"}
        dist = FIRST_PARTY.get((kind, name))
        hint = f" (pip install {dist})" if dist else ""
        return {"not": {}, "description": f"this section is inferred to be of type {name!r}, which is not "
                                          f"installed{hint}"}

    inferred = ref(default)
    for tower_type, key, test in reversed(rules):
        inferred = {"if": _has_value(key, test), "then": ref(tower_type), "else": inferred}
    explicit = {"allOf": [{"if": {"properties": {"type": {"const": name}}}, "then": ref(name)} for name in names]}
    return {"type": "object", "properties": {"type": {"enum": names, "description": "Registered tower type."}},
            "if": {"required": ["type"]}, "then": explicit, "else": inferred}


def _tokenizer_rules() -> List[Dict[str, Any]]:
    """Which tokenizer a text_cfg selects (named, or inferred as config.py does), and its keys."""
    no_name = {"anyOf": [{"not": {"required": ["tokenizer"]}}, {"properties": {"tokenizer": {"type": "null"}}}]}
    hf_named = {"required": ["hf_tokenizer_name"], "properties": {"hf_tokenizer_name": {"type": "string"}}}

    def selects(name: str) -> Dict[str, Any]:
        named = {"required": ["tokenizer"], "properties": {"tokenizer": {"const": name}}}
        if name == "hf":
            return {"anyOf": [named, {"allOf": [no_name, hf_named]}]}
        if name == "clip":
            return {"anyOf": [named, {"allOf": [no_name, {"not": hf_named}]}]}
        return named

    rules = [{"if": {"not": selects("hf")}, "then": {"properties": {"hf_tokenizer_name": _NOT_ALLOWED,
                                                                    "tokenizer_mode": _NOT_ALLOWED}}}]
    for entry in registry.entries("tokenizer"):
        options = entry.meta.get("options")
        if options is not None:
            rules.append({"if": selects(entry.name), "then": {"properties": {"tokenizer_kwargs": {
                "anyOf": [{"type": "null"}, {"type": "object", "propertyNames": {"enum": list(options)}}]}}}})
    return rules


def model_config_schema() -> Dict[str, Any]:
    """JSON Schema of a model config, reflecting the tower types and tokenizers installed now."""
    tokenizer = json_schema(TokenizerCfg, "tokenizer keys")["properties"]
    tokenizer["tokenizer"] = {"anyOf": [{"enum": registry.names("tokenizer")}, {"type": "null"}],
                              "description": tokenizer["tokenizer"].get("description", "")}
    defs = {**_tower_defs("vision_tower", None), **_tower_defs("text_tower", tokenizer)}
    text = _section("text_tower", TEXT_TYPE_RULES, DEFAULT_TYPES["text_tower"])
    text["allOf"] = _tokenizer_rules()
    top = json_schema(ModelCfg, "clipkit model config", {
        "vision_cfg": _section("vision_tower", VISION_TYPE_RULES, DEFAULT_TYPES["vision_tower"]),
        "text_cfg": text})
    top["properties"]["schema_version"]["maximum"] = SCHEMA_VERSION  # a newer file needs a newer clipkit
    top["required"] = ["embed_dim", "vision_cfg", "text_cfg"]
    top["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    top["$defs"] = defs
    return top
