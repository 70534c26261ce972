"""clipkit against OpenCLIP 3.3.0 itself (the reference implementation, a test dependency only)."""
import json

import open_clip
import pytest
import torch

import clipkit
from clipkit.config import BUILTIN_CONFIG_DIR


def _builtin_towers(path):
    cfg = json.loads(path.read_text())
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    return "timm_model_name" not in vision and "hf_model_name" not in text


# the configs whose towers are the builtin ViT and text transformer (timm/HF ones have their own tests)
BUILTIN_NAMES = sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.json") if _builtin_towers(p))


def test_ships_every_builtin_vit_config_of_openclip():
    assert len(BUILTIN_NAMES) == 45
    for name in BUILTIN_NAMES:
        assert clipkit.get_model_config(name) == open_clip.get_model_config(name), name


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_config_parameter_names_and_shapes(name):
    with torch.device("meta"):
        ref = open_clip.create_model(name, device="meta")
    ours = clipkit.create_model(name, device="meta")
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


VARIANTS = {
    "plain": ({}, {}, {}),
    "quickgelu-ls-nonsquare": ({"quick_gelu": True}, {"ls_init_value": 0.1, "image_size": [32, 48]}, {"ls_init_value": 0.1}),
    "clipa": ({}, {"no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True},
              {"no_causal_mask": True, "pool_type": "last", "proj_bias": True}),
    "attn-pool": ({}, {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 4}, {}),
    "siglip-like": ({"init_logit_bias": -10.0, "custom_text": True},
                    {"act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}},
                    {"pool_type": "eos", "eos_id": 98, "norm_kwargs": {"eps": 1e-6}}),
    "custom-blocks": ({}, {"qk_norm": True, "scale_heads": True, "scale_attn_inner": True, "scale_attn": True,
                           "scale_fc": True}, {"scale_fc": True, "scale_attn": True}),
    "sincos-first-noproj": ({"embed_dim": 48}, {"pos_embed_type": "sin_cos_2d"}, {"pool_type": "first", "proj_type": "none"}),
    "embed-cls": ({"custom_text": True}, {}, {"embed_cls": True}),
}


def _merge(tiny, top, vision, text):
    cfg = json.loads(json.dumps(tiny))
    cfg.update(top)
    cfg["vision_cfg"].update(vision)
    cfg["text_cfg"].update(text)
    return cfg


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_openclip_weights_give_same_features(variant, tiny_cfg, tmp_path):
    cfg = _merge(tiny_cfg, *VARIANTS[variant])
    name = f"parity-{variant}"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    ref = open_clip.create_model(name).eval()
    weights = tmp_path / "ref.pt"
    torch.save(ref.state_dict(), weights)
    ours = clipkit.create_model(str(path), pretrained=str(weights)).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    size = cfg["vision_cfg"]["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    image = torch.randn(4, 3, h, w)
    text = torch.randint(1, 97, (4, 16))
    text[:, 6] = 98  # eos for the eos variant
    text[:, 9] = 99  # highest id: CLIP's argmax end token
    text[:, 12:] = 0  # padding
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(image), ref.encode_image(image), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(text), ref.encode_text(text), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unlocked", [0, 1, 2, 3, 4, 10])
def test_lock_trainable_sets_equal_openclip(unlocked, tiny_cfg, tmp_path):
    path = tmp_path / "locktiny.json"
    path.write_text(json.dumps(tiny_cfg))
    open_clip.add_model_config(path)
    ref = open_clip.create_model("locktiny")
    ours = clipkit.create_model(str(path))
    for model in (ref, ours):
        model.lock_image_tower(unlocked_groups=unlocked)
        model.lock_text_tower(unlocked_layers=unlocked)
    ref_state = {n: p.requires_grad for n, p in ref.named_parameters()}
    # compare in the checkpoint layout, where both models name parameters alike
    ours_names = dict(ours.named_parameters())
    ours_state = {}
    for key in ours.state_dict():
        internal = key if key.startswith(("visual.", "logit_")) else "text." + key
        ours_state[key] = ours_names[internal].requires_grad
    assert ours_state == ref_state


@pytest.mark.parametrize("unlocked", [0, 1, 2, 10])
def test_text_lock_without_layer_norm_freezing_adds_exactly_the_locked_norms(unlocked, tiny_cfg, tmp_path):
    """OpenCLIP asserts on freeze_layer_norm=False for its text tower; clipkit leaves the LayerNorms
    of the locked groups trainable and changes nothing else."""
    path = tmp_path / "lntiny.json"
    path.write_text(json.dumps(tiny_cfg))
    open_clip.add_model_config(path)
    ref = open_clip.create_model("lntiny")
    ref.lock_text_tower(unlocked_layers=unlocked)
    ref_trainable = {n for n, p in ref.named_parameters()
                     if p.requires_grad and not n.startswith(("visual.", "logit_"))}
    ours = clipkit.create_model(str(path))
    ours.lock_text_tower(unlocked_layers=unlocked, freeze_layer_norm=False)
    ours_trainable = {n[len("text."):] for n, p in ours.named_parameters() if p.requires_grad and n.startswith("text.")}
    norms = {n for n, _ in ours.text.named_parameters() if ".ln_" in f".{n}"}
    assert ours_trainable == ref_trainable | norms
