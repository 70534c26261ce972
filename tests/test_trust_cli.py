"""The ``clipkit`` command on bad input and closed pipes: one line and an exit status, never a traceback."""
import contextlib
import inspect
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import clipkit
from _helpers import write_config
from clipkit.cli import EXIT_BROKEN_PIPE, main

CLIPKIT = Path(sys.executable).parent / "clipkit"  # the console script, as a shell runs it


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def saved(tmp_path, tiny_cfg):
    """A tiny model saved with save_pretrained, and the model."""
    model = clipkit.create_model(write_config(tmp_path, tiny_cfg))
    return clipkit.save_pretrained(model, tmp_path / "saved"), model


# -- clipkit data digits ------------------------------------------------------------------------------
def test_digits_refuses_a_folder_with_something_in_it(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["data", "digits", str(out)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"clipkit data digits: {out}: the folder is not empty (notes.txt); give a new or empty folder, or pass "
        f"--force to write into it (same-named files are replaced, others kept)")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    assert main(["data", "digits", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "classnames.txt").read_text().split() == ["zero", "one", "two", "three", "four", "five", "six",
                                                            "seven", "eight", "nine"]
    assert len(list((out / "train").glob("*.tar"))) == 6


def test_digits_into_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "digits.tar"
    target.write_text("not a folder")
    assert main(["data", "digits", str(target)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"clipkit data digits: {target}: is a file, not a folder; give a new or empty folder")
    assert main(["data", "digits", str(target / "sub")]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"clipkit data digits: cannot write {target / 'sub' / 'train'}: Not a directory")
    assert target.read_text() == "not a folder"


# -- clipkit plugin new ----------------------------------------------------------------------------------
def test_plugin_new_with_a_300_character_name_is_one_line(tmp_path, capsys):
    assert main(["plugin", "new", "a" * 300, "-o", str(tmp_path)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        "clipkit plugin new: plugin name 'aaaaaaaaaaaaaaaaaaaa'... is 300 characters long; use at most 40")
    assert main(["plugin", "new", "a" * 40, "-o", str(tmp_path)]) == 0  # the longest name still works
    assert (tmp_path / f"clipkit-plugin-{'a' * 40}" / f"clipkit_plugin_{'a' * 40}" / "model.py").is_file()


def test_plugin_new_into_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["plugin", "new", "tinyconv", "--output", str(target)]) == 2
    assert _one_line(capsys.readouterr().err) == f"clipkit plugin new: --output {target}: is a file, not a folder"
    assert main(["plugin", "new", "tinyconv", "--output", str(target / "sub")]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"clipkit plugin new: cannot write {target / 'sub' / 'clipkit-plugin-tinyconv'}: Not a directory")
    assert target.read_text() == "x"


# -- clipkit trainable -----------------------------------------------------------------------------------
def test_trainable_reads_a_saved_model_folder(saved, capsys):
    folder, model = saved
    assert main(["trainable", f"local-dir:{folder}", "--lock-image", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    visual = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.text.parameters())
    assert report["towers"]["visual"] == {"trainable": 0, "total": visual}
    assert report["towers"]["text"] == {"trainable": text, "total": text}
    assert report["trainable"] == [n for n, _ in model.named_parameters() if not n.startswith("visual.")]


# -- clipkit config check ------------------------------------------------------------------------------
def test_config_check_names_a_saved_model_once(saved, capsys):
    folder, _ = saved
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["type"] = "tinyconv"
    config["clipkit_parts"]["vision_tower"] = {"type": "tinyconv", "plugin": "tinyconv",
                                               "distribution": "clipkit-plugin-tinyconv", "version": "0.2.0"}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    assert main(["config", "check", f"local-dir:{folder}"]) == 1
    assert _one_line(capsys.readouterr().err) == (
        f"local-dir:{folder}: this model needs parts that are not installed: vision tower type 'tinyconv' "
        f"(provided by clipkit-plugin-tinyconv 0.2.0 when the model was saved; pip install clipkit-plugin-tinyconv)")


def test_config_check_of_a_folder_suggests_local_dir(saved, tmp_path, capsys, monkeypatch):
    folder, _ = saved
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ViT-B-32").mkdir()  # a folder named like a model does not hide the model
    assert main(["config", "check", "ViT-B-32"]) == 0
    assert capsys.readouterr().out.strip().endswith("ViT-B-32.json: ok")
    assert main(["config", "check", str(folder)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"{folder}: is a folder, not a config file; for the model saved there, check local-dir:{folder}")
    assert main(["config", "check", str(tmp_path)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"{tmp_path}: is a folder, not a config file; a model saved with clipkit.save_pretrained is checked as "
        f"local-dir:FOLDER (this one has no open_clip_config.json)")
    assert main(["config", "show", str(folder)]) == 2
    assert "check local-dir:" in _one_line(capsys.readouterr().err)


# -- a reader that stops early ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["models"], ["models", "--json"], ["plugins", "--json"],
                                     ["config", "show", "ViT-B-32"], ["config", "schema"]])
def test_a_closed_pipe_ends_the_command_quietly(command):
    child = subprocess.Popen([str(CLIPKIT), *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # gone before the first line is written: every write meets a broken pipe
    err = child.stderr.read().decode()
    assert child.wait(timeout=60) == EXIT_BROKEN_PIPE
    assert err == ""


# -- a checkpoint whose plugin is missing names the package to install -------------------------------------
TINYCONV = {"type": "tinyconv", "plugin": "tinyconv", "distribution": "clipkit-plugin-tinyconv", "version": "0.2.0"}
NOTE = ("saved with parts that are not installed: vision tower type 'tinyconv' (provided by "
        "clipkit-plugin-tinyconv 0.2.0 when the model was saved; pip install clipkit-plugin-tinyconv)")


@pytest.fixture
def plugin_checkpoint(tmp_path, tiny_cfg):
    """A training checkpoint whose record says a third-party plugin (not installed) built its image tower,
    and the config it was trained with; the weights are a builtin model's, since the plugin is absent."""
    import torch

    state = clipkit.create_model(write_config(tmp_path, tiny_cfg)).state_dict()
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": state, "clipkit_parts": {"vision_tower": TINYCONV}}, path)
    tiny_cfg["vision_cfg"]["type"] = "tinyconv"
    config = tmp_path / "tinyconv-tiny.json"
    config.write_text(json.dumps(tiny_cfg))
    return path, str(config)


def test_loading_a_checkpoint_names_the_missing_plugin(plugin_checkpoint, tmp_path):
    from clipkit.errors import CheckpointError, ConfigError, UnknownModelError

    ckpt, config = plugin_checkpoint
    with pytest.raises(ConfigError) as info:  # a config naming the plugin's tower type
        clipkit.create_model(config, pretrained=str(ckpt))
    first, note = str(info.value).split("\n")
    assert first.startswith(f"{config}: vision_cfg.type: unknown vision tower type 'tinyconv'")
    assert note == f"{ckpt}: {NOTE}"
    with pytest.raises(UnknownModelError) as info:  # a config the plugin ships
        clipkit.create_model_and_transforms("tinyconv-tiny", str(ckpt))
    assert str(info.value).endswith(f"; {ckpt} was {NOTE}")
    with pytest.raises(CheckpointError) as info:  # weights that do not fit the model at hand
        clipkit.load_checkpoint(clipkit.create_model("ViT-B-32", device="meta"), ckpt)
    assert str(info.value).startswith(f"{ckpt}: checkpoint does not fit the model") and \
        str(info.value).endswith(f"; {ckpt} was {NOTE}")


@pytest.mark.slow
def test_resuming_a_checkpoint_names_the_missing_plugin(plugin_checkpoint, tmp_path):
    from _train_support import run_inprocess

    ckpt, config = plugin_checkpoint
    assert run_inprocess(["--model", config, "--dataset-type", "synthetic", "--train-num-samples", "16",
                          "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu",
                          "--logs", tmp_path / "logs", "--name", "resumed", "--resume", ckpt]) == 1
    log = (tmp_path / "logs" / "resumed" / "out.log").read_text()
    assert "unknown vision tower type 'tinyconv'" in log and f"\n{ckpt}: {NOTE}\n" in log


# -- the docs say what the code does -------------------------------------------------------------------------
ROOT = Path(__file__).parent.parent
PLUGINS_MD = (ROOT / "docs" / "plugins.md").read_text()
README = (ROOT / "README.md").read_text()


def _block_after(text: str, marker: str, lang: str) -> str:
    """The first ```lang code block after ``marker``."""
    start = text.index(marker)
    match = re.compile(rf"^```{lang}\n(.*?)^```$", re.S | re.M).search(text, start)
    assert match, f"no {lang} block after {marker!r}"
    return match.group(1)


def test_the_worked_plugin_example_passes_its_own_contract_and_runs_as_shown(tmp_path, monkeypatch, clipkit_plugins):
    from clipkit.testing import contract_cases

    example = PLUGINS_MD[PLUGINS_MD.index("## Worked example"):PLUGINS_MD.index("## Reference")]
    package = tmp_path / "clipkit_plugin_tinyconv"
    package.mkdir()
    (package / "__init__.py").write_text(_block_after(example, "### `clipkit_plugin_tinyconv/__init__.py`", "python"))
    (package / "model.py").write_text(_block_after(example, "### `clipkit_plugin_tinyconv/model.py`", "python"))
    (tmp_path / "my_configs").mkdir()
    (tmp_path / "my_configs" / "tinyconv-tiny.json").write_text(
        _block_after(example, "### `my_configs/tinyconv-tiny.json`", "json"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    try:
        import clipkit_plugin_tinyconv

        clipkit_plugins.register(clipkit_plugin_tinyconv, "tinyconv")
        cases = contract_cases("tinyconv")
        assert {str(c) for c in cases} >= {"vision_tower:tinyconv:builds", "vision_tower:tinyconv:freezer",
                                           "model_config:TinyConv-S:validates"}
        for case in cases:
            case.run()

        usage = _block_after(example, "### Use it from Python", "python")
        expected = [line.split("#")[-1].strip() for line in usage.splitlines() if line.startswith("print(")]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(usage, "docs/plugins.md", "exec"), {})
        assert printed.getvalue().splitlines() == expected
    finally:
        for name in [m for m in sys.modules if m.startswith("clipkit_plugin_tinyconv")]:
            del sys.modules[name]


def test_the_pooler_call_is_documented_as_the_hf_tower_makes_it():
    from clipkit.registry import registry

    section = PLUGINS_MD[PLUGINS_MD.index("#### `register_poolers(register)`"):]
    call = re.search(r"^pooler\((.*)\) -> Tensor\[B, D\]$", _block_after(section, "", "python"), re.M)
    assert call and call.group(1) == "hidden_states, attention_mask, pooler_output=None"
    assert "`cls_token_position`" in section.split("####")[1]
    positions = {}
    for entry in registry.entries("pooler"):
        pooler = entry.load()(None)
        params = list(inspect.signature(pooler.forward).parameters.values())
        assert len(params) == 3 and params[2].name == "pooler_output" and params[2].default is None, entry.name
        positions[entry.name] = pooler.cls_token_position
    assert positions == {"mean_pooler": None, "max_pooler": None, "cls_pooler": 0, "cls_last_hidden_state_pooler": 0}


@pytest.mark.slow
@pytest.mark.install
def test_the_documented_license_line_builds_with_the_setuptools_the_scaffold_requires(tmp_path, capsys):
    import tomllib

    import setuptools

    assert main(["plugin", "new", "licensed", "-o", str(tmp_path)]) == 0
    root = tmp_path / "clipkit-plugin-licensed"
    pyproject = (root / "pyproject.toml").read_text()
    required = tomllib.loads(pyproject)["build-system"]["requires"]
    worked = tomllib.loads(_block_after(PLUGINS_MD, "### `pyproject.toml`", "toml"))["build-system"]["requires"]
    assert required == worked == ["setuptools>=77"]  # 77 is the first release that reads license = "SPDX"
    assert int(setuptools.__version__.split(".")[0]) >= 77, "the dev environment needs what the scaffold needs"

    license_lines = _block_after(PLUGINS_MD, "Add a license first", "toml")
    assert 'license = "MIT"' in license_lines
    pyproject = pyproject.replace('version = "0.1.0"\n', 'version = "0.1.0"\n' + license_lines, 1)
    (root / "pyproject.toml").write_text(pyproject)
    (root / "LICENSE").write_text("MIT License\n")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    metadata = next(site.glob("clipkit_plugin_licensed-0.1.0.dist-info")) / "METADATA"
    assert "License-Expression: MIT" in metadata.read_text().splitlines()


def test_a_negative_unlock_count_raises_the_documented_error():
    from clipkit import errors
    from clipkit.freeze import lock_layer_groups

    api = (ROOT / "docs" / "api.md").read_text()
    documented = {re.search(r"a negative value is a\s+`(\w+)`", PLUGINS_MD).group(1),
                  re.search(r"a negative or non-int\s+value raises `(\w+)`", api).group(1)}
    assert len(documented) == 1
    error = getattr(errors, documented.pop())
    model = clipkit.create_model("ViT-B-32", device="meta")
    for lock in (lambda: lock_layer_groups(model.visual, -1), lambda: model.lock_image_tower(-1),
                 lambda: model.lock_text_tower(unlocked_layers=-2)):
        with pytest.raises(errors.ClipkitError) as info:
            lock()
        assert type(info.value) is error


def test_the_json_formats_are_documented_key_for_key(tmp_path, tiny_cfg, capsys, clipkit_plugins):
    from clipkit.kinds import titles

    @clipkit.hookimpl
    def register_vision_towers(register):
        raise RuntimeError("boom")

    with pytest.warns(clipkit.PluginWarning):  # a failed plugin: the one place "error" appears
        clipkit_plugins.module("broken_docs_plugin", register_vision_towers=register_vision_towers)

    def keys(value):
        """The key structure of a JSON value; a list stands for its elements' keys, merged."""
        if isinstance(value, dict):
            return {k: keys(v) for k, v in value.items()}
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            merged = {}
            for item in value:
                for k, v in keys(item).items():
                    merged[k] = v if k not in merged or not isinstance(v, dict) else {**merged[k], **v}
            return [merged]
        return None

    def documented(marker):
        return json.loads(_block_after(README, marker, "json"))

    assert main(["models", "--json"]) == 0
    assert keys(json.loads(capsys.readouterr().out)) == keys(documented("`clipkit models --json`"))

    assert main(["plugins", "--json"]) == 0
    emitted, doc = json.loads(capsys.readouterr().out), documented("`clipkit plugins --json`")
    assert set(emitted) == set(doc) == {"plugins", "conflicts"}
    assert set().union(*(p.keys() for p in emitted["plugins"])) == set(doc["plugins"][0])
    assert all(set(p) == set(doc["plugins"][0]) - {"error"} for p in emitted["plugins"] if p["status"] != "failed")
    said = README[README.index("`registers` maps") + len("`registers` maps"):README.index("to the names registered")]
    kinds = set(re.findall(r"`(\w+)`", said))
    assert kinds == set(titles()) >= set().union(*(p["registers"] for p in emitted["plugins"]))
    listed = re.search(r"`clipkit plugins --json` prints the same information as JSON: (.*?)\.\n\n", PLUGINS_MD, re.S)
    assert set(re.findall(r"`(\w+)`", listed.group(1))) == set(doc["plugins"][0])

    assert main(["trainable", write_config(tmp_path, tiny_cfg), "--lock-image", "--json"]) == 0
    assert keys(json.loads(capsys.readouterr().out)) == keys(documented("`clipkit trainable MODEL --json`"))


def test_the_readme_counts_the_configs_that_ship():
    import importlib.util

    open_clip = Path(importlib.util.find_spec("open_clip").origin).parent  # its files; importing it takes seconds
    shipped = {p.stem for p in (ROOT / "clipkit" / "model_configs").glob("*.json")}
    resnet = {p.stem for p in (ROOT / "plugins").glob("clipkit-plugin-resnet/clipkit_plugin_resnet/model_configs/*.json")}
    coca = {p.stem for p in (ROOT / "plugins").glob("clipkit-plugin-coca/clipkit_plugin_coca/model_configs/*.json")}
    claim = re.search(r"(\d+) configs ship \((\d+) with clipkit, (\d+) ResNet and (\d+) CoCa ones with the\s+"
                      r"plugins\): all of OpenCLIP 3\.3\.0's;", README)
    assert claim, "README: the sentence counting the shipped configs changed; update this test with it"
    assert tuple(map(int, claim.groups())) == (len(shipped | resnet | coca), len(shipped), len(resnet),
                                               len(coca)) == (144, 130, 10, 4)
    resnet |= coca
    theirs = {p.stem for p in (open_clip / "model_configs").glob("*.json")}
    assert not theirs - (shipped | resnet), f"OpenCLIP configs not shipped: {sorted(theirs - (shipped | resnet))}"
    assert not (shipped | resnet) - theirs, f"shipped configs OpenCLIP lacks: {sorted((shipped | resnet) - theirs)}"


def test_the_readme_does_not_call_remote_resume_missing():
    not_yet = re.search(r"^Not yet: (.*?)\.", README, re.M | re.S).group(1)
    assert "remote" not in not_yet and "URL" not in not_yet
    assert "`--resume s3://...`" in README
