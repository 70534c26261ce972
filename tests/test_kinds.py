"""clipkit.kinds: each kind of part declared once, everything else derived from it; inference declared by
registrations; the public author API (clipkit.plugin) and the names that moved."""
import ast
import importlib
import importlib.util
import json
import re
import subprocess
import sys
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import jsonschema
import pytest

import clipkit
from clipkit import kinds
from clipkit._schema import model_config_schema
from clipkit.builtin.transformer import TextTransformerCfg
from clipkit.builtin.vit import ViTCfg
from clipkit.cli import main
from clipkit.config import infer_text_type, infer_tokenizer, infer_vision_type, validate_model_config
from clipkit.errors import ContractError, UnknownPartError
from clipkit.plugin import Infer, option, parts_provenance
from clipkit.registry import PluginWarning, import_target, registry
from clipkit.testing import contract_cases

ROOT = Path(__file__).resolve().parent.parent


# -- the table ------------------------------------------------------------------------------------

def test_the_kind_literal_names_every_declared_kind_and_each_kind_has_its_checks():
    assert typing.get_args(kinds.Kind) == tuple(kinds.KINDS)
    assert [spec.hook for spec in kinds.KINDS.values()] == list(kinds.by_hook())
    for spec in kinds.KINDS.values():
        assert set(import_target(spec.checks, what=spec.name)) == set(spec.contracts), spec.name
        # the protocol a factory satisfies, named as module:attr, is a typing Protocol (None: data is registered)
        assert spec.data if spec.protocol is None else getattr(import_target(spec.protocol, what=spec.name),
                                                               "_is_protocol", False), spec.name
    assert [spec.name for spec in kinds.towers()] == [kinds.VISION_TOWER, kinds.TEXT_TOWER]
    assert list(kinds.scaffolds())[:5] == ["vision", "text", "pooler", "tokenizer", "freezer"]
    assert {kinds.OBJECTIVE, kinds.REPORTER} <= set(kinds.scaffolds())  # the trainer's kinds: short name = kind
    assert [key for key, _, _ in kinds.recorded_parts()] == ["vision_tower", "text_tower", "tokenizer",
                                                             "vision_freezer", "text_freezer", "model_family"]


