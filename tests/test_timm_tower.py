"""The builtin timm vision tower: numerics, OpenCLIP parity, pretrained weights, locking, shipped configs."""
import gc
import json

import open_clip
import pytest
import timm
import torch

import clipkit
from clipkit.config import list_models, validate_model_config
from clipkit.errors import ClipkitError, ConfigError
from clipkit.hookspecs import TowerContext
from clipkit.registry import registry

TEXT = {"context_length": 16, "vocab_size": 100, "width": 48, "heads": 4, "layers": 2}


def _config(embed_dim=32, **vision):
    return {"embed_dim": embed_dim, "text_cfg": dict(TEXT),
            "vision_cfg": {"timm_model_name": "test_vit", "image_size": 32, **vision}}


def _write(tmp_path, name, cfg):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _model(tmp_path, name="timm-tiny", **kwargs):
    return clipkit.create_model(str(_write(tmp_path, name, _config(**kwargs))))


def _trainable(module):
    return {name for name, param in module.named_parameters() if param.requires_grad}


# --- forward ------------------------------------------------------------------------------------

def test_forward_is_timms_features_then_the_projection(tmp_path):
    model = _model(tmp_path, timm_pool="avg", timm_proj="linear").eval()
    tower = model.visual
    image = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = tower.trunk.forward_head(tower.trunk.forward_features(image))  # timm's own pooled features
        expected = features @ tower.head.proj.weight.T
        assert features.shape == (3, tower.trunk.num_features)
        torch.testing.assert_close(model.encode_image(image), expected, rtol=1e-6, atol=1e-6)


def test_mlp_head_is_fc_gelu_fc_with_hidden_twice_embed_dim(tmp_path):
    model = _model(tmp_path, timm_pool="token", timm_proj="mlp", timm_proj_bias=True).eval()
    mlp = model.visual.head.mlp
    assert mlp.fc1.out_features == 64 and mlp.fc2.bias is not None
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.visual.trunk(image)
        expected = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(features)))
        torch.testing.assert_close(model.encode_image(image), expected, rtol=1e-6, atol=1e-6)


# --- OpenCLIP parity ------------------------------------------------------------------------------

# (timm model, image size, embed_dim, vision_cfg); OpenCLIP builds fixed-size models (test_vit) at timm's
# default size whatever image_size says, so those run at that size (160) here
PARITY = {
    "avg-linear": ("test_vit", 160, 32, {"timm_pool": "avg", "timm_proj": "linear"}),
    "default-linear-bias": ("test_vit", 160, 32, {"timm_pool": "", "timm_proj": "linear", "timm_proj_bias": True}),
    "avg-mlp": ("test_vit", 160, 32, {"timm_pool": "avg", "timm_proj": "mlp"}),
    "token-null": ("test_vit", 160, 32, {"timm_pool": "token", "timm_proj": None}),
    "map-none": ("test_vit", 160, 64, {"timm_pool": "map", "timm_proj": "none"}),
    "map-null": ("test_vit", 160, 32, {"timm_pool": "map", "timm_proj": None}),
    "avg-none": ("test_vit", 160, 64, {"timm_pool": "avg", "timm_proj": "none"}),
    "resnet-avg-linear": ("test_resnet", 64, 32, {"timm_pool": "avg", "timm_proj": "linear"}),
    "abs-attn": ("test_efficientnet", 64, 32, {"timm_pool": "abs_attn", "timm_proj": None}),
    "rot-attn-linear": ("test_byobnet", 64, 32, {"timm_pool": "rot_attn", "timm_proj": "linear"}),
}


@pytest.mark.parametrize("variant", sorted(PARITY))
def test_openclip_timm_weights_give_the_same_features(variant, tmp_path):
    model_name, size, embed_dim, vision = PARITY[variant]
    cfg = _config(embed_dim, timm_model_name=model_name, image_size=size, **vision)
    name = f"clipkit-timm-parity-{variant}"
    path = _write(tmp_path, name, cfg)
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    ref = open_clip.create_model(name, pretrained_image=False).eval()
    ours = clipkit.create_model(str(path)).eval()
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    image = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = ref.encode_image(image)
        assert expected.shape == (2, embed_dim)
        torch.testing.assert_close(ours.encode_image(image), expected, rtol=1e-5, atol=1e-5)


