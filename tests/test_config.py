import json
import logging
import math

import pytest

import clipkit
from clipkit.config import validate_model_config
from clipkit.errors import ConfigError


def problems(cfg, source=None):
    with pytest.raises(ConfigError) as info:
        validate_model_config(cfg, source=source)
    return [str(p) for p in info.value.problems]


def test_valid_tiny_config_infers_builtin_types(tiny_cfg):
    config = validate_model_config(tiny_cfg)
    assert (config.vision_type, config.text_type) == ("vit", "transformer")
    assert config.vision.width == 64 and config.vision.mlp_ratio == 4.0
    assert config.text.pool_type == "argmax"
    assert config.tokenizer_name == "clip"
    assert config.top.init_logit_scale == pytest.approx(math.log(1 / 0.07))


def test_every_problem_reported_together_with_key_paths(tiny_cfg):
    tiny_cfg["vision_cfg"].update(width=65, patchsize=8, layers=0)
    tiny_cfg["text_cfg"]["mlp_ratio"] = float("nan")
    tiny_cfg["text_cfg"]["heads"] = "four"
    tiny_cfg["extra"] = 1
    del tiny_cfg["embed_dim"]
    found = problems(tiny_cfg, source="my.json")
    assert "my.json: vision_cfg.patchsize: unknown key for vision tower type 'vit' (did you mean 'patch_size'?)" in found
    assert "my.json: vision_cfg.layers: must be > 0, got 0" in found
    assert "my.json: text_cfg.mlp_ratio: must be a finite number, got nan" in found
    assert 'my.json: text_cfg.heads: expected integer, got "four"' in found
    assert "my.json: extra: unknown key for a model config" in found
    assert "my.json: embed_dim: missing required key for a model config" in found
    assert len(found) == 6  # the width check runs only once the section's fields are valid


def test_width_not_divisible_by_heads(tiny_cfg):
    tiny_cfg["vision_cfg"]["width"] = 65
    tiny_cfg["text_cfg"]["width"] = 50
    assert problems(tiny_cfg) == [
        "vision_cfg.width: must be divisible by head_width (65 % 16 != 0)",
        "text_cfg.width: must be divisible by heads (50 % 4 != 0)",
    ]


def test_missing_tower_and_wrong_section_type(tiny_cfg):
    del tiny_cfg["vision_cfg"]
    tiny_cfg["text_cfg"] = [1]
    assert problems(tiny_cfg) == ["vision_cfg: missing required section", "text_cfg: expected an object, got list"]


def test_unknown_type_lists_installed_and_suggests(tiny_cfg):
    tiny_cfg["vision_cfg"]["type"] = "vitt"
    (line,) = problems(tiny_cfg)
    assert line.startswith("vision_cfg.type: unknown vision tower type 'vitt' (did you mean 'vit'?)")
    assert "vit" in line.split("installed: ")[1].split("; ")[0].split(", ")


def test_inferred_types_are_named_in_errors(tiny_cfg, without_plugins):
    without_plugins("clipkit-plugin-resnet")
    tiny_cfg["vision_cfg"] = {"layers": [3, 4, 6, 3], "width": 64}
    (line,) = problems(tiny_cfg)
    assert "unknown vision tower type 'resnet' (inferred from a list of layers)" in line
    assert line.endswith("it is provided by a plugin: pip install clipkit-plugin-resnet")
    tiny_cfg["text_cfg"] = {"hf_model_name": "roberta-base", "hf_pooler_type": "nosuch"}
    assert any(p.startswith("text_cfg.hf_pooler_type: unknown pooler 'nosuch'") for p in problems(tiny_cfg))


def test_a_model_family_whose_plugin_is_missing_is_one_line_with_its_pip_install(tiny_cfg, without_plugins):
    without_plugins("clipkit-plugin-coca")
    tiny_cfg["multimodal_cfg"] = {"width": 512}
    assert problems(tiny_cfg) == ["multimodal_cfg: unknown model family 'coca' (inferred from multimodal_cfg); "
                                  "installed: clip; it is provided by a plugin: pip install clipkit-plugin-coca"]


def test_newer_schema_version_fails_clearly(tiny_cfg):
    tiny_cfg["schema_version"] = 99
    (line,) = problems(tiny_cfg)
    assert "needs a newer clipkit (schema_version 99" in line


