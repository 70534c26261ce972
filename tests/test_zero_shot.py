"""Zero-shot helpers: the ImageNet metadata and the classifier builders agree with OpenCLIP 3.3.0."""
import json
import pickle
import sys
import zlib

import open_clip
import pytest
import torch
from open_clip import zero_shot_metadata as oc_meta  # noqa: E402
from torch.testing import assert_close

import clipkit
from clipkit.zero_shot import build_zero_shot_classifier, build_zero_shot_classifier_legacy
from clipkit.zero_shot_metadata import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    PromptTemplate,
)

CONTEXT_LENGTH = 16
VOCAB_SIZE = 300
EMBED_DIM = 32
TINY_OPENCLIP_CFG = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 16},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": VOCAB_SIZE, "width": 48, "heads": 4, "layers": 2},
}
MODEL_NAME = "clipkit-zero-shot-test-tiny"
# 23 classes, so that batches of 10 leave a short last batch
CLASSNAMES = list(IMAGENET_CLASSNAMES[:20]) + ["kite (bird of prey)", "potter's wheel", "{odd} name"]
FORMAT_TEMPLATES = ["a photo of a {}.", "{} in the wild", "a blurry picture of the {}, taken at night."]


def word_tokenizer(texts):
    """Deterministic stand-in for a CLIP tokenizer: one id per word (crc32 into 1..VOCAB_SIZE-2),
    then the end token (the highest id, where the text tower pools), zero-padded."""
    if isinstance(texts, str):
        texts = [texts]
    out = torch.zeros(len(texts), CONTEXT_LENGTH, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [zlib.crc32(word.encode()) % (VOCAB_SIZE - 2) + 1 for word in text.split()]
        ids = ids[: CONTEXT_LENGTH - 1] + [VOCAB_SIZE - 1]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same tiny weights as an OpenCLIP model and as a clipkit model, both in eval mode."""
    folder = tmp_path_factory.mktemp("zero_shot")
    cfg_path = folder / f"{MODEL_NAME}.json"
    cfg_path.write_text(json.dumps(TINY_OPENCLIP_CFG))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    reference = open_clip.create_model(MODEL_NAME).eval()
    weights = folder / "weights.pt"
    torch.save(reference.state_dict(), weights)
    ours = clipkit.create_model(str(cfg_path), pretrained=str(weights)).eval()
    return reference, ours


# --- metadata ---------------------------------------------------------------------------------

def test_classnames_equal_openclips():
    assert len(IMAGENET_CLASSNAMES) == 1000
    assert isinstance(IMAGENET_CLASSNAMES, tuple)
    assert IMAGENET_CLASSNAMES == tuple(oc_meta.IMAGENET_CLASSNAMES)


@pytest.mark.parametrize("ours, theirs, count", [
    (OPENAI_IMAGENET_TEMPLATES, oc_meta.OPENAI_IMAGENET_TEMPLATES, 80),
    (SIMPLE_IMAGENET_TEMPLATES, oc_meta.SIMPLE_IMAGENET_TEMPLATES, 7),
])
def test_templates_give_openclips_string_for_every_class(ours, theirs, count):
    assert len(ours) == len(theirs) == count
    names = IMAGENET_CLASSNAMES + ("{}", "{0} {c} {{x}}", "", "ünïcode")
    for mine, reference in zip(ours, theirs):
        assert callable(mine)
        for name in names:
            assert mine(name) == reference(name)


def test_templates_are_data():
    for template in OPENAI_IMAGENET_TEMPLATES + SIMPLE_IMAGENET_TEMPLATES:
        assert isinstance(template, PromptTemplate)
        assert isinstance(template.pattern, str) and template.pattern.count("{}") == 1
        assert pickle.loads(pickle.dumps(template)) == template
    assert OPENAI_IMAGENET_TEMPLATES[0]("dog") == "a bad photo of a dog."
    assert PromptTemplate("a {}.") == PromptTemplate("a {}.") != PromptTemplate("the {}.")
    assert repr(PromptTemplate("a {}.")) == "PromptTemplate('a {}.')"
    assert set(SIMPLE_IMAGENET_TEMPLATES) <= set(OPENAI_IMAGENET_TEMPLATES)


# --- classifier -------------------------------------------------------------------------------

def test_tokenizer_stand_in_is_deterministic():
    tokens = word_tokenizer(["a photo of a cat.", "a photo of a cat."])
    assert tokens.shape == (2, CONTEXT_LENGTH)
    assert torch.equal(tokens[0], tokens[1])
    assert tokens[0].argmax().item() == 5 and tokens.max().item() == VOCAB_SIZE - 1


@pytest.mark.parametrize("templates", [
    OPENAI_IMAGENET_TEMPLATES[:6],                 # clipkit's callables
    list(oc_meta.OPENAI_IMAGENET_TEMPLATES[-5:]),  # OpenCLIP's lambdas
    FORMAT_TEMPLATES,                              # format strings
], ids=["clipkit-templates", "openclip-lambdas", "format-strings"])
def test_classifier_equals_openclips(models, templates):
    reference, ours = models
    expected = open_clip.build_zero_shot_classifier(reference, word_tokenizer, CLASSNAMES, templates)
    got = build_zero_shot_classifier(ours, word_tokenizer, CLASSNAMES, templates)
    assert got.shape == (EMBED_DIM, len(CLASSNAMES)) == expected.shape
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # same function on the same model: isolates the builder from the model port
    assert_close(build_zero_shot_classifier(reference, word_tokenizer, CLASSNAMES, templates),
                 expected, rtol=1e-5, atol=1e-5)
    assert_close(got.norm(dim=0), torch.ones(len(CLASSNAMES)), rtol=1e-5, atol=1e-5)
    # the prompts differ per class, so the columns must too
    assert not torch.allclose(got[:, 0], got[:, 1])


@pytest.mark.parametrize("num_classes_per_batch", [1, 3, 10, 23, 100, 0])
def test_batching_does_not_change_the_result(models, num_classes_per_batch):
    _, ours = models
    whole = build_zero_shot_classifier(ours, word_tokenizer, CLASSNAMES, FORMAT_TEMPLATES, num_classes_per_batch=None)
    assert whole.shape == (EMBED_DIM, len(CLASSNAMES))
    batched = build_zero_shot_classifier(ours, word_tokenizer, CLASSNAMES, FORMAT_TEMPLATES,
                                         num_classes_per_batch=num_classes_per_batch)
    assert batched.shape == whole.shape
    assert_close(batched, whole, rtol=1e-5, atol=1e-5)


def test_legacy_equals_openclips_and_the_batched_builder(models):
    reference, ours = models
    assert hasattr(open_clip, "build_zero_shot_classifier_legacy")
    templates = SIMPLE_IMAGENET_TEMPLATES
    expected = open_clip.build_zero_shot_classifier_legacy(reference, word_tokenizer, CLASSNAMES, templates)
    got = build_zero_shot_classifier_legacy(ours, word_tokenizer, CLASSNAMES, templates)
    assert got.shape == (EMBED_DIM, len(CLASSNAMES))
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_close(got, build_zero_shot_classifier(ours, word_tokenizer, CLASSNAMES, templates), rtol=1e-5, atol=1e-5)


def test_no_grad_and_mode_untouched(models):
    _, ours = models
    ours.train()
    try:
        out = build_zero_shot_classifier(ours, word_tokenizer, CLASSNAMES[:2], FORMAT_TEMPLATES)
        assert ours.training
    finally:
        ours.eval()
    assert not out.requires_grad


def test_tqdm_only_imported_when_asked(models, monkeypatch):
    _, ours = models
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "tqdm", None)  # any import of tqdm would fail
        build_zero_shot_classifier(ours, word_tokenizer, CLASSNAMES[:3], FORMAT_TEMPLATES)
        build_zero_shot_classifier_legacy(ours, word_tokenizer, CLASSNAMES[:3], FORMAT_TEMPLATES)
    with_bar = build_zero_shot_classifier(ours, word_tokenizer, CLASSNAMES[:3], FORMAT_TEMPLATES,
                                          num_classes_per_batch=2, use_tqdm=True)
    legacy_bar = build_zero_shot_classifier_legacy(ours, word_tokenizer, CLASSNAMES[:3], FORMAT_TEMPLATES,
                                                   use_tqdm=True)
    assert_close(with_bar, legacy_bar, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("builder", [build_zero_shot_classifier, build_zero_shot_classifier_legacy])
def test_bad_inputs_are_rejected(models, builder):
    _, ours = models
    with pytest.raises(ValueError):
        builder(ours, word_tokenizer, CLASSNAMES, [])
    with pytest.raises(ValueError):
        builder(ours, word_tokenizer, [], FORMAT_TEMPLATES)
    with pytest.raises(TypeError):
        builder(ours, word_tokenizer, "cat", FORMAT_TEMPLATES)