def test_the_kinds_are_read_from_their_table_with_the_tower_kinds_sharing_its_tower_entry():
    table = json.loads((ROOT / "clipkit" / "kinds.json").read_text())
    assert [entry["name"] for entry in table["kinds"]] == list(kinds.KINDS)
    for spec in kinds.towers():
        assert spec.contracts == tuple(table["tower"]["contracts"]) and table["tower"]["doc"] in spec.doc
        assert "{tower}" not in spec.doc
    assert kinds.spec(kinds.OBJECTIVE).keywords == frozenset({"example", "flags"})
    assert kinds.spec(kinds.POOLER).scaffold == kinds.Scaffold(
        "a pooler for HuggingFace text towers (last real token)",
        "A last-token pooler for the HuggingFace text towers of clipkit (pooler $name)", "pooler",
        requirement="clipkit-torch[hf]")
    # the kinds table loads without torch, the trainer or the exporters (the clipkit command reads it)
    code = ("import sys, clipkit.kinds; heavy = [m for m in ('torch', 'clipkit.train.objectives', 'clipkit.exporters') "
            "if m in sys.modules]; print(heavy)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


class WidgetFactory(Protocol):
    """What a widget factory is: ``factory() -> int``, the answer."""

    def __call__(self) -> int: ...


def _answers(entry, section):
    if entry.load()() != 42:
        raise ContractError(f"{entry.where} breaks the contract 'answers': it does not answer 42")


#: the contract checks of the widget kind, named by its KindSpec as "module:attr" like the real kinds
WIDGET_CHECKS = {"answers": _answers}


def make_widget():
    return 42


def make_wrong_widget():
    return 41


@pytest.fixture
def widget_kind():
    """A kind that is not a tower (no config section, no tower contract), declared for one test."""
    spec = kinds.declare(kinds.KindSpec(
        "widget", "widget", "register_widgets", "widget", "Register widgets: ``register(name, factory)``.",
        protocol=f"{__name__}:WidgetFactory", keywords=frozenset({"color"}), contracts=("answers",),
        checks=f"{__name__}:WIDGET_CHECKS",
        scaffold=kinds.Scaffold("a widget (it answers 42)", "A widget for clipkit ($name)", "widget")))
    registry.reload()
    yield spec
    kinds.withdraw("widget")
    registry.reload()


def test_a_new_kind_is_one_entry_and_everything_follows(widget_kind, clipkit_plugins, capsys):
    @clipkit.hookimpl
    def register_widgets(register):
        register("answer", f"{__name__}:make_widget", color="blue")
        register("wrong", f"{__name__}:make_wrong_widget")

    clipkit_plugins.module("widgetplug", register_widgets=register_widgets)
    assert registry.names("widget") == ["answer", "wrong"]
    assert registry.get("widget", "answer").load()() == 42 and registry.get("widget", "answer").meta == {"color": "blue"}
    with pytest.raises(UnknownPartError, match=r"unknown widget 'answr' \(did you mean 'answer'\?\); installed: "
                                               r"answer, wrong"):
        registry.get("widget", "answr")

    assert main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    assert plugins["widgetplug"]["registers"] == {"widget": ["answer", "wrong"]}
    assert main(["plugins"]) == 0
    assert "    widget: answer, wrong" in capsys.readouterr().out

    cases = contract_cases("widgetplug")
    assert [str(c) for c in cases] == ["plugin:widgetplug:loads", "widget:answer:answers", "widget:wrong:answers"]
    cases[1].run()
    with pytest.raises(ContractError, match="widget 'wrong' from widgetplug in-process .* does not answer 42"):
        cases[2].run()

    with pytest.raises(SystemExit):
        main(["plugin", "new", "--help"])
    help_text = capsys.readouterr().out
    assert list(kinds.scaffolds())[-1] == "widget" and "{" + ",".join(kinds.scaffolds()) + "}" in help_text
    assert "  widget     a widget (it answers 42)" in help_text


def test_a_new_kinds_keywords_and_hook_name_are_checked(widget_kind, clipkit_plugins):
    @clipkit.hookimpl
    def register_widgets(register):
        register("big", f"{__name__}:make_widget", size=3)

    with pytest.warns(PluginWarning, match=r"register\(\) of widget 'big' got unknown keyword\(s\) size"):
        clipkit_plugins.module("badwidget", register_widgets=register_widgets)

    @clipkit.hookimpl
    def register_widget(register):
        register("small", f"{__name__}:make_widget")

    with pytest.warns(PluginWarning, match="unknown hook 'register_widget' \\(did you mean 'register_widgets'\\?\\)"):
        clipkit_plugins.module("typowidget", register_widget=register_widget)
    assert registry.names("widget") == []


def test_a_kind_cannot_be_declared_twice():
    with pytest.raises(ValueError, match="kind 'pooler' .* is already declared"):
        kinds.declare(kinds.spec(kinds.POOLER))


# -- inference declared by registrations --------------------------------------------------------------

@dataclass
class DotsCfg(ViTCfg):
    """A ViT that also counts dots: its own key selects it."""

    dots_depth: int = option(0, "How many dots.", ge=0)


def test_a_third_party_tower_declares_its_own_inference(plugin_module, tiny_cfg):
    @clipkit.hookimpl
    def register_vision_towers(register):
        register("dots", "clipkit.builtin.vit.model:build_vit", config=DotsCfg, infer=Infer("dots_depth"))
        # a rule on a key a builtin already claims: the builtin's is tried first
        register("grabby", "clipkit.builtin.vit.model:build_vit", config=ViTCfg, infer="timm_model_name")

    plugin_module("dotsplug", register_vision_towers=register_vision_towers)
    tiny_cfg["vision_cfg"]["dots_depth"] = 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one rule matches: no warning
        assert validate_model_config(tiny_cfg).vision_type == "dots"
        assert infer_vision_type({"dots_depth": 0}) == "vit"  # "set" means a value, as for timm_model_name
    # two parts' rules match: the first is used, and the warning names both, their plugins and the way out
    with pytest.warns(PluginWarning, match=r"^vision_cfg: a section without 'type' matches the infer= rules of 2 "
                                           r"vision tower types: 'timm' \(timm_model_name\) of clipkit-torch .*, "
                                           r"'grabby' \(timm_model_name\) of dotsplug .*; 'timm' is used; set "
                                           r"vision_cfg.type to choose$"):
        assert infer_vision_type({"timm_model_name": "test_vit"}) == "timm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert infer_vision_type({"type": "grabby", "timm_model_name": "test_vit"}) == "grabby"

    schema = jsonschema.Draft202012Validator(model_config_schema())
    assert not list(schema.iter_errors(tiny_cfg))  # the schema infers dots too, so dots_depth is allowed
    tiny_cfg["vision_cfg"]["type"] = "vit"
    assert list(schema.iter_errors(tiny_cfg))

    tiny_cfg["vision_cfg"].pop("type")
    tiny_cfg["vision_cfg"]["dots_depth"] = -1
    with pytest.raises(clipkit.ConfigError, match="^vision_cfg.dots_depth: must be >= 0, got -1$"):
        validate_model_config(tiny_cfg)


def test_a_bad_infer_rule_fails_its_plugin(plugin_module):
    @clipkit.hookimpl
    def register_vision_towers(register):
        register("oddrule", "clipkit.builtin.vit.model:build_vit", config=ViTCfg, infer=42)

    with pytest.warns(PluginWarning, match=r"register\(\) of vision tower type 'oddrule': infer=42: expected a key"):
        plugin_module("oddplug", register_vision_towers=register_vision_towers)
    assert not registry.has(kinds.VISION_TOWER, "oddrule")


def test_the_resnet_plugin_declares_its_rule_itself(monkeypatch):
    source = ROOT / "plugins" / "clipkit-plugin-resnet" / "clipkit_plugin_resnet" / "__init__.py"
    spec = importlib.util.spec_from_file_location("resnet_plugin_source", source)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    registered = {}
    module.register_vision_towers(lambda name, factory, **keywords: registered.setdefault(name, keywords))
    assert registered["resnet"]["infer"] == Infer("layers", "list")
    tree = ast.parse((ROOT / "clipkit" / "config.py").read_text())  # config.py knows no tower's keys
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and id(node) not in docstrings}
    assert not strings & {"layers", "timm_model_name", "hf_model_name", "resnet", "timm"}