def test_tokenizer_keys_are_validated(tiny_cfg):
    tiny_cfg["text_cfg"]["tokenizer_kwargs"] = "canonicalize"
    assert problems(tiny_cfg) == ['text_cfg.tokenizer_kwargs: expected object | null, got "canonicalize"']
    tiny_cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": "canonicalize"}
    tiny_cfg["text_cfg"]["tokenizer"] = "nosuch"
    (line,) = problems(tiny_cfg)
    assert line.startswith("text_cfg.tokenizer: unknown tokenizer 'nosuch'")


def test_image_size_pair_and_literal_choices(tiny_cfg):
    tiny_cfg["vision_cfg"]["image_size"] = [32, 48]
    config = validate_model_config(tiny_cfg)
    assert config.vision.image_size == (32, 48) and config.vision.grid() == (4, 6)
    tiny_cfg["vision_cfg"]["pool_type"] = "mean"
    (line,) = problems(tiny_cfg)
    assert line == "vision_cfg.pool_type: expected 'tok' | 'avg' | 'none', got \"mean\""


def test_add_model_config_folder_and_file(tmp_path, tiny_cfg, caplog):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "my_tiny.json").write_text(json.dumps(tiny_cfg))
    (folder / "not_a_model.json").write_text(json.dumps({"hello": 1}))
    (folder / "broken.json").write_text("{")
    single = tmp_path / "single_tiny.json"
    single.write_text(json.dumps(tiny_cfg))
    with caplog.at_level(logging.INFO, logger="clipkit"):
        clipkit.add_model_config(folder)
    assert "skipped 2 JSON file(s) that are not model configs" in caplog.text
    clipkit.add_model_config(single)
    names = clipkit.list_models()
    assert "my_tiny" in names and "single_tiny" in names and "not_a_model" not in names
    got = clipkit.get_model_config("my_tiny")
    got["embed_dim"] = 1  # a copy: the registry is untouched
    assert clipkit.get_model_config("my_tiny")["embed_dim"] == 32
    assert clipkit.get_model_config("no-such-model") is None


def test_add_model_config_missing_path(tmp_path):
    with pytest.raises(clipkit.ClipkitError, match="does not exist"):
        clipkit.add_model_config(tmp_path / "nope")


def test_list_models_natural_order_and_builtins():
    names = clipkit.list_models()
    assert len([n for n in names if n.startswith("ViT-")]) >= 45
    assert names.index("ViT-B-16") < names.index("ViT-B-32") < names.index("ViT-H-14")


def test_model_config_path_env(monkeypatch, tmp_path, tiny_cfg):
    from clipkit.config import _store

    (tmp_path / "env_tiny.json").write_text(json.dumps(tiny_cfg))
    monkeypatch.setenv("CLIPKIT_MODEL_CONFIG_PATH", str(tmp_path))
    _store.invalidate()
    try:
        assert "env_tiny" in clipkit.list_models()
    finally:
        monkeypatch.delenv("CLIPKIT_MODEL_CONFIG_PATH")
        _store.invalidate()
    assert "env_tiny" not in clipkit.list_models()


def test_tokenizer_options_and_hf_only_keys(tiny_cfg):
    tiny_cfg["text_cfg"]["tokenizer_kwargs"] = {"clena": "lower"}
    (line,) = problems(tiny_cfg)
    assert line.startswith("text_cfg.tokenizer_kwargs.clena: unknown option of tokenizer 'clip' (did you mean 'clean'?)")
    tiny_cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": "canonicalize"}
    tiny_cfg["text_cfg"]["tokenizer_mode"] = "clips"
    assert problems(tiny_cfg) == ["text_cfg.tokenizer_mode: is used only by the 'hf' tokenizer, not 'clip'"]
    del tiny_cfg["text_cfg"]["tokenizer_mode"]
    tiny_cfg["text_cfg"].update(tokenizer="clip", hf_tokenizer_name="bert-base-uncased")
    assert problems(tiny_cfg) == ["text_cfg.hf_tokenizer_name: is used only by the 'hf' tokenizer, not 'clip'"]


def test_sincos_needs_width_divisible_by_four(tiny_cfg):
    tiny_cfg["vision_cfg"].update(pos_embed_type="sin_cos_2d", width=66, head_width=33)
    assert problems(tiny_cfg) == ["vision_cfg.pos_embed_type: sin_cos_2d needs a width divisible by 4, got 66"]


def test_relative_added_paths_survive_chdir(tmp_path, tiny_cfg, monkeypatch):
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "rel_tiny.json").write_text(json.dumps(tiny_cfg))
    monkeypatch.chdir(tmp_path)
    clipkit.add_model_config("rel")
    monkeypatch.chdir(tmp_path / "rel")
    clipkit.add_model_config("rel_tiny.json")
    assert "rel_tiny" in clipkit.list_models()
