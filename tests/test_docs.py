import ast
import dataclasses
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

import clipkit
from clipkit._docgen import render_configs_md
from clipkit.builtin.transformer import TextTransformerCfg
from clipkit.builtin.vit import ViTCfg

DOCS = Path(__file__).parent.parent / "docs"


def test_configs_md_is_generated_from_the_dataclasses():
    assert (DOCS / "configs.md").read_text() == render_configs_md(), \
        "docs/configs.md is stale: run python -m clipkit._docgen > docs/configs.md"


def test_every_builtin_key_is_documented_with_a_meaning():
    text = (DOCS / "configs.md").read_text()
    for cls in (ViTCfg, TextTransformerCfg):
        for field in dataclasses.fields(cls):
            row = re.search(rf"^\| `{field.name}` \|.*\| (.+) \|$", text, re.M)
            assert row and len(row.group(1)) > 10, field.name


def test_every_hook_is_documented_in_plugins_md():
    from clipkit import kinds

    text = (DOCS / "plugins.md").read_text()
    for hook in kinds.by_hook():
        assert hook in text, hook


def test_every_training_flag_is_documented():
    import argparse

    from clipkit.train.args import build_parser

    text = (DOCS / "training.md").read_text()
    for action in build_parser()._actions:
        if action.help == argparse.SUPPRESS:
            continue
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert f"`{option}" in text, option


def test_ci_runs_the_readme_test_command():
    readme = (DOCS.parent / "README.md").read_text()
    ci = (DOCS.parent / ".ci" / "run").read_text()
    command = "python -m pytest -q --durations=15"
    assert command in readme and ci.strip().splitlines()[-1] == command
    install = ('python -m pip install -q -c constraints.txt -e ".[dev]" ./plugins/clipkit-plugin-resnet '
               './plugins/clipkit-plugin-coca')
    assert install in readme and install in ci


FAST_TIER = 'python -m pytest -q -m "not slow and not distributed and not install"'


def test_ci_lints_before_testing_and_contributing_gives_a_fast_tier_of_registered_markers():
    ci = (DOCS.parent / ".ci" / "run").read_text().strip().splitlines()
    assert ci.index("ruff check .") < ci.index("mypy") < ci.index("python -m pytest -q --durations=15")
    assert FAST_TIER in (DOCS.parent / "CONTRIBUTING.md").read_text()
    pyproject = tomllib.loads((DOCS.parent / "pyproject.toml").read_text())
    pytest_cfg = pyproject["tool"]["pytest"]["ini_options"]
    registered = {line.split(":")[0] for line in pytest_cfg["markers"]}
    assert registered == set(re.findall(r"not (\w+)", FAST_TIER)) and "--strict-markers" in pytest_cfg["addopts"]
    # pre-commit runs the same lint (its hook ids read as lines: no YAML parser needed)
    hooks = re.findall(r"^\s*- id: (\S+)$", (DOCS.parent / ".pre-commit-config.yaml").read_text(), re.M)
    assert hooks == ["ruff-check", "mypy"]


