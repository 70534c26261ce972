"""Typed config dataclasses: declare fields once, get validation, docs and JSON Schema from them.

A config class is a ``@dataclass`` whose fields carry their meaning and bounds::

    @dataclass
    class ViTCfg:
        width: int = option(768, "Hidden size of the transformer.", gt=0)

        def check(self):                      # optional cross-field rules
            if self.width % self.head_width:
                yield "width", "must be divisible by head_width"

No torch here: this module runs in ``clipkit config check`` and in every plugin's import.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import Problem, suggest

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, doc: str = "", *, gt: Optional[float] = None, ge: Optional[float] = None,
           lt: Optional[float] = None, le: Optional[float] = None, choices: Optional[Iterable[Any]] = None,
           default_factory: Any = _MISSING, extra: Optional[Mapping[str, Any]] = None) -> Any:
    """A dataclass field with its documentation and bounds (checked by :func:`validate`); ``extra`` adds
    metadata of the caller's own (clipkit-train's flag names and docs table columns)."""
    meta = {"doc": doc, "gt": gt, "ge": ge, "lt": lt, "le": le,
            "choices": tuple(choices) if choices is not None else None, **(extra or {})}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin in (list, List):
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if origin in (dict, Dict) or tp is dict:
        return "object"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any) -> Tuple[bool, Any]:
    """(ok, value converted to the field's Python form). JSON lists become tuples for tuple fields."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            return False, value
        out = []
        for item, arg in zip(value, args):
            ok, conv = _coerce(item, arg)
            if not ok:
                return False, value
            out.append(conv)
        return True, tuple(out)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            return False, value
        (arg,) = typing.get_args(tp) or (Any,)
        out = []
        for item in value:
            ok, conv = _coerce(item, arg)
            if not ok:
                return False, value
            out.append(conv)
        return True, out
    if origin in (dict, Dict) or tp is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value), value
    return isinstance(value, tp), value


def _numbers(value: Any) -> Iterable[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)


def _bounds_problem(value: Any, meta: Mapping[str, Any]) -> Optional[str]:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
    for number in _numbers(value):
        if isinstance(number, float) and not math.isfinite(number):
            return f"must be a finite number, got {number!r}"
        for key, test, word in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                                ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
            bound = meta.get(key)
            if bound is not None and not test(number, bound):
                return f"must be {word} {bound:g}, got {value!r}"
    return None


def field_docs(cls: type) -> List[Dict[str, Any]]:
    """name, type, default and doc of every field, for docs and ``clipkit config schema``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not _MISSING:
            default: Any = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = _MISSING
        rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default,
                     "required": default is _MISSING, "doc": f.metadata.get("doc", ""), "meta": f.metadata})
    return rows


def validate(cls: type, data: Mapping[str, Any], path: str, what: str,
             extra_known: Iterable[str] = ()) -> Tuple[Optional[Any], List[Problem]]:
    """Bind ``data`` to dataclass ``cls``; return the instance (or None) and every problem found.

    ``path`` prefixes key paths (``"vision_cfg"``); ``what`` names the part in unknown-key messages
    (``"vision tower type 'vit'"``); ``extra_known`` are keys handled elsewhere and skipped here.
    """
    problems: List[Problem] = []
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    extra_known = set(extra_known)
    kwargs: Dict[str, Any] = {}
    prefix = f"{path}." if path else ""
    for key, value in data.items():
        if key in extra_known:
            continue
        if key not in fields:
            hint = suggest(key, [*fields, *extra_known], cutoff=0.7)
            problems.append(Problem(f"{prefix}{key}", f"unknown key for {what}{hint}"))
            continue
        ok, converted = _coerce(value, hints[key])
        if not ok:
            problems.append(Problem(f"{prefix}{key}", f"expected {_type_name(hints[key])}, got {json_repr(value)}"))
            continue
        bad = _bounds_problem(converted, fields[key].metadata)
        if bad:
            problems.append(Problem(f"{prefix}{key}", bad))
            continue
        kwargs[key] = converted
    for name, f in fields.items():
        if f.default is _MISSING and f.default_factory is _MISSING and name not in data:
            problems.append(Problem(f"{prefix}{name}", f"missing required key for {what}"))
    if problems:
        return None, problems
    instance = cls(**kwargs)
    check = getattr(instance, "check", None)
    if callable(check):
        for key, message in check() or ():
            problems.append(Problem(f"{prefix}{key}" if key else path, message))
    return (None if problems else instance), problems


def json_repr(value: Any) -> str:
    """A value as JSON would spell it, for messages."""
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_schema(cls: type, title: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A JSON Schema (draft 2020-12) object for a config dataclass."""
    hints = typing.get_type_hints(cls)
    props: Dict[str, Any] = {}
    required = []
    for row, f in zip(field_docs(cls), dataclasses.fields(cls)):
        prop = _schema_type(hints[f.name])
        if row["doc"]:
            prop["description"] = row["doc"]
        if not row["required"]:
            try:
                import json

                json.dumps(row["default"])
                prop["default"] = list(row["default"]) if isinstance(row["default"], tuple) else row["default"]
            except TypeError:
                pass
        else:
            required.append(f.name)
        meta = f.metadata
        bounds = {word: meta[key] for key, word in (("gt", "exclusiveMinimum"), ("ge", "minimum"),
                                                    ("lt", "exclusiveMaximum"), ("le", "maximum"))
                  if meta.get(key) is not None}
        _add_bounds(prop, bounds)
        if meta.get("choices") is not None:
            prop["enum"] = list(meta["choices"])
        props[f.name] = prop
    props.update(extra or {})
    schema: Dict[str, Any] = {"title": title, "type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _add_bounds(schema: Dict[str, Any], bounds: Dict[str, Any]) -> None:
    """Put numeric bounds on every number inside ``schema`` (an int, or the items of a size pair)."""
    if not bounds:
        return
    if schema.get("type") in ("integer", "number"):
        schema.update(bounds)
    for key in ("anyOf", "prefixItems"):
        for sub in schema.get(key, []):
            _add_bounds(sub, bounds)
    if isinstance(schema.get("items"), dict):
        _add_bounds(schema["items"], bounds)


def _schema_type(tp: Any) -> Dict[str, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return {}
    if tp is type(None):
        return {"type": "null"}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_type(a) for a in typing.get_args(tp)]}
    if origin is typing.Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema_type(args[0])}
        return {"type": "array", "prefixItems": [_schema_type(a) for a in args], "minItems": len(args),
                "maxItems": len(args)}
    if origin in (list, List):
        (arg,) = typing.get_args(tp) or (Any,)
        return {"type": "array", "items": _schema_type(arg)}
    if origin in (dict, Dict) or tp is dict:
        return {"type": "object"}
    return {"type": {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, "object")}
