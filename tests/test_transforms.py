"""clipkit's preprocessing against OpenCLIP 3.3.0's, tensor for tensor.

Evaluation pipelines are deterministic and must equal OpenCLIP's exactly. Training pipelines are
compared under identical seeds of Python's ``random`` and torch's generator, which together drive
every random draw in both libraries.
"""
import dataclasses
import random
import subprocess
import sys
import warnings

import numpy as np
import open_clip.transform as open_clip_transform  # noqa: E402 (the reference implementation)
import pytest
import torch
from PIL import Image

from clipkit.errors import ClipkitError
from clipkit.transforms import (
    AugmentationCfg,
    PreprocessCfg,
    PreprocessError,
    RandomErasing,
    image_transform_v2,
    merge_preprocess,
)

SEEDS = range(8)


def _noise(width, height, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def _drawing(width, height):
    """Smooth gradients with hard-edged shapes: structure that noise lacks (sklearn's digits would
    do too, but importing sklearn costs seconds)."""
    from PIL import ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    channels = [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 127 * np.sin(x / 3 + y / 5)]
    image = Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 5, height // 4, width * 3 // 4, height * 4 // 5], fill=(250, 20, 60))
    draw.rectangle([width // 2, 0, width * 2 // 3, height // 3], fill=(0, 0, 0))
    return image


# Larger and smaller than every target, square, wide, tall, odd sizes; noise and drawings.
NOISE_SIZES = [(64, 48), (48, 64), (20, 30), (100, 17), (17, 100), (32, 32), (13, 13), (31, 33), (7, 5)]
IMAGES = [_noise(w, h, seed=i) for i, (w, h) in enumerate(NOISE_SIZES)] + [
    _drawing(8, 8), _drawing(56, 40), _drawing(40, 72)]
SIZES = [32, 33, (24, 40), (40, 24), (31, 20)]


def _openclip(is_train, aug_cfg=None, **cfg):
    with warnings.catch_warnings():  # OpenCLIP warns about augmentation keys it ignores
        warnings.simplefilter("ignore")
        return open_clip_transform.image_transform_v2(open_clip_transform.PreprocessCfg(**cfg), is_train,
                                                      aug_cfg=aug_cfg)


def _seeded(transform, image, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)


def _same_under_seeds(a, b, image, seeds=SEEDS):
    return all(torch.equal(_seeded(a, image, s), _seeded(b, image, s)) for s in seeds)


def _differs_under_seeds(a, b, image, seeds=SEEDS):
    return any(not torch.equal(_seeded(a, image, s), _seeded(b, image, s)) for s in seeds)


# --- configs -------------------------------------------------------------------------------------

def test_module_imports_without_torch():
    code = "import sys, clipkit.transforms; assert 'torch' not in sys.modules and 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cfg_keys_and_defaults_match_openclip():
    assert PreprocessCfg().as_dict() == dataclasses.asdict(open_clip_transform.PreprocessCfg())
    assert PreprocessCfg(size=(24, 40)).input_size == open_clip_transform.PreprocessCfg(size=(24, 40)).input_size
    assert dataclasses.asdict(AugmentationCfg()) == dataclasses.asdict(open_clip_transform.AugmentationCfg())


def test_merge_preprocess_matches_openclip():
    base = {**PreprocessCfg().as_dict(), "not_a_key": 1}
    overlay = {"mean": [0.5, 0.5, 0.5], "std": None, "resize_mode": "squash", "other": 2}
    expected = open_clip_transform.merge_preprocess_dict(base, overlay)
    expected["mean"] = tuple(expected["mean"])
    assert merge_preprocess(base, overlay) == expected
    assert merge_preprocess(PreprocessCfg(), None) == PreprocessCfg().as_dict()


def test_cfg_values_are_normalised():
    cfg = PreprocessCfg(size=[24, 40], mean=0.5, std=[0.5, 0.5, 0.5], fill_color=[1, 2, 3])
    assert (cfg.size, cfg.mean, cfg.std, cfg.fill_color) == ((24, 40), (0.5,) * 3, (0.5,) * 3, (1, 2, 3))
    assert AugmentationCfg(scale=[0.5, 1.0], color_jitter=[0.1, 0.2, 0.3]).scale == (0.5, 1.0)


@pytest.mark.parametrize("call, match", [
    (lambda: image_transform_v2({"resize_mode": "crop"}, False), "resize_mode must be one of shortest, longest, squash"),
    (lambda: image_transform_v2({"interpolation": "nearest"}, False), "interpolation must be one of bicubic, bilinear"),
    (lambda: PreprocessCfg(mode="L"), "mode must be one of RGB"),
    (lambda: PreprocessCfg(size=(1, 2, 3)), "size must be a positive int or"),
    (lambda: image_transform_v2({"sise": 32}, False),
     r"preprocess cfg: unknown key 'sise' \(did you mean 'size'\?\); allowed keys: size, mode,"),
    (lambda: image_transform_v2({}, True, {"re_prop": 0.5}), r"aug_cfg: unknown key 're_prop' \(did you mean 're_prob'"),
    (lambda: image_transform_v2({}, False, {"bogus": 1}), "allowed keys: scale, ratio, color_jitter, re_prob, re_count, "
                                                       "use_timm, color_jitter_prob, gray_scale_prob"),
    (lambda: AugmentationCfg(scale=(1.0, 0.5)), "scale must be"),
    (lambda: AugmentationCfg(color_jitter=(0.1, 0.2)), "color_jitter must be"),
    (lambda: AugmentationCfg(gray_scale_prob=1.5), "gray_scale_prob must be a probability"),
    (lambda: AugmentationCfg(re_prob=0.5, re_count=0), "re_count must be an int >= 1"),
    (lambda: AugmentationCfg(color_jitter_prob=0.5), "color_jitter_prob needs color_jitter"),
    (lambda: AugmentationCfg(re_count=2), "re_count needs re_prob"),
    (lambda: AugmentationCfg(use_timm="yes"), "use_timm must be true or false"),
])
def test_invalid_settings_fail_clearly(call, match):
    with pytest.raises(PreprocessError, match=match) as info:
        call()
    assert isinstance(info.value, ClipkitError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


# --- evaluation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "random"])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_eval_equals_openclip(resize_mode, interpolation):
    fills = [0, 200, (255, 0, 10)] if resize_mode == "longest" else [0]
    for size in SIZES:
        for fill in fills:
            cfg = dict(size=size, resize_mode=resize_mode, interpolation=interpolation, fill_color=fill)
            ours, theirs = image_transform_v2(cfg, is_train=False), _openclip(False, **cfg)
            for image in IMAGES:
                expected = theirs(image)
                got = ours(image)
                assert got.shape == expected.shape == (3,) + ((size, size) if isinstance(size, int) else size)
                assert torch.equal(got, expected), (cfg, image.size)


def test_eval_accepts_a_preprocess_cfg_and_imagenet_stats():
    cfg = dict(size=(40, 24), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize_mode="longest")
    image = IMAGES[0]
    assert torch.equal(image_transform_v2(PreprocessCfg(**cfg), False)(image), _openclip(False, **cfg)(image))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_eval_converts_other_image_modes_like_openclip(mode):
    image = _noise(50, 30, mode=mode)
    for resize_mode in ("shortest", "longest", "squash"):
        cfg = dict(size=32, resize_mode=resize_mode)
        assert torch.equal(image_transform_v2(cfg, False)(image), _openclip(False, **cfg)(image))


def test_eval_accepts_tensors_like_openclip():
    image = torch.rand(3, 40, 56)
    for resize_mode in ("shortest", "squash"):  # OpenCLIP's 'longest' does not take tensors
        cfg = dict(size=32, resize_mode=resize_mode)
        assert torch.equal(image_transform_v2(cfg, False)(image), _openclip(False, **cfg)(image))


# --- training, without timm ----------------------------------------------------------------------

JITTER = (0.4, 0.4, 0.4, 0.1)


@pytest.mark.parametrize("aug_cfg", [
    None,
    {"scale": (0.3, 1.0)},
    {"color_jitter": JITTER, "color_jitter_prob": 0.8},
    {"gray_scale_prob": 0.5},
    {"color_jitter": JITTER, "color_jitter_prob": 0.5, "gray_scale_prob": 0.5, "scale": (0.5, 0.9)},
    {"color_jitter": JITTER, "color_jitter_prob": 0.0},
    AugmentationCfg(gray_scale_prob=0.3),
])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_train_equals_openclip_under_seed(aug_cfg, interpolation):
    cfg = dict(size=(24, 32), interpolation=interpolation)
    ours, theirs = image_transform_v2(cfg, True, aug_cfg), _openclip(True, aug_cfg, **cfg)
    for image in (IMAGES[0], IMAGES[2]):
        assert _same_under_seeds(ours, theirs, image)


def test_train_crop_ratio_is_applied():
    # OpenCLIP ignores `ratio` without use_timm (with a warning); clipkit passes it to the crop.
    cfg = dict(size=32)
    image = IMAGES[0]
    default = image_transform_v2(cfg, True, {"ratio": (3 / 4, 4 / 3)})
    assert _same_under_seeds(default, _openclip(True, None, **cfg), image)

    from torchvision import transforms as T
    wide = image_transform_v2(cfg, True, {"ratio": (2.5, 3.0)})
    reference = T.Compose([T.RandomResizedCrop(32, scale=(0.9, 1.0), ratio=(2.5, 3.0),
                                               interpolation=T.InterpolationMode.BICUBIC),
                           T.ToTensor(), T.Normalize(PreprocessCfg().mean, PreprocessCfg().std)])
    assert _same_under_seeds(wide, reference, image)
    assert _differs_under_seeds(wide, default, image)


def test_train_color_jitter_without_probability_is_always_applied():
    # OpenCLIP ignores color_jitter without color_jitter_prob; clipkit applies it every time (as timm does),
    # which is OpenCLIP's jitter at probability 1. A scalar strength means no hue jitter (timm's reading).
    cfg = dict(size=32)
    for ours, theirs in [(JITTER, JITTER), (0.4, (0.4, 0.4, 0.4, 0.0)), ((0.2, 0.3, 0.1), (0.2, 0.3, 0.1, 0.0))]:
        assert _same_under_seeds(image_transform_v2(cfg, True, {"color_jitter": ours}),
                                 _openclip(True, {"color_jitter": theirs, "color_jitter_prob": 1.0}, **cfg),
                                 IMAGES[0])


@pytest.mark.parametrize("count", [1, 3])
def test_train_random_erasing_is_timms_pixel_mode(count):
    # OpenCLIP ignores re_prob/re_count without use_timm; clipkit erases after normalising, drawing
    # exactly as timm's RandomErasing(mode='pixel') does under use_timm.
    from timm.data.random_erasing import RandomErasing as TimmRandomErasing
    from torchvision import transforms as T

    cfg = dict(size=32)
    ours = image_transform_v2(cfg, True, {"re_prob": 0.7, "re_count": count})
    theirs = T.Compose([_openclip(True, None, **cfg),
                        TimmRandomErasing(0.7, mode="pixel", max_count=count, device="cpu")])
    assert _same_under_seeds(ours, theirs, IMAGES[0], seeds=range(30))
    assert _differs_under_seeds(ours, image_transform_v2(cfg, True), IMAGES[0])


def test_random_erasing_on_tensors_equals_timm():
    from timm.data.random_erasing import RandomErasing as TimmRandomErasing

    base = torch.randn(3, 20, 28)
    for p, count in [(1.0, 1), (0.5, 4), (1.0, 6)]:
        ours, theirs = RandomErasing(p, max_count=count), TimmRandomErasing(p, mode="pixel", max_count=count,
                                                                             device="cpu")
        for seed in range(20):
            random.seed(seed)
            torch.manual_seed(seed)
            expected = theirs(base.clone())
            random.seed(seed)
            torch.manual_seed(seed)
            assert torch.equal(ours(base.clone()), expected)


# --- training, with timm -------------------------------------------------------------------------

@pytest.mark.parametrize("aug_cfg", [
    {"use_timm": True},
    {"use_timm": True, "scale": (0.5, 1.0), "ratio": (0.5, 2.0), "color_jitter": 0.3, "re_prob": 0.7, "re_count": 3},
    {"use_timm": True, "color_jitter": JITTER, "re_prob": 0.4},
])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "random"])
def test_timm_train_equals_openclip_under_seed(aug_cfg, interpolation):
    cfg = dict(size=(24, 32), interpolation=interpolation)
    assert _same_under_seeds(image_transform_v2(cfg, True, aug_cfg), _openclip(True, aug_cfg, **cfg), IMAGES[0])


def test_timm_train_applies_jitter_and_grayscale_probabilities():
    # OpenCLIP drops color_jitter_prob and gray_scale_prob under use_timm; clipkit hands them to timm.
    from timm.data import create_transform

    aug = {"use_timm": True, "color_jitter": JITTER, "color_jitter_prob": 0.5, "gray_scale_prob": 0.5}
    ours = image_transform_v2({"size": 32}, True, aug)
    reference = create_transform((3, 32, 32), is_training=True, hflip=0.0, mean=PreprocessCfg().mean,
                                 std=PreprocessCfg().std, re_mode="pixel", interpolation="bicubic",
                                 scale=(0.9, 1.0), color_jitter=JITTER, color_jitter_prob=0.5, grayscale_prob=0.5)
    assert _same_under_seeds(ours, reference, IMAGES[0])
    assert _differs_under_seeds(ours, _openclip(True, aug, size=32), IMAGES[0])


def test_timm_train_converts_grayscale_input():
    # timm does not convert image modes, so OpenCLIP's use_timm path fails on 'L' images; clipkit converts.
    gray = _noise(50, 40, mode="L")
    ours = image_transform_v2({"size": 32}, True, {"use_timm": True})
    theirs = _openclip(True, {"use_timm": True}, size=32)
    assert _same_under_seeds(ours, theirs, gray.convert("RGB")) and _same_under_seeds(ours, ours, gray)
    assert _seeded(ours, gray, 0).shape == (3, 32, 32)


# --- every augmentation key has an effect ---------------------------------------------------------

@pytest.mark.parametrize("use_timm", [False, True])
@pytest.mark.parametrize("base, changed", [
    ({}, {"scale": (0.2, 0.5)}),
    ({}, {"ratio": (2.0, 3.0)}),
    ({}, {"color_jitter": 0.5}),
    ({"color_jitter": 0.5}, {"color_jitter_prob": 0.5}),
    ({}, {"gray_scale_prob": 0.5}),
    ({}, {"re_prob": 0.5}),
    ({"re_prob": 1.0}, {"re_count": 4}),
    ({}, {"use_timm": "flip"}),
])
def test_every_augmentation_key_changes_the_output(use_timm, base, changed):
    if changed == {"use_timm": "flip"}:
        changed = {"use_timm": not use_timm}
    base = {"use_timm": use_timm, **base}
    before = image_transform_v2({"size": 32}, True, base)
    after = image_transform_v2({"size": 32}, True, {**base, **changed})
    image = IMAGES[0]
    assert _differs_under_seeds(before, after, image)
    for seed in SEEDS:
        out = _seeded(after, image, seed)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_v1_signature_matches_openclip_image_transform():
    import open_clip
    from PIL import Image

    from clipkit.transforms import image_transform

    image = Image.new("RGB", (50, 30), (10, 200, 30))
    ours = image_transform(40, is_train=False, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), resize_mode="longest",
                           fill_color=7)
    theirs = open_clip.image_transform(40, is_train=False, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2),
                                       resize_mode="longest", fill_color=7)
    assert torch.equal(ours(image), theirs(image))