def test_the_version_is_written_once():
    pyproject = tomllib.loads((DOCS.parent / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "clipkit.__version__"}
    assert importlib.metadata.version("clipkit-torch") == clipkit.__version__


def _code_after(text: str, marker: str, lang: str) -> str:
    """The first ```lang block after ``marker``."""
    match = re.compile(rf"^```{lang}\n(.*?)^```$", re.S | re.M).search(text, text.index(marker))
    assert match, f"no {lang} block after {marker!r}"
    return match.group(1)


TRAINER_EXAMPLES = {  # plugin -> (its part's module, the kind and name it registers)
    "align": ("objective", "objective", "clip_align"),
    "filenames": ("source", "data_source", "filenames"),
    "jsonl": ("reporter", "reporter", "jsonl"),
}


def test_the_worked_trainer_examples_pass_their_contracts_and_train_selected_as_shown(tmp_path, monkeypatch,
                                                                                     clipkit_plugins):
    """Each example's two files, written from docs/plugins.md, pass every contract case of their kind; then
    one run selects all three with the documented flags and each does what its section says."""
    import importlib
    import json
    import sys

    from clipkit import kinds
    from clipkit.testing import contract_cases
    from clipkit.train import main
    from tests._train_support import write_model

    text = (DOCS / "plugins.md").read_text()
    section = text[text.index("## Worked examples: an objective"):text.index("## Reference")]
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        for plugin, (module, kind, name) in TRAINER_EXAMPLES.items():
            package = tmp_path / f"clipkit_plugin_{plugin}"
            package.mkdir()
            for file in ("__init__.py", f"{module}.py"):
                (package / file).write_text(_code_after(section, f"`clipkit_plugin_{plugin}/{file}`:", "python"))
            clipkit_plugins.register(importlib.import_module(f"clipkit_plugin_{plugin}"), plugin)
            cases = contract_cases(plugin)
            assert [c.contract for c in cases if c.kind == kind and c.name == name] == list(kinds.spec(kind).contracts)
            for case in cases:
                case.run()

        commands = " ".join(_code_after(section, marker, "console") for marker in
                            ("### An objective", "### A data source", "### A reporter"))
        for flags in ("--objective clip_align --objective-opt weight=0.2", "--dataset-type filenames",
                      "--report-to tensorboard,jsonl"):
            assert flags in commands, flags
        photos = tmp_path / "photos"
        photos.mkdir()
        spec = sys.modules["clipkit_plugin_filenames"].make_example(photos)
        assert main(["--model", write_model(tmp_path), "--train-data", spec, "--dataset-type", "filenames",
                     "--objective", "clip_align", "--objective-opt", "weight=0.2", "--report-to", "jsonl",
                     "--batch-size", "3", "--epochs", "1", "--workers", "0", "--precision", "fp32", "--device", "cpu",
                     "--logs", str(tmp_path / "logs"), "--name", "run", "--log-every-n-steps", "1"]) == 0
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] in {f"clipkit_plugin_{p}" for p in TRAINER_EXAMPLES}]:
            del sys.modules[name]
    records = [json.loads(line) for line in (tmp_path / "logs" / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r.get("values", {})]
    assert [r["step"] for r in steps] == [1, 2]  # six squares, batches of three
    for record in steps:
        values = record["values"]
        assert values["train/loss"] == pytest.approx(values["train/contrastive_loss"] + values["train/alignment"],
                                                     rel=1e-5)


# -- docs/design.md: every rule it states is held against the code ----------------------------------
ROOT = DOCS.parent
PACKAGE = ROOT / "clipkit"


def _design() -> str:
    return (DOCS / "design.md").read_text()


def _section(text: str, heading: str) -> str:
    """From ``heading`` to the next heading of the same or a higher level."""
    start = text.index(heading)
    level = heading.split(" ")[0]
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], re.M)]
    return text[start:start + len(heading) + ends[0]] if ends else text[start:]


