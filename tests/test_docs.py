import dataclasses
import re
from pathlib import Path

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
