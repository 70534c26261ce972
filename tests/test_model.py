import json

import pytest
import torch

import clipkit


@pytest.fixture
def make(tmp_path):
    def build(cfg, name="tiny", **kwargs):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        return clipkit.create_model(str(path), **kwargs)
    return build


def _inputs(batch=3, size=32, ctx=16, vocab=100):
    torch.manual_seed(0)
    text = torch.randint(1, vocab - 1, (batch, ctx))
    text[:, 5] = vocab - 1  # an "end token" with the highest id
    return torch.randn(batch, 3, size, size), text


def test_forward_tuple_and_dict(make, tiny_cfg):
    model = make(tiny_cfg).eval()
    image, text = _inputs()
    img_f, txt_f, scale = model(image, text)
    assert img_f.shape == (3, 32) and txt_f.shape == (3, 32)
    assert torch.allclose(img_f.norm(dim=-1), torch.ones(3)) and torch.allclose(txt_f.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    model.output_dict = True
    out = model(image, text)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert torch.equal(out["image_features"], img_f)
    assert model.encode_image(image).shape == (3, 32)


def test_logit_bias_and_nonscalar_scale(make, tiny_cfg):
    tiny_cfg.update(init_logit_bias=-10.0, nonscalar_logit_scale=True, init_logit_scale=2.0)
    model = make(tiny_cfg).eval()
    assert model.logit_scale.shape == (1,) and model.logit_bias.item() == -10.0
    image, text = _inputs()
    *_, bias = model(image, text)
    assert bias.item() == -10.0
    img_logits, txt_logits = model.get_logits(image, text)
    expected = torch.exp(torch.tensor(2.0)) * model.encode_image(image, True) @ model.encode_text(text, True).T - 10
    assert torch.allclose(img_logits, expected, atol=1e-5) and torch.equal(txt_logits, img_logits.T)


def test_output_tokens(make, tiny_cfg):
    tiny_cfg["vision_cfg"]["output_tokens"] = True
    tiny_cfg["text_cfg"]["output_tokens"] = True
    model = make(tiny_cfg).eval()
    image, text = _inputs()
    pooled, tokens = model.visual(image)
    assert pooled.shape == (3, 32) and tokens.shape == (3, 16, 64)
    pooled, tokens = model.text(text)
    assert pooled.shape == (3, 32) and tokens.shape == (3, 16, 48)
    assert model.encode_image(image).shape == (3, 32)


def test_grad_checkpointing_same_values_and_grads(make, tiny_cfg):
    model = make(tiny_cfg)
    image, text = _inputs()
    def run():
        model.zero_grad()
        img, txt, scale = model(image, text)
        loss = (scale * img @ txt.T).logsumexp(dim=1).mean()
        loss.backward()
        return loss.detach(), model.visual.conv1.weight.grad.clone(), model.text.token_embedding.weight.grad.clone()
    plain = run()
    model.set_grad_checkpointing(True)
    assert model.visual.transformer.grad_checkpointing and model.text.transformer.grad_checkpointing
    ckpt = run()
    for a, b in zip(plain, ckpt):
        assert torch.allclose(a, b, atol=1e-6)


def test_patch_dropout_only_in_training(make, tiny_cfg):
    tiny_cfg["vision_cfg"]["patch_dropout"] = 0.5
    tiny_cfg["vision_cfg"]["output_tokens"] = True
    model = make(tiny_cfg)
    image, _ = _inputs()
    assert model.visual(image)[1].shape[1] == 8  # 16 patches, half kept
    assert model.eval().visual(image)[1].shape[1] == 16


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16"])
def test_low_precision_builds_and_runs(make, tiny_cfg, precision):
    model = make(tiny_cfg, precision=precision).eval()
    image, text = _inputs()
    assert model.visual.conv1.weight.dtype == torch.bfloat16
    norm_dtype = torch.float32 if precision == "bf16" else torch.bfloat16
    assert model.visual.ln_post.weight.dtype == norm_dtype
    img, txt, _ = model(image.bfloat16(), text)
    assert img.dtype == torch.bfloat16 and torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_unknown_precision(make, tiny_cfg):
    with pytest.raises(clipkit.ClipkitError, match="precision must be one of"):
        make(tiny_cfg, precision="fp8")


def test_overrides_beat_json(make, tiny_cfg):
    model = make(tiny_cfg, force_image_size=48, force_context_length=12, force_quick_gelu=True,
                 init_logit_scale=1.0)
    assert model.visual.image_size == (48, 48) and model.visual.positional_embedding.shape[0] == 37
    assert model.text.positional_embedding.shape[0] == 12
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert model.logit_scale.item() == 1.0
    assert model.preprocess_cfg["size"] == (48, 48)


def test_meta_device_build(tiny_cfg, make):
    model = make(tiny_cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())


def test_trainable_sets_follow_layer_groups(make, tiny_cfg):
    model = make(tiny_cfg)
    model.lock_image_tower(unlocked_groups=1)
    trainable = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert trainable == {"proj"}
    model.lock_text_tower(unlocked_layers=2, freeze_layer_norm=False)
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    # last block + ln_final and the projection, plus every LayerNorm of the locked groups
    assert "text_projection" in trainable and "transformer.resblocks.1.attn.in_proj_weight" in trainable
    assert "transformer.resblocks.0.ln_1.weight" in trainable
    assert "transformer.resblocks.0.attn.in_proj_weight" not in trainable
    assert "token_embedding.weight" not in trainable


def test_freeze_bn_stats_survives_train(tiny_cfg):
    from torch import nn

    from clipkit.freeze import lock_layer_groups

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 4)

        def layer_groups(self):
            return [[self.bn], [self.fc]]

        def forward(self, x):
            return self.fc(self.bn(x))

    tower = Tower()
    lock_layer_groups(tower, 1, freeze_bn_stats=True)
    tower.train()
    before = tower.bn.running_mean.clone()
    tower(torch.randn(8, 4) + 5)
    assert torch.equal(tower.bn.running_mean, before)
    assert [n for n, p in tower.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_relock_releases_bn_stats_and_all_unlocked_frees_everything():
    from torch import nn

    from clipkit.freeze import lock_layer_groups

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 4)
            self.extra = nn.Parameter(torch.zeros(4))  # in no layer group

        def layer_groups(self):
            return [[self.bn], [self.fc]]

        def forward(self, x):
            return self.fc(self.bn(x)) + self.extra

    tower = Tower().train()
    lock_layer_groups(tower, 0, freeze_bn_stats=True)
    assert not tower.bn.training
    lock_layer_groups(tower, 2)  # gradual unfreezing: a later lock without the flag
    tower.train()
    before = tower.bn.running_mean.clone()
    tower(torch.randn(8, 4) + 5)
    assert not torch.equal(tower.bn.running_mean, before)  # statistics update again
    assert all(p.requires_grad for p in tower.parameters())
    lock_layer_groups(tower, 1)
    assert not tower.extra.requires_grad and tower.fc.weight.requires_grad
    with pytest.raises(clipkit.ClipkitError, match="must be an int >= 0, got -1"):
        lock_layer_groups(tower, -1)


