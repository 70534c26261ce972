"""The seed document's snippets, with clipkit for open_clip."""
import json
from pathlib import Path

import pytest
import torch

import clipkit
from clipkit.config import validate_model_config

BASIC = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}


def test_basic_config_structure_builds():
    model = clipkit.create_model(_write(BASIC, "seed_basic"), device="meta")
    assert model.visual.image_size == (224, 224) and model.visual.grid_size == (7, 7)
    assert model.text.context_length == 77 and model.embed_dim == 512


def _write(cfg, name):
    import tempfile

    path = Path(tempfile.mkdtemp()) / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_add_model_config_folder_then_file_then_create(tmp_path):
    folder = tmp_path / "model_configs"
    folder.mkdir()
    (folder / "my_model.json").write_text(json.dumps(BASIC))
    clipkit.add_model_config(Path(folder))
    (tmp_path / "my_model2.json").write_text(json.dumps(BASIC))
    clipkit.add_model_config(Path(tmp_path / "my_model2.json"))
    model, _, preprocess = clipkit.create_model_and_transforms("my_model", pretrained=None)
    assert "my_model" in clipkit.list_models() and "my_model2" in clipkit.list_models()
    from PIL import Image

    image = preprocess(Image.new("RGB", (300, 200), (255, 0, 0))).unsqueeze(0)
    assert image.shape == (1, 3, 224, 224)
    with torch.no_grad():
        assert model.encode_image(image).shape == (1, 512)


def test_programmatic_custom_model_from_seed(tmp_path, monkeypatch):
    custom_config = {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 256, "layers": 16, "width": 1024, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 16},
    }
    monkeypatch.chdir(tmp_path)
    config_path = Path("custom_model.json")
    with open(config_path, "w") as f:
        json.dump(custom_config, f, indent=2)
    clipkit.add_model_config(config_path)
    model, preprocess_train, preprocess = clipkit.create_model_and_transforms("custom_model", pretrained=None)
    assert sum(p.numel() for p in model.parameters()) > 300_000_000
    assert model.visual.image_size == (256, 256) and model.preprocess_cfg["size"] == (256, 256)
    from PIL import Image

    batch = torch.stack([preprocess(Image.new("RGB", (320, 256))), preprocess_train(Image.new("RGB", (256, 400)))])
    text = torch.zeros(2, 77, dtype=torch.long)
    text[:, 0], text[:, 3] = 49406, 49407
    with torch.no_grad():
        image_features, text_features, scale = model(batch, text)
    assert image_features.shape == text_features.shape == (2, 768)


def test_list_models_snippet():
    models = clipkit.list_models()
    assert isinstance(models, list) and "ViT-B-16" in models


@pytest.mark.parametrize("vision", [
    {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16, "head_width": 64},
])
def test_partial_vision_block_validates_when_merged(vision):
    cfg = dict(BASIC, vision_cfg=vision)
    config = validate_model_config(cfg)
    assert config.vision.head_width == 64 and config.vision.patch_size == 16