SEED_CONVNEXT = {"timm_model_name": "convnext_base", "timm_model_pretrained": False, "timm_pool": "avg",
                 "timm_proj": "linear", "image_size": 256}
SEED_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}


def test_seed_convnext_config_builds_on_meta_like_openclip(tmp_path):
    cfg = {"embed_dim": 512, "vision_cfg": dict(SEED_CONVNEXT), "text_cfg": dict(SEED_TEXT)}
    path = _write(tmp_path, "clipkit-timm-seed-convnext", cfg)
    open_clip.add_model_config(path)
    ours = clipkit.create_model(str(path), device="meta")
    with torch.device("meta"):
        ref = open_clip.create_model("clipkit-timm-seed-convnext", device="meta", pretrained_image=False)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert shapes["visual.head.proj.weight"] == (512, 1024) and shapes["visual.trunk.stem.0.weight"] == (128, 3, 4, 4)
    assert ours.visual.image_size == (256, 256) and ours.preprocess_cfg["size"] == (256, 256)


def test_preprocessing_defaults_come_from_timms_pretrained_config(tmp_path):
    model = _model(tmp_path)
    timm_cfg = model.visual.trunk.pretrained_cfg
    assert model.preprocess_cfg["mean"] == tuple(timm_cfg["mean"]) and model.preprocess_cfg["std"] == tuple(timm_cfg["std"])
    assert model.preprocess_cfg["size"] == (32, 32)
    forced = clipkit.create_model(str(tmp_path / "timm-tiny.json"), force_preprocess_cfg={"mean": (0.1, 0.2, 0.3)})
    assert forced.preprocess_cfg["mean"] == (0.1, 0.2, 0.3)


# --- pretrained weights ---------------------------------------------------------------------------

def test_json_pretrained_offline_is_one_clear_line(tmp_path):
    path = _write(tmp_path, "timm-pretrained", _config(timm_model_pretrained=True))
    with pytest.raises(ClipkitError) as info:  # an empty cache_dir: no weights cached on this machine count
        clipkit.create_model(str(path), cache_dir=str(tmp_path / "cache"))
    message = str(info.value)
    assert "cannot load its pretrained weights" in message and "HF_HUB_OFFLINE" in message
    assert '"pretrained_cfg_overlay": {"file":' in message and "\n" not in message


def test_json_pretrained_is_skipped_under_a_checkpoint_and_on_meta(tmp_path):
    weights = tmp_path / "full.pt"
    torch.save(_model(tmp_path).state_dict(), weights)
    path = _write(tmp_path, "timm-pretrained", _config(timm_model_pretrained=True))
    loaded = clipkit.create_model(str(path), pretrained=str(weights))  # no download attempted
    assert torch.equal(loaded.visual.trunk.pos_embed, torch.load(weights)["visual.trunk.pos_embed"])
    clipkit.create_model(str(path), device="meta")


def test_pretrained_image_argument_asks_for_timm_weights(tmp_path):
    with pytest.raises(ClipkitError, match="cannot load its pretrained weights"):
        clipkit.create_model(str(_write(tmp_path, "timm-plain", _config())), pretrained_image=True,
                             cache_dir=str(tmp_path / "cache"))


def test_timm_weights_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("test_vit", img_size=32)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    overlay = {"pretrained_cfg_overlay": {"file": str(tmp_path / "w.safetensors")}}
    model = _model(tmp_path, timm_model_pretrained=True, timm_model_kwargs=overlay)
    assert torch.equal(model.visual.trunk.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)
    overlay["pretrained_cfg_overlay"]["file"] = str(tmp_path / "missing.safetensors")
    with pytest.raises(ClipkitError, match="missing.safetensors.*check that path"):
        _model(tmp_path, name="timm-missing", timm_model_pretrained=True, timm_model_kwargs=overlay)


# --- configs and build errors ---------------------------------------------------------------------

@pytest.mark.parametrize("vision, where, message", [
    ({"timm_pool": "", "timm_proj": "none"}, "vision_cfg.timm_pool", "unpooled"),
    ({"timm_proj": "conv"}, "vision_cfg.timm_proj", "expected"),
    ({"timm_proj": None, "timm_proj_bias": True}, "vision_cfg.timm_proj_bias", "only applies"),
    ({"timm_drop": 1.5}, "vision_cfg.timm_drop", "must be < 1"),
    ({"timm_model_kwargs": {"img_size": 64}}, "vision_cfg.timm_model_kwargs.img_size", "image_size"),
    ({"timm_polo": "avg"}, "vision_cfg.timm_polo", "did you mean 'timm_pool'"),
])
def test_config_problems_are_named(vision, where, message):
    with pytest.raises(ConfigError) as info:
        validate_model_config(_config(**vision))
    assert any(p.path == where and message in p.message for p in info.value.problems), info.value


