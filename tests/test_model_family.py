"""The model family kind: a plugin assembles the model from the built towers plus modules of its own.

A toy family ``headed`` (a ClipModel with an extra linear ``head`` over the image features, selected by
a top-level ``head_cfg``) is registered in-process, as a third party's would be.
"""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import clipkit
from clipkit.config import validate_model_config
from clipkit.errors import ConfigError, TowerContractError
from clipkit.factory import build_model
from clipkit.model import ClipModel
from clipkit.plugin import Infer, option, parts_provenance
from clipkit.testing import contract_cases


@dataclass
class HeadCfg:
    """The ``head_cfg`` section."""

    scale: float = option(1.0, "What the head's output is multiplied by.", gt=0)


@dataclass
class HeadedCfg:
    """Top-level keys of the ``headed`` family."""

    head_cfg: HeadCfg = option(doc="The head.", default_factory=HeadCfg)


class Headed(ClipModel):
    def __init__(self, visual, text, scale, **kwargs):
        super().__init__(visual, text, **kwargs)
        self.head = nn.Linear(kwargs["embed_dim"], kwargs["embed_dim"])
        self.scale = scale

    def encode_image(self, image, normalize=False):
        features = self.head(super().encode_image(image)) * self.scale
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def build_headed(cfg, ctx):
    return Headed(ctx.visual, ctx.text, cfg.head_cfg.scale, **ctx.clip_kwargs())


class Headless(nn.Module):
    def __init__(self, visual, text):
        super().__init__()
        self.visual, self.text, self.output_dict = visual, text, False


def build_headless(cfg, ctx):
    return Headless(ctx.visual, ctx.text)


def build_stranger(cfg, ctx):
    return ClipModel(nn.Identity(), ctx.text, **ctx.clip_kwargs())


@pytest.fixture
def headed(plugin_module, tiny_cfg):
    @clipkit.hookimpl
    def register_model_families(register):
        register("headed", build_headed, config=HeadedCfg, infer=Infer("head_cfg"), example=dict(tiny_cfg))
        register("headless", build_headless)
        register("stranger", build_stranger)

    plugin_module("headplug", register_model_families=register_model_families)


def test_a_family_selected_by_its_key_assembles_the_model_and_is_recorded(headed, tiny_cfg):
    tiny_cfg["head_cfg"] = {"scale": 2.0}
    config = validate_model_config(tiny_cfg)
    assert (config.family, config.family_cfg.head_cfg.scale) == ("headed", 2.0)
    torch.manual_seed(0)
    model = build_model(config)
    assert type(model) is Headed and model.scale == 2.0
    assert parts_provenance(config)["model_family"] == {"type": "headed", "plugin": "headplug",
                                                        "distribution": "headplug", "version": "in-process"}
    tiny_cfg.pop("head_cfg")
    assert validate_model_config({**tiny_cfg, "model_family": "headed"}).family_cfg.head_cfg.scale == 1.0


def test_the_family_keys_are_checked_like_any_section(headed, tiny_cfg):
    tiny_cfg["head_cfg"] = {"scael": 2.0}
    with pytest.raises(ConfigError) as err:
        validate_model_config(tiny_cfg)
    assert [str(p) for p in err.value.problems] == [
        "head_cfg.scael: unknown key for model family 'headed' section 'head_cfg' (did you mean 'scale'?)"]
    tiny_cfg["head_cfg"] = {"scale": 0}
    with pytest.raises(ConfigError, match="^head_cfg.scale: must be > 0, got 0.0$"):
        validate_model_config(tiny_cfg)


def test_an_unknown_family_is_one_line_listing_the_installed_ones(headed, tiny_cfg):
    tiny_cfg["model_family"] = "heded"
    with pytest.raises(ConfigError) as err:
        validate_model_config(tiny_cfg)
    (line,) = [str(p) for p in err.value.problems]
    assert line.startswith("model_family: unknown model family 'heded' (did you mean 'headed'?); installed: ")
    assert "clip" in line and "headless" in line


def test_extra_modules_keep_their_keys_in_either_text_layout(headed, tiny_cfg):
    """The flat (OpenCLIP ``CLIP``) text layout moves unknown keys under text. when loading; a family's own
    modules are not the text tower's."""
    tiny_cfg["head_cfg"] = {"scale": 1.0}
    for custom_text in (False, True):
        tiny_cfg["custom_text"] = custom_text
        torch.manual_seed(0)
        model = build_model(validate_model_config(tiny_cfg))
        state = model.state_dict()
        assert "head.weight" in state and ("text.token_embedding.weight" in state) == custom_text
        torch.manual_seed(1)
        again = build_model(validate_model_config(tiny_cfg))
        again.load_state_dict(state, strict=True)
        assert torch.equal(again.head.weight, model.head.weight)


def test_every_build_holds_the_model_to_the_family_protocol_naming_the_plugin(headed, tiny_cfg):
    with pytest.raises(TowerContractError, match=r"^model family 'headless' from headplug in-process \(plugin "
                                                 r"'headplug'\): the model lacks encode_image, encode_text, "
                                                 r"lock_image_tower, lock_text_tower, set_grad_checkpointing"):
        build_model(validate_model_config({**tiny_cfg, "model_family": "headless"}))
    with pytest.raises(TowerContractError, match="'stranger' .*: the model's visual and text must be the towers"):
        build_model(validate_model_config({**tiny_cfg, "model_family": "stranger"}))


def test_contract_cases_cover_a_plugins_family(headed):
    cases = [case for case in contract_cases("headplug") if case.name == "headed"]
    assert [case.contract for case in cases] == ["builds", "forward", "save-load"]
    for case in cases:
        case.run()
    with pytest.raises(AssertionError, match="model family 'headless' .* breaks the contract 'builds': it "
                                             "registered no example="):
        next(c for c in contract_cases("headplug") if c.name == "headless").run()


def test_the_default_family_is_the_two_tower_model(tiny_cfg):
    config = validate_model_config(tiny_cfg)
    assert config.family == "clip" and type(build_model(config)) is ClipModel
