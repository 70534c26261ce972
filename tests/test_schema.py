"""`clipkit config schema`: a JSON Schema that the jsonschema package accepts, that every shipped and
OpenCLIP config satisfies, that rejects the malformed configs of test_config.py, and that follows the
installed plugins."""
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import open_clip
import pytest

import clipkit
from clipkit._schema import model_config_schema
from clipkit._typed import option
from clipkit.cli import main
from clipkit.config import BUILTIN_CONFIG_DIR, validate_model_config
from clipkit.errors import ConfigError

RESNET_CONFIGS = Path(__file__).parent.parent / "plugins" / "clipkit-plugin-resnet" / "clipkit_plugin_resnet" / "model_configs"
OPENCLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"


def _validator(schema=None):
    schema = schema or model_config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def validator():
    return _validator()


def test_cli_prints_the_schema(capsys):
    assert main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(model_config_schema()))


def test_every_shipped_and_openclip_config_validates(validator):
    files = sorted(BUILTIN_CONFIG_DIR.glob("*.json")) + sorted(RESNET_CONFIGS.glob("*.json"))
    files += sorted(OPENCLIP_CONFIGS.glob("*.json"))
    assert len(files) == 130 + 10 + 144
    for file in files:  # the 4 of another model family too: its plugin is installed
        errors = [e.message for e in validator.iter_errors(json.loads(file.read_text()))]
        assert not errors, f"{file}: {errors[:3]}"


MALFORMED = {  # the malformed configs of tests/test_config.py, one change each
    "unknown vision key": lambda c: c["vision_cfg"].update(patchsize=8),
    "layers 0": lambda c: c["vision_cfg"].update(layers=0),
    "heads as a string": lambda c: c["text_cfg"].update(heads="four"),
    "unknown top-level key": lambda c: c.update(extra=1),
    "no embed_dim": lambda c: c.pop("embed_dim"),
    "no vision_cfg": lambda c: c.pop("vision_cfg"),
    "text_cfg a list": lambda c: c.update(text_cfg=[1]),
    "unknown type": lambda c: c["vision_cfg"].update(type="vitt"),
    "unknown model family": lambda c: c.update(model_family="nosuch"),
    "model family section key": lambda c: c.update(multimodal_cfg={"widht": 512}),
    "newer schema_version": lambda c: c.update(schema_version=99),
    "tokenizer_kwargs a string": lambda c: c["text_cfg"].update(tokenizer_kwargs="canonicalize"),
    "unknown tokenizer": lambda c: c["text_cfg"].update(tokenizer="nosuch"),
    "pool_type not a choice": lambda c: c["vision_cfg"].update(pool_type="mean"),
    "unknown tokenizer option": lambda c: c["text_cfg"].update(tokenizer_kwargs={"clena": "lower"}),
    "tokenizer_mode with clip": lambda c: c["text_cfg"].update(tokenizer_kwargs={"clean": "canonicalize"},
                                                               tokenizer_mode="clips"),
    "hf_tokenizer_name with clip": lambda c: c["text_cfg"].update(tokenizer="clip",
                                                                  hf_tokenizer_name="bert-base-uncased"),
}


@pytest.mark.parametrize("change", MALFORMED, ids=str)
def test_malformed_configs_are_rejected(validator, tiny_cfg, change):
    assert not list(validator.iter_errors(tiny_cfg))
    MALFORMED[change](tiny_cfg)
    with pytest.raises(ConfigError):
        validate_model_config(tiny_cfg)  # what clipkit itself says about it
    assert list(validator.iter_errors(tiny_cfg)), f"the schema accepts: {change}"


def test_rules_across_keys_are_left_to_config_check(validator, tiny_cfg):
    """check() rules (width divisible by heads, ...) relate two values; JSON Schema cannot say that."""
    for change in (lambda c: c["vision_cfg"].update(width=65), lambda c: c["text_cfg"].update(width=50),
                   lambda c: c["vision_cfg"].update(pos_embed_type="sin_cos_2d", width=66, head_width=33)):
        cfg = copy.deepcopy(tiny_cfg)
        change(cfg)
        assert not list(validator.iter_errors(cfg))
        with pytest.raises(ConfigError):
            validate_model_config(cfg)


def test_inferred_types_and_tokenizers(validator, tiny_cfg, without_plugins):
    tiny_cfg["text_cfg"].update(hf_tokenizer_name="bert-base-uncased", tokenizer_mode="clips")  # hf, inferred
    assert not list(validator.iter_errors(tiny_cfg))
    tiny_cfg["vision_cfg"] = {"layers": [3, 4, 6, 3], "width": 64}  # resnet, inferred from the list
    assert not list(validator.iter_errors(tiny_cfg))
    without_plugins("clipkit-plugin-resnet")
    errors = list(_validator().iter_errors(tiny_cfg))
    assert errors and "pip install clipkit-plugin-resnet" in json.dumps(model_config_schema()["properties"]["vision_cfg"])


@dataclass
class _DotsCfg:
    """Keys of a plugin tower."""

    dots: int = option(3, "How many dots to draw.", gt=0)
    shape: str = option("round", "Their shape.", choices=("round", "square"))


def test_installed_plugins_types_appear_with_keys_types_defaults_and_descriptions(clipkit_plugins, tiny_cfg):
    @clipkit.hookimpl
    def register_vision_towers(register):
        register("dots", "clipkit.builtin.vit.model:build_vit", config=_DotsCfg)

    clipkit_plugins.module("dotsplug", register_vision_towers=register_vision_towers)
    schema = model_config_schema()
    dots = schema["$defs"]["vision_tower.dots"]
    assert dots["properties"]["dots"] == {"type": "integer", "description": "How many dots to draw.", "default": 3,
                                          "exclusiveMinimum": 0}
    assert dots["properties"]["shape"]["enum"] == ["round", "square"]
    assert "dotsplug" in dots["properties"]["type"]["description"]
    tiny_cfg["vision_cfg"] = {"type": "dots", "dots": 5}
    validator = _validator(schema)
    assert not list(validator.iter_errors(tiny_cfg))
    tiny_cfg["vision_cfg"]["shape"] = "hexagonal"
    assert list(validator.iter_errors(tiny_cfg))
