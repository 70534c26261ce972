"""clipkit-plugin-resnet: configs, the tower contract, locking, checkpointing, and parity with OpenCLIP.

Run against the installed plugin (``pip install "plugins/clipkit-plugin-resnet[test]"``), since
clipkit finds plugins through their entry points; needs open_clip_torch 3.3.0 for the parity tests.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet as OpenCLIPModifiedResNet
from PIL import Image

import clipkit
from clipkit.config import validate_model_config
from clipkit.errors import ConfigError
from clipkit.factory import build_model
from clipkit.registry import registry
from clipkit_plugin_resnet import ResNetCfg
from clipkit_plugin_resnet.model import ModifiedResNet

SHIPPED = [f"{m}{s}" for m in ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64") for s in ("", "-quickgelu")]
OPENCLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"
TINY = {
    "embed_dim": 24,
    "vision_cfg": {"layers": [1, 2, 1, 1], "width": 16, "head_width": 32, "image_size": 64},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "attnpool"]


@pytest.fixture(scope="module", autouse=True)
def _installed():
    if not registry.has("vision_tower", "resnet"):
        pytest.fail("clipkit does not see the 'resnet' plugin: install it first "
                    "(pip install plugins/clipkit-plugin-resnet), then run these tests")


def _perturb_batch_norms(module, seed=0):
    """Random BatchNorm affine parameters and statistics: at init they are ones and zeros (and each
    block's bn3 weight is zero, so its convolutions would not affect the output at all)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            n = bn.num_features
            bn.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(n, generator=gen))
            bn.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(n, generator=gen))


def _tiny(**vision):
    cfg = copy.deepcopy(TINY)
    cfg["vision_cfg"].update(vision)
    torch.manual_seed(0)
    model = build_model(validate_model_config(cfg, source="tiny"))
    _perturb_batch_norms(model.visual)
    return model


def _group_names(tower):
    """Parameter names of each layer group, in order."""
    ids = {id(p): n for n, p in tower.named_parameters()}
    out = []
    for group in tower.layer_groups():
        params = [p for item in group for p in ([item] if isinstance(item, torch.nn.Parameter) else item.parameters())]
        out.append([ids[id(p)] for p in params])
    return out


# -- registration and configs ---------------------------------------------------------------------