@pytest.mark.parametrize("vision, message", [
    ({"timm_model_name": "convnext_bas"}, "did you mean 'convnext_base'"),
    ({"timm_model_name": "test_vit.no_such_tag"}, "Invalid pretrained tag"),
    ({"timm_model_name": "test_convnext", "patch_dropout": 0.5}, "does not take patch_drop_rate"),
    ({"timm_proj": "none"}, "set embed_dim to 64"),
    ({"timm_model_name": "test_resnet", "timm_pool": "abs_attn"}, "divisible by 64"),
])
def test_build_problems_are_clipkit_errors(vision, message, tmp_path):
    with pytest.raises(ClipkitError, match=message):
        _model(tmp_path, **vision)


# --- locking --------------------------------------------------------------------------------------

def _timm_groups(trunk):
    """timm's own parameter groups of the trunk, as sets of 'trunk.' names, first to last."""
    from timm.models import group_parameters

    groups = group_parameters(trunk, trunk.group_matcher())
    return [{f"trunk.{name}" for name in groups[i]} for i in sorted(groups)]


@pytest.mark.filterwarnings("ignore:Importing from timm.models.helpers:FutureWarning")  # OpenCLIP's lock
@pytest.mark.parametrize("unlocked", [0, 1, 3, 7, 50])
@pytest.mark.parametrize("freeze_bn_stats", [False, True])
def test_trainable_sets_match_timm_groups_and_openclip(unlocked, freeze_bn_stats, tmp_path):
    cfg = _config(timm_pool="avg", timm_proj="linear")
    path = _write(tmp_path, "clipkit-timm-lock", cfg)
    model = clipkit.create_model(str(path))
    groups = _timm_groups(model.visual.trunk)
    assert len(groups) == 7 and "trunk.pos_embed" in groups[0]  # embeddings first, then one per block
    model.lock_image_tower(unlocked, freeze_bn_stats=freeze_bn_stats)
    kept = set().union(*groups[len(groups) - min(unlocked, len(groups)):]) if unlocked else set()
    assert _trainable(model.visual) == kept | {"head.proj.weight"}
    open_clip.add_model_config(path)
    ref = open_clip.create_model("clipkit-timm-lock", pretrained_image=False)
    ref.lock_image_tower(unlocked)
    assert _trainable(model.visual) == _trainable(ref.visual)


def test_relocking_unfreezes_more_and_text_stays_trainable(tmp_path):
    model = _model(tmp_path)
    model.lock_image_tower(0)
    model.lock_image_tower(2)
    assert {"trunk.blocks.4.attn.qkv.weight", "trunk.norm.weight", "head.proj.weight"} <= _trainable(model.visual)
    assert "trunk.blocks.3.attn.qkv.weight" not in _trainable(model.visual)
    assert all(p.requires_grad for p in model.text.parameters())