def test_a_resnet_release_that_declares_no_rule_is_still_inferred(without_plugins, plugin_module):
    without_plugins("clipkit-plugin-resnet")

    @clipkit.hookimpl
    def register_vision_towers(register):  # as clipkit-plugin-resnet 0.1.0 registered it, before infer=
        register("resnet", "clipkit.builtin.vit.model:build_vit", config=ViTCfg)

    plugin_module("old_resnet", register_vision_towers=register_vision_towers)
    assert infer_vision_type({"layers": [3, 4, 6, 3]}) == "resnet"
    assert infer_vision_type({"layers": 12}) == "vit"
    assert infer_text_type({"hf_model_name": "bert-base-uncased"}) == "hf"


@dataclass
class ByteLevelCfg(TextTransformerCfg):
    """A text transformer over bytes: its key selects the bytes tokenizer."""

    byte_level: bool = option(False, "Read UTF-8 bytes.")


def test_one_function_decides_the_tokenizer_and_every_user_agrees(plugin_module, tiny_cfg, tmp_path):
    assert infer_tokenizer({}) == "clip"
    assert infer_tokenizer({"hf_tokenizer_name": "bert-base-uncased"}) == "hf"
    assert infer_tokenizer({"tokenizer": "clip", "hf_tokenizer_name": "bert-base-uncased"}) == "clip"

    @clipkit.hookimpl
    def register_text_towers(register):
        register("bytetext", "clipkit.builtin.transformer.model:build_text_transformer", config=ByteLevelCfg)

    @clipkit.hookimpl
    def register_tokenizers(register):
        register("bytes", "clipkit.builtin.tokenizers.clip_bpe:build_clip_tokenizer", infer=Infer("byte_level"))

    plugin_module("bytesplug", register_text_towers=register_text_towers, register_tokenizers=register_tokenizers)
    tiny_cfg["text_cfg"].update(type="bytetext", byte_level=True)
    config = validate_model_config(tiny_cfg)
    assert infer_tokenizer(tiny_cfg["text_cfg"]) == config.tokenizer_name == "bytes"
    assert parts_provenance(config)["tokenizer"]["type"] == "bytes"
    assert parts_provenance(tiny_cfg)["tokenizer"]["plugin"] == "bytesplug"
    tiny_cfg["text_cfg"]["byte_level"] = False
    assert validate_model_config(tiny_cfg).tokenizer_name == "clip"


# -- the public author API ----------------------------------------------------------------------------

