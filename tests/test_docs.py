import dataclasses
import re
from pathlib import Path

import pytest

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
    install = 'python -m pip install -q -c constraints.txt -e ".[dev]" ./plugins/clipkit-plugin-resnet'
    assert install in readme and install in ci


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
