"""The kinds of part clipkit's registry holds, each declared once, and everything derived from them.

A kind is one :class:`KindSpec` entry in :data:`KINDS`: its hook, the word messages use for it, the
``register()`` keywords it accepts, the protocol its factories satisfy, its contract cases, where its
parts are selected in a model config (and so how they show in ``clipkit config schema`` and in the
record of a saved model), and the ``clipkit plugin new`` template that writes one. The registry,
``clipkit.testing``, provenance, the schema, ``clipkit plugins`` and the scaffold all read this table.
clipkit's kinds are data: one entry of ``kinds.json`` beside this module each, read into :data:`KINDS`
by :func:`declare` at import. Adding a kind is an entry there (plus its protocol and its contract
checks, named by ``module:attr``), and its name in the :data:`Kind` literal so type checkers know it.
In ``kinds.json``, ``tower`` holds what the tower kinds (those with ``tower_attrs``) share: their
contract cases (unless an entry lists its own) and the text ``{tower}`` stands for in their ``doc``.

Why the registry collects hooks per implementation rather than calling ``pm.hook.register_*()``:
pluggy's hook call runs every plugin's implementation in one call, and the first exception ends the
call for all of them, without saying whose it was. clipkit promises that one broken plugin costs only
that plugin (a warning naming it, ``clipkit plugins`` showing why, everything else working) and that a
name remembers which plugin registered it. So the loader walks ``get_hookimpls()`` and calls each
implementation itself, with a ``register`` callback bound to that plugin, staging what it registers;
a plugin whose hook raises has all of its staged parts dropped, so it is either wholly in or wholly out,
and the loaded snapshot is swapped in whole (reloads are atomic).

No torch here, nor anything heavy: the ``clipkit`` command reads this table to build its parser.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Dict, FrozenSet, Iterator, List, Literal, Optional, Tuple

from . import hookspecs

#: The name of a kind of part. Every :class:`KindSpec` of :data:`KINDS` has one of these names
#: (``tests/test_kinds.py`` holds the two together).
Kind = Literal["vision_tower", "text_tower", "pooler", "tokenizer", "freezer", "model_config", "objective",
               "reporter", "data_source", "exporter", "model_family"]

VISION_TOWER: Kind = "vision_tower"
TEXT_TOWER: Kind = "text_tower"
POOLER: Kind = "pooler"
TOKENIZER: Kind = "tokenizer"
FREEZER: Kind = "freezer"
MODEL_CONFIG: Kind = "model_config"
OBJECTIVE: Kind = "objective"
REPORTER: Kind = "reporter"
DATA_SOURCE: Kind = "data_source"
EXPORTER: Kind = "exporter"
MODEL_FAMILY: Kind = "model_family"

#: The ``section`` of a kind whose parts are selected at the top level of a model config.
TOP_LEVEL = ""


@dataclass(frozen=True)
class Scaffold:
    """How ``clipkit plugin new --kind SHORT`` writes a plugin of this kind.

    The templates are ``clipkit/templates/plugin/SHORT/``: ``__init__.py.tmpl`` (the hookimpl, torch-free),
    ``MODULE.py.tmpl`` (the part), ``test.py.tmpl``, ``usage.md.tmpl`` (the README's usage section) and,
    when the kind's parts go into model configs, ``config.json.tmpl`` (a config the plugin ships).
    """

    blurb: str          # one line in `clipkit plugin new --help`
    summary: str        # the pyproject description; ``$name`` is the plugin name
    module: str         # the package module holding the part, beside __init__.py
    requirement: str = "clipkit-torch"


@dataclass(frozen=True)
class KindSpec:
    """One kind of registered part.

    Attributes:
        name: the registry kind, as :data:`Kind`.
        short: its short name: ``clipkit plugin new --kind`` and the prefix of record keys of parts
            keyed by it (``vision`` gives ``vision_freezer``).
        hook: the hook plugins implement to register parts of this kind.
        title: how messages name one part (``"vision tower type 'resnet'"``).
        doc: the hook's documentation: what ``register()`` takes for this kind.
        protocol: ``"package.module:attr"`` of the protocol a registered factory satisfies (``None`` when
            what is registered is data); the trainer's kinds' protocols live beside the code that calls them.
        keywords: ``register()`` keywords accepted besides ``config``; others are a plugin bug.
        contracts: the contract cases every part of this kind runs, in order.
        checks: ``"package.module:attr"`` of a mapping contract -> ``check(entry, section)``, imported
            when a case runs (the checks import torch; this table must not).
        data: registered targets are data (a model config), never imported.
        section: the model-config section a part of this kind is selected in, if any (:data:`TOP_LEVEL`:
            the config's top level).
        select_key: the key of ``section`` that names the part; without it the part is inferred from
            the ``infer=`` rules its registrations declare, else it is ``default``.
        default: the part a section that names none and matches no rule gets.
        tower_attrs: for towers (built with a :class:`~clipkit.hookspecs.TowerContext`, held to the tower
            protocol), the attributes a built tower must have besides the common ones.
        keyed_by: kinds whose part names this kind's parts are registered under (a freezer is keyed
            by its tower's type).
        recorded: a saved model records which plugin provided its part of this kind.
        fallback: for a recorded part a model still loads without (with a warning): what it does instead.
        scaffold: the ``clipkit plugin new`` template, if there is one.
    """

    name: Kind
    short: str
    hook: str
    title: str
    doc: str
    protocol: Optional[str] = None
    keywords: FrozenSet[str] = frozenset()
    contracts: Tuple[str, ...] = ()
    checks: Optional[str] = None
    data: bool = False
    section: Optional[str] = None
    select_key: Optional[str] = None
    default: Optional[str] = None
    tower_attrs: Tuple[str, ...] = ()
    keyed_by: Tuple[Kind, ...] = ()
    recorded: bool = False
    fallback: Optional[str] = None
    scaffold: Optional[Scaffold] = None

    @property
    def is_tower(self) -> bool:
        """Parts of this kind are model towers (built with a TowerContext, held to the tower protocol)."""
        return bool(self.tower_attrs)


#: Every declared kind, by name, in the order they are listed (``clipkit plugins``, contract cases).
KINDS: Dict[str, KindSpec] = {}


def declare(spec: KindSpec) -> KindSpec:
    """Add a kind to :data:`KINDS`. The registry sees it at its next load (``registry.reload()``)."""
    if spec.name in KINDS or any(s.hook == spec.hook or s.short == spec.short for s in KINDS.values()):
        raise ValueError(f"kind {spec.name!r} (hook {spec.hook}, short name {spec.short!r}) is already declared")
    KINDS[spec.name] = spec
    return spec


def withdraw(name: str) -> None:
    """Remove a kind :func:`declare` added (for tests of the machinery)."""
    KINDS.pop(name, None)


def spec(kind: str) -> KindSpec:
    """The declaration of ``kind``; ``KeyError`` naming the declared kinds when there is none."""
    try:
        return KINDS[kind]
    except KeyError:
        raise KeyError(f"unknown kind {kind!r}; declared kinds: {', '.join(KINDS)}") from None


def title(kind: str) -> str:
    """How messages name one part of ``kind``."""
    return spec(kind).title


def titles() -> Dict[str, str]:
    """Kind -> how messages name one part of it."""
    return {k: s.title for k, s in KINDS.items()}


def towers() -> List[KindSpec]:
    """The tower kinds, in declaration order."""
    return [s for s in KINDS.values() if s.is_tower]


def by_hook() -> Dict[str, Kind]:
    """Hook name -> the kind it fills."""
    return {s.hook: s.name for s in KINDS.values()}


def scaffolds() -> Dict[str, KindSpec]:
    """``clipkit plugin new --kind`` choices -> their kind, in declaration order."""
    return {s.short: s for s in KINDS.values() if s.scaffold is not None}


def recorded_parts() -> Iterator[Tuple[str, KindSpec, Optional[KindSpec]]]:
    """``(record key, kind, keyed-by kind or None)`` for every part a saved model records."""
    for kind in KINDS.values():
        if not kind.recorded:
            continue
        if not kind.keyed_by:
            yield kind.name, kind, None
        for key_kind in kind.keyed_by:
            yield f"{KINDS[key_kind].short}_{kind.name}", kind, KINDS[key_kind]


def hookspec_namespace() -> type:
    """A class with one pluggy hookspec per declared kind, for ``PluginManager.add_hookspecs``."""
    namespace: Dict[str, Any] = {}
    for kind in KINDS.values():
        def hook(register: hookspecs.Register) -> None:
            """Filled in below."""
        hook.__name__ = hook.__qualname__ = kind.hook
        hook.__doc__ = kind.doc
        namespace[kind.hook] = hookspecs.hookspec(hook)
    return type("ClipkitHookspecs", (), namespace)


def _from_table(entry: Dict[str, Any], tower: Dict[str, Any]) -> KindSpec:
    """A :class:`KindSpec` from its ``kinds.json`` entry (JSON lists as the tuples and sets it holds)."""
    fields = dict(entry, doc=entry["doc"].replace("{tower}", tower["doc"]))
    if fields.get("tower_attrs"):
        fields.setdefault("contracts", tower["contracts"])
    for key in ("contracts", "tower_attrs", "keyed_by"):
        if key in fields:
            fields[key] = tuple(fields[key])
    if "keywords" in fields:
        fields["keywords"] = frozenset(fields["keywords"])
    if "scaffold" in fields:
        fields["scaffold"] = Scaffold(**fields["scaffold"])
    return KindSpec(**fields)


def _declare_clipkits_kinds() -> None:
    table = json.loads((resources.files("clipkit") / "kinds.json").read_text(encoding="utf-8"))
    for entry in table["kinds"]:
        declare(_from_table(entry, table["tower"]))


_declare_clipkits_kinds()