def test_the_author_api_is_one_public_module_that_imports_no_torch():
    code = ("import sys, clipkit.plugin as p; print([n for n in p.__all__ if not hasattr(p, n)], "
            "[m for m in ('torch', 'timm', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] []"
    import clipkit.plugin as plugin
    from clipkit import _typed, hookspecs

    assert plugin.option is _typed.option and plugin.TowerContext is hookspecs.TowerContext
    assert plugin.hookimpl is clipkit.hookimpl
    # the trainer's and the exporters' kinds too: their constants, contexts and protocols, from the same module
    from clipkit.exporters import ExporterFactory
    from clipkit.train.objectives import BaseObjective, ObjectiveContext
    from clipkit.train.report import ReporterContext

    assert (plugin.OBJECTIVE, plugin.REPORTER, plugin.EXPORTER) == ("objective", "reporter", "exporter")
    assert (plugin.BaseObjective, plugin.ObjectiveContext) == (BaseObjective, ObjectiveContext)
    assert (plugin.ReporterContext, plugin.ExporterFactory) == (ReporterContext, ExporterFactory)


PRIVATE_IMPORT = re.compile(r"from\s+clipkit\._\w+|import\s+clipkit\._|[\"']clipkit\._\w+[.:]")


def test_no_doc_template_or_plugin_imports_private_modules():
    offenders = []
    for folder in ("docs", "clipkit/templates", "plugins", "examples"):
        for path in (ROOT / folder).rglob("*"):
            if not path.is_file() or path.suffix not in (".md", ".py", ".tmpl", ".toml", ".sh", ".json"):
                continue
            if any(part == "build" or part.endswith(".egg-info") for part in path.relative_to(ROOT).parts):
                continue  # left by pip: not part of the repository
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in PRIVATE_IMPORT.finditer(path.read_text())]
    assert offenders == []


@pytest.mark.parametrize("module, name, new, expected", [
    ("clipkit.hookspecs", "HOOK_KINDS", "clipkit.kinds.by_hook()", lambda: kinds.by_hook()),
    ("clipkit.registry", "KIND_TITLES", "clipkit.kinds.titles()", lambda: kinds.titles()),
    ("clipkit.registry", "ALLOWED_META", "clipkit.kinds.spec(kind).keywords",
     lambda: {k: set(s.keywords) for k, s in kinds.KINDS.items()}),
    ("clipkit.testing", "TOWER_CONTRACTS", "clipkit.kinds.spec('vision_tower').contracts",
     lambda: kinds.spec(kinds.VISION_TOWER).contracts),
    ("clipkit.testing", "TOKENIZER_CONTRACTS", "clipkit.kinds.spec('tokenizer').contracts",
     lambda: ("token-ids", "special-ids")),
    ("clipkit.checkpoint", "load_checkpoint", "clipkit.weights.load_checkpoint",
     lambda: importlib.import_module("clipkit.weights").load_checkpoint),
    ("clipkit.checkpoint", "read_state_dict", "clipkit.weights.read_state_dict",
     lambda: importlib.import_module("clipkit.weights").read_state_dict),
])
def test_moved_names_still_import_with_a_warning_naming_the_new_place(module, name, new, expected):
    with pytest.warns(DeprecationWarning, match=re.escape(new)):
        value = getattr(importlib.import_module(module), name)
    assert value == expected()
    assert kinds.titles()[kinds.VISION_TOWER] == "vision tower type"


def test_type_checkers_see_every_lazy_name_where_it_is_loaded_from():
    tree = ast.parse((ROOT / "clipkit" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    seen = {alias.name: f"clipkit{node.module and '.' + node.module}" for node in block.body
            for alias in node.names}
    assert seen == {name: module for name, module in clipkit._LAZY.items()}


def test_python_dash_m_clipkit_is_the_clipkit_command():
    done = subprocess.run([sys.executable, "-m", "clipkit", "models", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {"name": "ViT-B-32", "source": str(ROOT / "clipkit" / "model_configs" / "ViT-B-32.json")} \
        in json.loads(done.stdout)


# -- no bare kind strings -------------------------------------------------------------------------------

_KIND_ARGUMENT = {"get", "has", "names", "entries", "inferring", "unknown_message", "spec", "title", "infer_part",
                  "check_part", "Case"}


def test_code_names_kinds_by_the_table_not_by_bare_strings():
    """A kind named by a string literal outside clipkit/kinds.py: passed where a kind goes, compared with a
    kind, or (for the names that mean nothing else) written anywhere but a docstring."""
    unambiguous = {kinds.VISION_TOWER, kinds.TEXT_TOWER}
    offenders = []
    for path in sorted((ROOT / "clipkit").rglob("*.py")):
        relative = path.relative_to(ROOT / "clipkit")
        if relative.name == "kinds.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            found = []
            if isinstance(node, ast.Call) and node.args:
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in _KIND_ARGUMENT:
                    found.append(node.args[0])
                found += [k.value for k in node.keywords if k.arg == "kind"]
            elif isinstance(node, ast.Compare):
                found += [node.left, *node.comparators]
            elif isinstance(node, ast.Constant) and id(node) not in docstrings and node.value in unambiguous:
                found.append(node)
            offenders += [f"{relative}:{n.lineno}: {n.value!r}" for n in found
                          if isinstance(n, ast.Constant) and n.value in kinds.KINDS]
    assert offenders == []
