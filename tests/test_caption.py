"""clipkit caption: captions from any model family whose model generates, read back with its tokenizer; a
model that does not generate is one line."""
import json

import pytest
import torch
from PIL import Image

import clipkit
from clipkit.cli import main
from clipkit.model import ClipModel
from clipkit.tokenizer import tokenize


class Talking(ClipModel):
    """Captions every image "a red square", then pads (as a generating family's model would return ids)."""

    def generate(self, images, sot_token_id, eos_token_id, seq_len=30, **options):
        self.options = options
        row = tokenize("a red square")[0]
        row = row[:int((row != 0).sum())]
        assert row[0] == sot_token_id and row[-1] == eos_token_id
        out = torch.zeros(images.shape[0], seq_len, dtype=torch.long)
        out[:, :len(row)] = row
        return out


def build_talking(cfg, ctx):
    return Talking(ctx.visual, ctx.text, **ctx.clip_kwargs())


@pytest.fixture
def files(tmp_path, tiny_cfg):
    tiny_cfg["text_cfg"]["vocab_size"] = 49408  # the CLIP tokenizer's ids
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(tiny_cfg))
    image = tmp_path / "a.png"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(image)
    return model, image


@pytest.fixture
def talking(files, plugin_module):
    @clipkit.hookimpl
    def register_model_families(register):
        register("talking", build_talking)

    plugin_module("talkplug", register_model_families=register_model_families)
    model, image = files
    model.write_text(json.dumps({**json.loads(model.read_text()), "model_family": "talking"}))
    return model, image


def test_a_generating_family_captions_each_image(talking, capsys):
    model, image = talking
    assert main(["caption", str(model), str(image), str(image), "--generation-type", "top_k"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{image}\ta red square"] * 2


def test_a_model_that_does_not_generate_is_one_line(files, capsys):
    model, image = files
    assert main(["caption", str(model), str(image)]) == 1
    assert capsys.readouterr().err == (f"clipkit caption: {model}: a model of family 'clip' does not generate text "
                                       f"(it has no generate()); captions need a model family that does\n")


def test_missing_and_unusable_images_are_one_line(talking, tmp_path, capsys):
    model, image = talking
    assert main(["caption", str(model), str(tmp_path / "nope.png")]) == 2
    assert capsys.readouterr().err == f"clipkit caption: no such file: {tmp_path / 'nope.png'}\n"
    text = tmp_path / "text.png"
    text.write_text("not an image")
    assert main(["caption", str(model), str(text)]) == 1
    assert capsys.readouterr().err.startswith(f"clipkit caption: {text}: cannot use the image (")
