"""clipkit-train's typed settings: one declaration per flag, the --config file, settings.json, the docs tables."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from _train_support import base_args, run_inprocess, weights, write_dataset, write_model
from clipkit.errors import ArgsError
from clipkit.train import main
from clipkit.train.args import build_parser, parse_args
from clipkit.train.selection import objective_flags
from clipkit.train.settings import (
    GROUPS,
    SETTINGS_FILE,
    DataSettings,
    Settings,
    update_flags_tables,
    write_settings_file,
)

ROOT = Path(__file__).parent.parent
BASE = ["--model", "ViT-B-32", "--train-data", "shards/{000..009}.tar"]


def test_every_flag_is_one_declared_setting():
    dests = {a.dest for a in build_parser()._actions if a.option_strings and a.dest not in ("help", "config")}
    dests -= {flag.dest for flag in objective_flags()}  # installed objectives' own flags: options, not settings
    declared = [f.name for _, group, _ in GROUPS for f in dataclasses.fields(group)]
    assert len(declared) == len(set(declared)) and set(declared) == dests


def test_each_group_is_its_own_typed_slice():
    settings = parse_args(BASE + ["--batch-size", "32", "--epochs", "3", "--fsdp"])
    assert isinstance(settings.data, DataSettings) and settings.data.batch_size == 32
    assert settings.optimization.epochs == 3 and settings.distributed.fsdp is True
    assert not hasattr(settings.data, "epochs")  # a subsystem sees its own group only


def test_the_flags_tables_of_training_md_are_generated_from_the_declarations():
    text = (ROOT / "docs" / "training.md").read_text()
    assert update_flags_tables(text) == text, "run python -m clipkit.train.settings docs/training.md"
    # a bound declared once is the flag's check and the file's check
    assert "`--batch-size` | 64 |" in text


def test_the_tables_keep_the_meanings_the_docs_write_and_start_new_flags_with_their_help():
    text = (ROOT / "docs" / "training.md").read_text()
    batch_row = next(line for line in text.splitlines() if line.startswith("| `--batch-size` |"))
    # a changed meaning is the docs' own prose and survives regeneration; a stale default does not
    edited = text.replace(batch_row, "| `--batch-size` | 65 | Samples per step and process, as written here. |")
    again = update_flags_tables(edited)
    assert "| `--batch-size` | 64 | Samples per step and process, as written here. |" in again
    # a flag with no row yet gets one, meaning its --help text; a row of no flag is dropped
    without = edited.replace("| `--batch-size` | 65 | Samples per step and process, as written here. |\n", "")
    without = without.replace("<!-- end of flags table -->", "| `--gone-flag` | 1 | Removed. |\n<!-- end of flags table -->", 1)
    regenerated = update_flags_tables(without)
    assert "| `--batch-size` | 64 | batch size per GPU (default: 64) |" in regenerated
    assert "--gone-flag" not in regenerated
    assert update_flags_tables(regenerated) == regenerated


def test_no_subsystem_reads_an_untyped_namespace():
    for path in (ROOT / "clipkit" / "train").glob("*.py"):
        assert "getattr(args" not in path.read_text(), path


def test_a_written_settings_file_reads_back_to_the_same_settings(tmp_path):
    settings = parse_args(BASE + ["--aug-cfg", "scale=(0.9,1.0)", "--force-image-size", "32", "48", "--logs", "none",
                                  "--image-mean", "0.5", "0.5", "0.5", "--siglip", "--loss-dist-impl", "gather"])
    path = tmp_path / SETTINGS_FILE
    write_settings_file(settings, path)
    again = parse_args(["--config", str(path)])
    assert again == settings
    assert json.loads(path.read_text())["model"]["force_image_size"] == [32, 48]


def test_flags_on_the_command_line_win_over_the_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"model": "RN50"}, "data": {"train_data": "a.tar", "batch_size": 16},
                                "optimization": {"lr": 0.01, "epochs": 3}}))
    settings = parse_args(["--config", str(path), "--batch-size", "8"])
    assert (settings.model.model, settings.data.batch_size, settings.optimization.lr) == ("RN50", 8, 0.01)
    assert settings.optimization.epochs == 3 and settings.optimization.beta2 == 0.999  # computed from the file's model
    assert parse_args(["--config", str(path), "--model", "ViT-B-32"]).optimization.beta2 == 0.98


@pytest.mark.slow
def test_a_bad_settings_file_names_every_problem_with_its_key(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"data": {"batch_size": 0, "trian_data": "x.tar", "epochs": 2},
                                "optimization": {"lr": "fast"}, "optimisation": {}}))
    with pytest.raises(ArgsError) as raised:
        parse_args(BASE + ["--config", str(path)])
    assert str(raised.value).splitlines() == [
        f"{path}: data.batch_size: must be > 0, got 0",
        f"{path}: data.trian_data: unknown setting (did you mean 'train_data'?)",
        f"{path}: data.epochs: unknown setting (it belongs to the 'optimization' group)",
        f"{path}: optimization.lr: expected number | null, got \"fast\"",
        f"{path}: optimisation: not a settings group; expected one of "
        f"{', '.join(attr for attr, _, _ in GROUPS)} (did you mean 'optimization'?)",
    ]
    (tmp_path / "list.json").write_text("[1]")
    assert main(BASE + ["--config", str(tmp_path / "list.json")]) == 1
    assert capsys.readouterr().err == f"clipkit-train: error: --config {tmp_path / 'list.json'}: expected a JSON " \
                                      f"object, got list\n"


@pytest.mark.slow
def test_a_runs_settings_json_repeats_the_run_exactly(tmp_path):
    data = write_dataset(tmp_path / "data", shards=2, per_shard=16)
    model = write_model(tmp_path)
    logs = tmp_path / "logs"
    assert run_inprocess(base_args(model, data, logs, "first", "--epochs", "1", "--lr", "3e-3", "--aug-cfg",
                                   "scale=(0.9,1.0)")) == 0
    first = logs / "first"
    written = json.loads((first / SETTINGS_FILE).read_text())
    assert written["optimization"]["lr"] == 3e-3 and written["logging"]["name"] == "first"
    assert written["optimization"]["beta2"] == 0.999 and written["data"]["dataset_type"] == "webdataset"
    assert run_inprocess(["--config", first / SETTINGS_FILE, "--name", "again"]) == 0
    again = logs / "again"
    first_params = (first / "params.txt").read_text().replace("name: first", "name: again")
    assert (again / "params.txt").read_text() == first_params
    ref, got = weights(first / "checkpoints" / "epoch_1.pt"), weights(again / "checkpoints" / "epoch_1.pt")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert re.search(r"^lr: 0\.003$", first_params, re.M)


def test_settings_flat_is_openclip_namespace():
    settings = parse_args(BASE)
    flat = settings.flat()
    assert Settings.from_flat(flat) == settings
    # OpenCLIP's 100 but its 2 CoCa weights (the coca plugin's objective flags), --objective, --objective-opt,
    # --data-wait-warn and 4 lock-cache flags
    assert flat["batch_size"] == 64 and flat["lr"] == 5e-4 and len(flat) == 105