def test_scaled_cosine_attention_runs_and_is_bounded(make, tiny_cfg):
    """OpenCLIP 3.3.0 crashes on scaled_cosine_attn (bmm on 4-D tensors); clipkit computes it."""
    tiny_cfg["vision_cfg"]["scaled_cosine_attn"] = True
    tiny_cfg["text_cfg"].update(scaled_cosine_attn=True, scale_heads=True)
    model = make(tiny_cfg).eval()
    image, text = _inputs()
    img, txt, _ = model(image, text)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    attn = model.visual.transformer.resblocks[0].attn
    assert attn.logit_scale.shape == (4, 1, 1) and attn.head_scale is None
    assert model.text.transformer.resblocks[0].attn.head_scale.shape == (4, 1, 1)


def test_bad_preprocessing_override_fails_before_building(make, tiny_cfg, monkeypatch):
    import clipkit.factory as factory

    monkeypatch.setattr(factory, "build_model", lambda *a, **k: pytest.fail("built before checking"))
    with pytest.raises(clipkit.ClipkitError, match="interpolation must be one of"):
        make(tiny_cfg, force_preprocess_cfg={"interpolation": "nearest"})


def test_a_model_whose_plugin_is_missing_names_the_pip_install(without_plugins):
    without_plugins("clipkit-plugin-coca")
    with pytest.raises(KeyError, match="^unknown model 'coca_ViT-B-32' .*; coca_ViT-B-32 comes with a plugin: "
                                       "pip install clipkit-plugin-coca$"):
        clipkit.create_model("coca_ViT-B-32")
