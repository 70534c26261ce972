"""The kinds of part clipkit's registry holds, each declared once, and everything derived from them.

A kind is one :class:`KindSpec` entry in :data:`KINDS`: its hook, the word messages use for it, the
``register()`` keywords it accepts, the protocol its factories satisfy, its contract cases, where its
parts are selected in a model config (and so how they show in ``clipkit config schema`` and in the
record of a saved model), and the ``clipkit plugin new`` template that writes one. The registry,
``clipkit.testing``, provenance, the schema, ``clipkit plugins`` and the scaffold all read this table,
so adding a kind is one :func:`declare` call here (plus its protocol and its contract checks), and the
name in the :data:`Kind` literal so type checkers know it.

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

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterator, List, Literal, Optional, Tuple

from . import exporters as _exporters
from . import hookspecs

# the trainer's kinds' protocols live beside the trainer code that calls them (these modules are torch-free)
from .train import data_sources as _data_sources
from .train import objectives as _objectives
from .train import report as _report

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
        protocol: what a registered factory satisfies (``None`` when what is registered is data).
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
    protocol: Optional[Any] = None
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


_TOWER_CONTRACTS = ("builds", "output-shape", "output-tokens", "layer-groups", "backward", "grad-checkpointing",
                    "autocast", "save-load", "freezer", "stages")
_TOWER_DOC = ("``register(type_name, factory: TowerFactory, config=ConfigClass, example={...}, infer=...)``.\n\n"
              "``example`` is a small section (without ``type``) that builds quickly; the contract tests build "
              "it. ``infer`` names the key(s) whose value, in a section without ``type``, selects this type "
              "(``Infer(key)``, ``Infer(key, 'list')`` or just the key).")

declare(KindSpec(
    VISION_TOWER, "vision", "register_vision_towers", "vision tower type",
    "Register image towers: " + _TOWER_DOC,
    protocol=hookspecs.TowerFactory, keywords=frozenset({"example", "infer"}), contracts=_TOWER_CONTRACTS,
    checks="clipkit._contract:TOWER_CHECKS", section="vision_cfg", select_key="type", default="vit",
    tower_attrs=("image_size",), recorded=True,
    scaffold=Scaffold("a vision tower type (small conv net)",
                      "A small convolutional vision tower for clipkit (tower type $name)", "model")))
declare(KindSpec(
    TEXT_TOWER, "text", "register_text_towers", "text tower type",
    "Register text towers: " + _TOWER_DOC + "\n\n``flat_state_dict=True`` declares that, in a model whose "
    "config does not set ``custom_text``, the tower's state dict keys sit at the top level of the model "
    "(OpenCLIP's ``CLIP`` layout).",
    protocol=hookspecs.TowerFactory, keywords=frozenset({"example", "infer", "flat_state_dict"}),
    contracts=_TOWER_CONTRACTS, checks="clipkit._contract:TOWER_CHECKS", section="text_cfg", select_key="type",
    default="transformer", tower_attrs=("context_length", "vocab_size"), recorded=True,
    scaffold=Scaffold("a text tower type (convolutions over token embeddings)",
                      "A convolutional text tower for clipkit (tower type $name)", "model")))
declare(KindSpec(
    POOLER, "pooler", "register_poolers", "pooler",
    "Register poolers for towers that pool token features: ``register(name, factory: PoolerFactory)``.",
    protocol=hookspecs.PoolerFactory, contracts=("pooled-shape", "attention-mask"),
    checks="clipkit._contract:POOLER_CHECKS",
    scaffold=Scaffold("a pooler for HuggingFace text towers (last real token)",
                      "A last-token pooler for the HuggingFace text towers of clipkit (pooler $name)", "pooler",
                      requirement="clipkit-torch[hf]")))
declare(KindSpec(
    TOKENIZER, "tokenizer", "register_tokenizers", "tokenizer",
    "Register tokenizers, selected by ``text_cfg.tokenizer``: ``register(name, factory: TokenizerFactory)``.\n\n"
    "``options=(...)`` lists the ``tokenizer_kwargs`` it takes, so configs are checked against them; "
    "``infer=`` names the ``text_cfg`` key(s) that select it when ``tokenizer`` is not given; "
    "``example={...}`` is the ``text_cfg`` its contract cases build it from.",
    protocol=hookspecs.TokenizerFactory, keywords=frozenset({"options", "example", "infer"}),
    contracts=("token-ids", "special-ids"), checks="clipkit._contract:TOKENIZER_CHECKS", section="text_cfg",
    select_key="tokenizer", default="clip", recorded=True,
    scaffold=Scaffold("a tokenizer (UTF-8 bytes)", "A byte-level tokenizer for clipkit (tokenizer $name)",
                      "tokenizer")))
declare(KindSpec(
    FREEZER, "freezer", "register_freezers", "freezer",
    "Register how to lock a tower type: ``register(tower_type, freezer: Freezer)``.",
    protocol=hookspecs.Freezer, contracts=("freezer",), checks="clipkit._contract:FREEZER_CHECKS",
    keyed_by=(VISION_TOWER, TEXT_TOWER), recorded=True,
    fallback="locking uses clipkit's default freezer",
    scaffold=Scaffold("a freezer, for a tower type reusing the builtin ViT",
                      "The builtin ViT of clipkit as tower type $name, locked with its projection kept trainable",
                      "freezer")))
declare(KindSpec(
    MODEL_CONFIG, "model_config", "register_model_configs", "model config",
    "Ship named model configs: ``register(model_name, source: ModelConfigSource, pretrained={...})``.\n\n"
    "``pretrained`` maps the config's pretrained tags to their entries, as in clipkit's pretrained table "
    "(``hf_hub``, ``mean``, ``std``, ``interpolation``, ``resize_mode``, ``quick_gelu``).",
    keywords=frozenset({"pretrained"}), contracts=("validates",), checks="clipkit._contract:MODEL_CONFIG_CHECKS",
    data=True))
declare(KindSpec(
    OBJECTIVE, "objective", "register_objectives", "objective",
    "Register training objectives, selected by ``clipkit-train --objective NAME``: "
    "``register(name, factory: ObjectiveFactory, config=OptionsClass, example={...})``.\n\n"
    "``factory(options, ctx)`` gets an instance of ``config`` (fields declared with ``option()``; set with "
    "``--objective-opt key=value``) and an ``ObjectiveContext``; the objective maps the step's outputs to "
    "named 0-d loss terms. ``example`` is the options its contract cases build it with (default: the "
    "class's defaults). ``flags={option: '--flag-name'}`` gives options a ``clipkit-train`` flag of their own "
    "(OpenCLIP's names, say); giving one selects the objective when ``--objective`` is not given.",
    protocol=_objectives.ObjectiveFactory, keywords=frozenset({"example", "flags"}),
    contracts=("builds", "terms", "gradients", "accumulation", "state-dict"),
    checks="clipkit.train.part_checks:OBJECTIVE_CHECKS",
    scaffold=Scaffold("a training objective (CLIP loss plus a uniformity term)",
                      "A training objective for clipkit-train (objective $name)", "objective")))
declare(KindSpec(
    REPORTER, "reporter", "register_reporters", "reporter",
    "Register where training metrics go, selected by ``clipkit-train --report-to a,b``: "
    "``register(name, factory: ReporterFactory, always=False, needs_folder=False, requires=None)``.\n\n"
    "``factory(ctx: ReporterContext)`` returns an object with ``scalars(values, step)``, ``result(metrics)`` "
    "and ``close()``. ``always=True``: used by every run that has a run folder, without being named; "
    "``needs_folder=True``: naming it with ``--logs none`` is a flag error; ``requires='module'``: naming it "
    "without that module installed is a flag error.",
    protocol=_report.ReporterFactory, keywords=frozenset({"always", "needs_folder", "requires"}),
    contracts=("builds", "reports", "closes"), checks="clipkit.train.part_checks:REPORTER_CHECKS",
    scaffold=Scaffold("a reporter (training metrics as CSV rows)",
                      "A reporter for clipkit-train: metrics as CSV rows (reporter $name)", "reporter")))
declare(KindSpec(
    DATA_SOURCE, "data_source", "register_data_sources", "data source",
    "Register how training and evaluation samples are read, selected by ``clipkit-train --dataset-type NAME``: "
    "``register(name, factory: DataSourceFactory, example=..., extensions=(...), prefixes=(...), folders=False, "
    "yields=('text',), generated=False, exact_resume=True)``.\n\n"
    "``factory(spec, ctx: DataSourceContext)`` returns a ``DataSource`` (units, and how units are read into "
    "samples). With ``--dataset-type auto`` (the default) a path starting with one of ``prefixes``, else "
    "ending in one of ``extensions``, else a folder (``folders=True``) selects it. ``yields``: ``'text'`` "
    "(captions, for training and retrieval) and/or ``'label'`` (classes, for zero-shot evaluation). "
    "``generated=True``: it makes its own samples (no spec; ``--train-num-samples`` of them). "
    "``exact_resume=False`` declares that it cannot resume mid-epoch exactly (the trainer says so). "
    "``example`` is what its contract cases read: a spec of a tiny dataset the plugin ships (relative to its "
    "package), or a function ``make(folder) -> spec`` that writes one into an empty folder.",
    protocol=_data_sources.DataSourceFactory,
    keywords=frozenset({"example", "extensions", "prefixes", "folders", "yields", "generated", "exact_resume"}),
    contracts=("builds", "units", "samples", "counted-skips", "workers", "resume"),
    checks="clipkit.train.data_source_checks:DATA_SOURCE_CHECKS",
    scaffold=Scaffold("a data source (image-caption pairs from a JSON Lines file)",
                      "A data source for clipkit-train: image-caption pairs listed in JSON Lines files "
                      "(--dataset-type $name)", "source")))
declare(KindSpec(
    EXPORTER, "exporter", "register_exporters", "export format",
    "Register formats for ``clipkit export --format NAME``: ``register(name, factory: ExporterFactory)``.\n\n"
    "``factory()`` returns an object with ``supports(model) -> None | reason`` (whether this format can "
    "express the model: a plugin declares that its tower exports by accepting it here) and "
    "``export(model, out) -> report lines``, which writes the folder ``out`` and checks it.",
    protocol=_exporters.ExporterFactory, contracts=("builds", "supports"),
    checks="clipkit.exporters.checks:EXPORTER_CHECKS"))
declare(KindSpec(
    MODEL_FAMILY, "family", "register_model_families", "model family",
    "Register how a model is assembled from its two towers (and modules of its own): "
    "``register(name, factory: ModelFamilyFactory, config=ConfigClass, infer=..., example={...})``.\n\n"
    "A config selects its family by the top-level key ``model_family``, else by the ``infer=`` rules (a "
    "top-level key the family adds), else it is ``clip`` (:class:`clipkit.model.ClipModel`). ``config`` "
    "types the top-level keys the family adds (each field one key); the factory gets an instance of it and "
    "a ``ModelContext`` with the built towers. ``example`` is a whole small model config of the family "
    "(its towers included) that its contract cases build. ``trains_with='NAME'`` is the objective "
    "``clipkit-train`` trains the family's models with when no flag selects one.",
    protocol=hookspecs.ModelFamilyFactory, keywords=frozenset({"infer", "example", "trains_with"}),
    contracts=("builds", "forward", "save-load"), checks="clipkit._contract:MODEL_FAMILY_CHECKS",
    section=TOP_LEVEL, select_key="model_family", default="clip", recorded=True))
