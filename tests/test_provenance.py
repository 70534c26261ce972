"""Saved models record which plugin distribution provided each part; loading one without it says what to install."""
import json
import logging

import pytest

import clipkit
from clipkit._provenance import PROVENANCE_KEY, check_provenance, parts_provenance
from clipkit.builtin.vit import ViTCfg
from clipkit.cli import main
from clipkit.config import validate_model_config
from clipkit.errors import ClipkitError

RESNET = {"embed_dim": 16,
          "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "head_width": 32, "image_size": 64},
          "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


def _builtin(part_type, plugin):
    return {"type": part_type, "plugin": plugin, "distribution": "clipkit-torch", "version": clipkit.__version__}


def test_record_names_plugin_distribution_and_version_of_each_part(tiny_cfg):
    expected = {"vision_tower": _builtin("vit", "vit"), "text_tower": _builtin("transformer", "transformer"),
                "tokenizer": _builtin("clip", "tokenizers"), "vision_freezer": _builtin("vit", "vit"),
                "text_freezer": _builtin("transformer", "transformer"), "model_family": _builtin("clip", "families")}
    assert parts_provenance(validate_model_config(tiny_cfg)) == expected
    assert parts_provenance(tiny_cfg) == expected  # a raw config: the types clipkit infers
    resnet = parts_provenance(RESNET)["vision_tower"]
    assert resnet == {"type": "resnet", "plugin": "resnet", "distribution": "clipkit-plugin-resnet",
                      "version": "0.1.0"}


def test_save_pretrained_writes_it_and_loading_checks_it(tmp_path, without_plugins, capsys):
    path = tmp_path / "rn_tiny.json"
    path.write_text(json.dumps(RESNET))
    folder = clipkit.save_pretrained(clipkit.create_model(str(path)), tmp_path / "saved")
    saved = json.loads((folder / "open_clip_config.json").read_text())
    assert saved[PROVENANCE_KEY]["vision_tower"]["distribution"] == "clipkit-plugin-resnet"
    clipkit.create_model(f"local-dir:{folder}")

    without_plugins("clipkit-plugin-resnet")
    message = ("local-dir:{}: this model needs parts that are not installed: vision tower type 'resnet' (provided "
               "by clipkit-plugin-resnet 0.1.0 when the model was saved; pip install clipkit-plugin-resnet)")
    with pytest.raises(ClipkitError) as info:
        clipkit.create_model(f"local-dir:{folder}")
    assert str(info.value) == message.format(folder)
    with pytest.raises(ClipkitError, match="pip install clipkit-plugin-resnet"):
        clipkit.get_tokenizer(f"local-dir:{folder}")
    assert main(["config", "check", f"local-dir:{folder}"]) == 1
    assert capsys.readouterr().err.strip() == message.format(folder)


def test_every_missing_part_in_one_error_and_hints_for_each_origin(caplog):
    record = {"vision_tower": {"type": "tinyconv", "plugin": "tinyconv", "distribution": "clipkit-plugin-tinyconv",
                               "version": "0.2.0"},
              "text_tower": {"type": "newtext", "plugin": "newtext", "distribution": "clipkit-torch",
                             "version": "0.9.0"},
              "tokenizer": {"type": "mine", "plugin": "dev", "distribution": "dev", "version": "in-process"},
              "vision_freezer": {"type": "vit", "plugin": "other", "distribution": "clipkit-plugin-other",
                                 "version": "1.0"}}
    with caplog.at_level(logging.WARNING, logger="clipkit"), pytest.raises(ClipkitError) as info:
        check_provenance(record, "saved/")
    assert str(info.value) == (
        "saved/: this model needs parts that are not installed: vision tower type 'tinyconv' (provided by "
        "clipkit-plugin-tinyconv 0.2.0 when the model was saved; pip install clipkit-plugin-tinyconv); text tower "
        "type 'newtext' (provided by clipkit-torch 0.9.0 when the model was saved; pip install "
        "\"clipkit-torch>=0.9.0\"); tokenizer 'mine' (provided by dev in-process when the model was saved; "
        "register the in-process plugin 'dev' again)")
    assert "freezer 'vit' was provided by clipkit-plugin-other 1.0 when this model was saved, now by clipkit-torch" \
           in caplog.text
    check_provenance(None, "old/")  # folders saved before the record existed load as before
    check_provenance({"vision_tower": "garbage"}, "edited/")


def test_a_missing_freezer_warns_and_the_model_still_loads(tmp_path, clipkit_plugins, caplog):
    @clipkit.hookimpl
    def register_freezers(register):
        register("vitlike", "clipkit.freeze:lock_layer_groups")

    @clipkit.hookimpl
    def register_vision_towers(register):
        register("vitlike", "clipkit.builtin.vit.model:build_vit", config=ViTCfg)

    towers = clipkit_plugins.module("vitlike_towers", register_vision_towers=register_vision_towers)
    clipkit_plugins.module("vitlike_freezer", register_freezers=register_freezers)
    cfg = {"embed_dim": 16, "vision_cfg": {"type": "vitlike", "image_size": 16, "patch_size": 8, "layers": 1,
                                           "width": 16, "head_width": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    path = tmp_path / "vitlike.json"
    path.write_text(json.dumps(cfg))
    folder = clipkit.save_pretrained(clipkit.create_model(str(path)), tmp_path / "saved")
    clipkit_plugins.close()
    clipkit_plugins.register(towers, "vitlike_towers")
    with caplog.at_level(logging.WARNING, logger="clipkit"):
        clipkit.create_model(f"local-dir:{folder}")
    assert "the freezer of vision type 'vitlike' came from vitlike_freezer in-process" in caplog.text