def _batchnorms(tower):
    return {name: m for name, m in tower.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("freeze_bn_stats", [False, True])
def test_training_step_leaves_locked_parameters_and_bn_stats_untouched(freeze_bn_stats, tmp_path):
    model = _model(tmp_path, timm_model_name="test_resnet", image_size=64)
    model.lock_image_tower(1, freeze_bn_stats=freeze_bn_stats)
    model.train()
    tower = model.visual
    last_group = _timm_groups(tower.trunk)[-1]
    frozen = {n: p.detach().clone() for n, p in tower.named_parameters() if not p.requires_grad}
    assert frozen and not set(frozen) & last_group and "head.proj.weight" not in frozen
    head = tower.head.proj.weight.detach().clone()
    stats = {n: b.detach().clone() for n, b in tower.named_buffers() if "running_mean" in n}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    image, text = torch.randn(4, 3, 64, 64), torch.randint(1, 99, (4, 16))
    image_features, text_features, scale = model(image, text)
    (scale * image_features @ text_features.T).logsumexp(dim=1).mean().backward()
    optimizer.step()
    for name, param in tower.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert not torch.equal(tower.head.proj.weight, head)
    for name, bn in _batchnorms(tower).items():  # locked BatchNorms stay in eval mode through model.train()
        locked = f"{name}.weight" not in last_group
        assert bn.training is not (freeze_bn_stats and locked), name
    for name, before in stats.items():
        locked = name.replace("running_mean", "weight") not in last_group
        assert torch.equal(tower.get_buffer(name), before) == (freeze_bn_stats and locked), name


def test_grad_checkpointing_and_no_weight_decay_come_from_timm(tmp_path):
    model = _model(tmp_path)
    model.set_grad_checkpointing(True)
    assert model.visual.trunk.grad_checkpointing
    assert {"visual.trunk.pos_embed", "visual.trunk.cls_token"} <= model.no_weight_decay()


def test_plugin_module_imports_without_torch_or_timm():
    import subprocess
    import sys

    code = "import sys, clipkit.builtin.timm; print('torch' in sys.modules, 'timm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() \
        == ["False", "False"]


# --- every shipped timm config against OpenCLIP ---------------------------------------------------------

def _openclip_timm_configs():
    from pathlib import Path

    folder = Path(open_clip.__file__).parent / "model_configs"
    names = []
    for path in sorted(folder.glob("*.json")):
        cfg = json.loads(path.read_text())
        if "timm_model_name" in cfg["vision_cfg"] and "hf_model_name" not in cfg["text_cfg"] \
                and "multimodal_cfg" not in cfg:
            names.append(path.stem)
    return names


OPENCLIP_TIMM = _openclip_timm_configs()
SHIPPED_TIMM = sorted(n for n in list_models() if "timm_model_name" in clipkit.get_model_config(n)["vision_cfg"])


def test_ships_every_openclip_timm_config_unchanged():
    assert len(OPENCLIP_TIMM) == 76 and set(OPENCLIP_TIMM) <= set(SHIPPED_TIMM)
    for name in OPENCLIP_TIMM:
        assert clipkit.get_model_config(name) == open_clip.get_model_config(name), name


@pytest.fixture(scope="module")
def _fast_meta_init():
    """Shapes only: skip weight initialisation, which dominates building large models on the meta device.

    Yields a cache of compared shapes, shared by configs with the same vision tower.
    """
    import timm.layers.weight_init as weight_init

    def keep(tensor, *args, **kwargs):
        return tensor

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weight_init, "_trunc_normal_", keep)
        for fn in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "zeros_", "ones_", "constant_"):
            patch.setattr(torch.nn.init, fn, keep)
        yield {}


@pytest.mark.parametrize("name", SHIPPED_TIMM)
def test_shipped_timm_config_has_openclips_vision_parameters(name, _fast_meta_init):
    # the vision tower only (the text towers are the builtin ones, checked elsewhere); configs that share
    # a vision_cfg and embed_dim share one comparison
    cfg = clipkit.get_model_config(name)
    key = json.dumps([cfg["embed_dim"], cfg["vision_cfg"]], sort_keys=True)
    if key not in _fast_meta_init:
        config = validate_model_config(cfg)
        factory = registry.get("vision_tower", config.vision_type).load()
        gc.disable()  # collections scanning the giant towers while they are built would double the time
        try:
            with torch.device("meta"):
                towers = (factory(config.vision, TowerContext(embed_dim=config.embed_dim)),
                          open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"]))
            _fast_meta_init[key] = tuple({k: tuple(v.shape) for k, v in t.state_dict().items()} for t in towers)
            del towers
        finally:
            gc.enable()
    ours, ref = _fast_meta_init[key]
    assert ours == ref


def test_grad_checkpointing_unsupported_is_an_error():
    from clipkit.builtin.timm.model import TimmTower

    class NoCheckpointing(torch.nn.Module):
        def set_grad_checkpointing(self, enable=True):
            raise NotImplementedError("no checkpointing here")

    tower = TimmTower.__new__(TimmTower)
    torch.nn.Module.__init__(tower)
    tower.trunk = NoCheckpointing()
    tower.cfg = type("Cfg", (), {"timm_model_name": "fake"})()
    with pytest.raises(ClipkitError, match="timm model fake does not support gradient checkpointing"):
        tower.set_grad_checkpointing(True)
    tower.set_grad_checkpointing(False)  # turning it off is always fine