def test_registered_by_this_distribution_and_imports_without_torch():
    for kind in ("vision_tower", "freezer"):
        assert registry.get(kind, "resnet").plugin.label == "clipkit-plugin-resnet 0.1.0 (plugin 'resnet')"
    assert set(SHIPPED) <= set(clipkit.list_models())
    done = subprocess.run([sys.executable, "-c", "import sys, clipkit_plugin_resnet; print('torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_openclips_and_validate(name):
    cfg = clipkit.get_model_config(name)
    assert cfg == json.loads((OPENCLIP_CONFIGS / f"{name}.json").read_text())
    config = validate_model_config(cfg, source=name)
    assert config.vision_type == "resnet"  # inferred from the list of layers
    assert isinstance(config.vision, ResNetCfg) and config.vision.layers == tuple(cfg["vision_cfg"]["layers"])


@pytest.mark.parametrize("patch, message", [
    ({"image_size": 100}, "vision_cfg.image_size: must be a multiple of 32"),
    ({"image_size": [224, 224]}, "vision_cfg.image_size: expected integer"),
    ({"head_width": 48}, "vision_cfg.head_width: gives heads = width * 32 // head_width = 42, which does not "
                         "divide the feature width 2048"),
    ({"head_width": 4096}, "vision_cfg.head_width: 4096 is wider than the final feature map"),
    ({"layers": [3, 4, 6]}, "vision_cfg.layers: expected list of 4"),
    ({"layers": [3, 0, 6, 3]}, "vision_cfg.layers: must be > 0"),
    ({"width": 1}, "vision_cfg.width: must be >= 2"),
    ({"patch_size": 32}, "vision_cfg.patch_size: expected null, got 32"),
    ({"output_tokens": True}, "vision_cfg.output_tokens: unknown key for vision tower type 'resnet'"),
    ({"type": "resnet", "layers": 12}, "vision_cfg.layers: expected list of 4"),
])
def test_config_problems_are_reported(patch, message):
    cfg = clipkit.get_model_config("RN50")
    cfg["vision_cfg"].update(patch)
    with pytest.raises(ConfigError) as info:
        validate_model_config(cfg, source="rn.json")
    assert f"rn.json: {message}" in str(info.value)


def test_required_layers_and_defaults():
    with pytest.raises(ConfigError, match="vision_cfg.layers: missing required key for vision tower type 'resnet'"):
        validate_model_config({**TINY, "vision_cfg": {"type": "resnet"}}, source="rn.json")
    cfg = ResNetCfg(layers=(3, 4, 6, 3))
    assert (cfg.width, cfg.head_width, cfg.image_size, cfg.heads()) == (64, 64, 224, 32)


# -- the tower contract ---------------------------------------------------------------------------

def test_forward_shape_and_protocol():
    model = _tiny()
    tower = model.visual
    assert isinstance(tower, ModifiedResNet) and tower.output_dim == 24 and tower.image_size == 64
    out = model.encode_image(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 24) and torch.isfinite(out).all()
    model.eval()
    assert model.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 24)


def test_layer_groups_cover_every_parameter_once_in_order():
    tower = _tiny().visual
    names = _group_names(tower)
    flat = [n for group in names for n in group]
    assert sorted(flat) == sorted(n for n, _ in tower.named_parameters()) and len(flat) == len(set(flat))
    assert [{n.split(".")[0] if n.split(".")[0] in GROUPS else "stem" for n in g} for g in names] == \
        [{g} for g in GROUPS]


def test_backward_reaches_every_parameter():
    model = _tiny()
    model.encode_image(torch.randn(2, 3, 64, 64)).square().sum().backward()
    for name, param in model.visual.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_grad_checkpointing_recomputes_blocks_and_changes_nothing_else():
    plain = _tiny()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    calls = []
    ckpt.visual.layer2[1].register_forward_pre_hook(lambda *_: calls.append(1))
    image = torch.randn(3, 3, 64, 64)
    for model in (plain, ckpt):
        model.train()
        model.encode_image(image).square().sum().backward()
    assert len(calls) == 2  # the forward pass, and the recomputation in backward
    for (name, a), b in zip(plain.visual.named_parameters(), ckpt.visual.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # the BatchNorm running statistics are updated once, as without checkpointing
    for (name, a), b in zip(plain.visual.named_buffers(), ckpt.visual.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():  # no backward, nothing to recompute: checkpointing is skipped
        ckpt.encode_image(image)
    assert len(calls) == 3


# -- locking ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("unlocked, trainable", [(0, []), (1, ["attnpool"]), (2, ["layer4", "attnpool"]),
                                                 (6, GROUPS), (100, GROUPS)])
@pytest.mark.parametrize("freeze_bn_stats", [False, True])
def test_locking_leaves_the_last_groups_trainable(unlocked, trainable, freeze_bn_stats):
    model = _tiny()
    model.lock_image_tower(unlocked_groups=2, freeze_bn_stats=True)  # relocking starts from scratch
    model.lock_image_tower(unlocked_groups=unlocked, freeze_bn_stats=freeze_bn_stats)
    tower = model.visual
    names = dict(zip(GROUPS, _group_names(tower)))
    expected = {n for g in trainable for n in names[g]}
    assert {n for n, p in tower.named_parameters() if p.requires_grad} == expected
    assert all(p.requires_grad for p in model.text.parameters())

    model.train()
    before = {n: b.clone() for n, b in tower.named_buffers()}
    out = model.encode_image(torch.randn(2, 3, 64, 64))
    if expected:
        out.sum().backward()
    for name, bn in tower.named_modules():
        if not isinstance(bn, torch.nn.BatchNorm2d):
            continue
        group = name.split(".")[0] if name.split(".")[0] in GROUPS else "stem"
        kept = freeze_bn_stats and group not in trainable
        assert bn.training is not kept, name
        assert torch.equal(bn.running_mean, before[f"{name}.running_mean"]) is kept, name
    for name, param in tower.named_parameters():
        assert (param.grad is not None) == (name in expected), name


# -- parity with OpenCLIP -------------------------------------------------------------------------

def test_tower_matches_openclips_modified_resnet_in_train_and_eval():
    """The same weights in OpenCLIP's tower: same outputs, gradients and BatchNorm statistics."""
    torch.manual_seed(0)
    ref = OpenCLIPModifiedResNet(layers=[1, 2, 1, 1], output_dim=24, heads=16, image_size=64, width=16)
    _perturb_batch_norms(ref)
    ours = ModifiedResNet(ResNetCfg(layers=(1, 2, 1, 1), width=16, head_width=32, image_size=64), 24)
    ours.load_state_dict(ref.state_dict())  # strict: the same names and shapes
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
    image = torch.randn(3, 3, 64, 64)
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        ref.zero_grad()
        ours.zero_grad()
        a, b = ref(image), ours(image)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        a.square().sum().backward()
        b.square().sum().backward()
        for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
            # train-mode BatchNorm backward cancels large terms: compare against the gradient's scale
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6 + 1e-5 * p.grad.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")
        for (name, x), y in zip(ref.named_buffers(), ours.buffers()):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _images():
    """Two 224-px RGB images with structure at every scale: a colour ramp and a checkerboard."""
    x, y = np.meshgrid(np.linspace(0, 255, 256), np.linspace(255, 0, 256))
    ramp = np.stack([x, y, np.full_like(x, 96.0)], -1)
    checker = ((np.indices((256, 256)) // 16).sum(0) % 2 * 200 + 20)[..., None].repeat(3, -1)
    return [Image.fromarray(a.astype(np.uint8)) for a in (ramp, checker)]


def test_rn50_checkpoint_gives_openclips_embeddings(tmp_path):
    torch.manual_seed(0)
    ref = open_clip.create_model("RN50")  # random init (OpenCLIP logs that no weights were loaded)
    _perturb_batch_norms(ref.visual)
    path = tmp_path / "rn50.pt"
    torch.save(ref.state_dict(), path)
    model, _, preprocess = clipkit.create_model_and_transforms("RN50", pretrained=str(path))
    ref.eval()
    model.eval()
    assert type(model.visual) is ModifiedResNet

    images = _images()
    ref_preprocess = open_clip.image_transform(224, is_train=False)
    pixels = torch.stack([preprocess(im) for im in images])
    torch.testing.assert_close(pixels, torch.stack([ref_preprocess(im) for im in images]), rtol=0, atol=0)
    texts = ["a diagram", "a photo of a checkerboard"]
    tokens = clipkit.get_tokenizer("RN50")(texts)
    assert torch.equal(tokens, open_clip.get_tokenizer("RN50")(texts))

    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), ref.encode_image(pixels), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), ref.encode_text(tokens), rtol=1e-5, atol=1e-5)
        ours, theirs = model(pixels, tokens), ref(pixels, tokens)  # normalised features, logit scale
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    saved = {k: v.shape for k, v in model.state_dict().items()}
    assert saved == {k: v.shape for k, v in ref.state_dict().items()}
