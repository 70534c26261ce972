"""The ``clipkit`` command on bad input and closed pipes: one line and an exit status, never a traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import clipkit
from clipkit.cli import EXIT_BROKEN_PIPE, main

CLIPKIT = Path(sys.executable).parent / "clipkit"  # the console script, as a shell runs it


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def saved(tmp_path, tiny_cfg):
    """A tiny model saved with save_pretrained, and the model."""
    model = clipkit.create_model(tiny_cfg_file(tmp_path, tiny_cfg))
    return clipkit.save_pretrained(model, tmp_path / "saved"), model


def tiny_cfg_file(folder: Path, cfg) -> str:
    path = folder / "tiny.json"
    path.write_text(json.dumps(cfg))
    return str(path)


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


def test_config_check_of_a_folder_suggests_local_dir(saved, tmp_path, capsys):
    folder, _ = saved
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

    state = clipkit.create_model(tiny_cfg_file(tmp_path, tiny_cfg)).state_dict()
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


def test_resuming_a_checkpoint_names_the_missing_plugin(plugin_checkpoint, tmp_path):
    from _train_support import run_inprocess

    ckpt, config = plugin_checkpoint
    assert run_inprocess(["--model", config, "--dataset-type", "synthetic", "--train-num-samples", "16",
                          "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu",
                          "--logs", tmp_path / "logs", "--name", "resumed", "--resume", ckpt]) == 1
    log = (tmp_path / "logs" / "resumed" / "out.log").read_text()
    assert "unknown vision tower type 'tinyconv'" in log and f"\n{ckpt}: {NOTE}\n" in log