def _table(text: str, header: str):
    """The rows (lists of cells, backticks kept) of the Markdown table whose header row starts with ``header``."""
    lines = text[text.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def _ticked(cell: str):
    return re.findall(r"`([^`]+)`", cell)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    """Module name -> (path, parsed tree) for every module of clipkit."""
    return {_module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    for layer in ("clipkit.train", "clipkit.builtin"):
        if module == layer or module.startswith(layer + "."):
            return layer
    return "clipkit"


def _imports(name: str, path: Path, tree: ast.AST, modules):
    """``(imported module, when)`` for every clipkit import of one module; ``when`` is ``"at import"`` for
    module level (``if TYPE_CHECKING:`` blocks left out: they never run) or ``"when called"``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def visit(node, in_function, typing_only):
        for child in ast.iter_child_nodes(node):
            function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            typing = typing_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            when = "when called" if in_function else "at import"
            if isinstance(child, ast.Import) and not typing_only:
                found.extend((alias.name, when) for alias in child.names if alias.name.split(".")[0] == "clipkit")
            elif isinstance(child, ast.ImportFrom) and not typing_only:
                if child.level:
                    base = package.split(".")[:len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "clipkit":
                    for alias in child.names:  # `from clipkit.train import objectives` imports the submodule
                        sub = f"{target}.{alias.name}"
                        found.append((sub if sub in modules else target, when))
            visit(child, function, typing)

    visit(tree, False, False)
    return found


def _crossing_imports():
    """``{(from, to, when)}`` of imports against the layering: rule 1 and 2 of docs/design.md allow the
    trainer and the builtin plugins to import the core; every other import between layers is listed."""
    modules = _modules()
    crossing = {}
    for name, (path, tree) in modules.items():
        for target, when in _imports(name, path, tree, modules):
            source_layer, target_layer = _layer(name), _layer(target)
            if source_layer == target_layer or target_layer == "clipkit":
                continue
            if crossing.get((name, target)) != "at import":  # an import at module level is the one that counts
                crossing[(name, target)] = when
    return {(a, b, when) for (a, b), when in crossing.items()}


def test_the_dependency_rules_match_the_imports():
    rows = _table(_section(_design(), "## Dependency rules"), "| From | Imports | When | Why |")
    documented = set()
    for row in rows:
        (source,), targets, when, why = _ticked(row[0]), _ticked(row[1]), row[2], row[3]
        assert targets and when in ("at import", "when called") and len(why) > 20, row
        documented |= {(source, target, when) for target in targets}
    actual = _crossing_imports()
    assert not actual - documented, f"imports across layers that docs/design.md does not list: {sorted(actual - documented)}"
    assert not documented - actual, f"docs/design.md lists imports the code no longer makes: {sorted(documented - actual)}"


def test_the_dependency_check_sees_an_undocumented_import():
    """The check above is not vacuous: a core module importing a builtin plugin by name is caught."""
    tree = ast.parse("from .builtin import vit\n\ndef f():\n    from .train import trainer\n")
    modules = _modules()
    assert _imports("clipkit.factory", PACKAGE / "factory.py", tree, modules) == [
        ("clipkit.builtin.vit", "at import"), ("clipkit.train.trainer", "when called")]


def test_the_kinds_table_matches_clipkit_kinds():
    from clipkit import kinds

    rows = _table(_section(_design(), "## Where a new part goes"), "| Part | Kind | Hook |")
    by_kind = {}
    for row in rows:
        (kind,), (hook,) = _ticked(row[1]), _ticked(row[2])
        assert kind not in by_kind, f"two rows for kind {kind}"
        by_kind[kind] = (hook, tuple(_ticked(row[5])), row)
    assert set(by_kind) == set(kinds.KINDS), "docs/design.md needs one row per kind of clipkit.kinds"
    for name, spec in kinds.KINDS.items():
        hook, contracts, row = by_kind[name]
        assert hook == spec.hook and contracts == spec.contracts, row
        for folder in _ticked(row[3]):  # where clipkit's own parts are: paths that exist
            assert (ROOT / folder.split("*")[0]).exists(), folder


def test_design_md_names_only_tests_that_exist():
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", _design()))
    assert len(named) >= 20
    for file, test in named:
        tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
        tests = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert test in tests, f"docs/design.md names {file}::{test}, which does not exist"


def test_exceptions_derive_from_the_one_hierarchy():
    """Every exception class is defined in clipkit.errors, but for the private signals design.md lists."""
    import importlib

    rows = _table(_section(_design(), "### One error hierarchy"), "| Class | Why")
    allowed = {_ticked(row[0])[0] for row in rows}
    found = set()
    for name, (_path, tree) in _modules().items():
        if name == "clipkit.errors":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                cls = getattr(importlib.import_module(name), node.name, None)
                if isinstance(cls, type) and issubclass(cls, BaseException):
                    found.add(f"{name}:{node.name}")
                    assert f"{name}:{node.name}" in allowed, \
                        f"{name}.{node.name} is an exception class outside clipkit/errors.py and docs/design.md"
    assert allowed <= found, f"docs/design.md lists exceptions that no longer exist: {sorted(allowed - found)}"


def test_every_torch_load_is_weights_only():
    calls = 0
    for path, tree in _modules().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
    assert calls >= 4


def test_loading_every_plugin_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, clipkit, clipkit.plugin, clipkit.cli\n"
            "from clipkit.kinds import KINDS\n"
            "from clipkit.registry import registry\n"
            "clipkit.cli.build_parser()\n"
            "names = {kind: registry.names(kind) for kind in KINDS}\n"
            "assert all(names.values()), names\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'transformers')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
