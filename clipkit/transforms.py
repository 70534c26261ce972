"""Image preprocessing for training and evaluation, described by a :class:`PreprocessCfg` kept on the model.

The pipelines reproduce OpenCLIP 3.3.0's ``image_transform_v2`` step for step, so that a model evaluated
here sees exactly the tensors it would see under OpenCLIP, and a training recipe seeded the same way
draws the same crops. Where OpenCLIP accepts an augmentation key and silently drops it, clipkit applies
it instead (see :func:`image_transform`); with those keys left at their defaults both libraries agree.

torch, torchvision and timm are imported inside the functions that need them, so that reading configs
(``clipkit models``, ``clipkit config check``) never pays for them.
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

from .errors import PreprocessError, suggest

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import InterpolationMode

# A preprocessing pipeline: a PIL image (or array, or tensor) in, the model's input tensor out.
ImageTransform = Callable[[Any], "torch.Tensor"]

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

RESIZE_MODES = ("shortest", "longest", "squash")
# "random" picks a random filter per image, which only timm's training crop implements; everywhere
# else it means bicubic, as in OpenCLIP.
INTERPOLATIONS = ("bicubic", "bilinear", "random")
IMAGE_MODES = ("RGB",)
# torchvision's and timm's default aspect-ratio range for random resized crops.
DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)


def _unknown_keys_error(what: str, unknown: Sequence[str], allowed: Sequence[str]) -> PreprocessError:
    hints = [repr(key) + suggest(key, allowed) for key in unknown]
    return PreprocessError(f"{what}: unknown key {', '.join(hints)}; allowed keys: {', '.join(allowed)}")


def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise PreprocessError(f"preprocess {key} must be one of {', '.join(allowed)}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _channel_stats(key: str, value: Any, default: Tuple[float, ...]) -> Tuple[float, ...]:
    # OpenCLIP falls back to the default for an empty value and repeats a scalar over the channels.
    if value is None:
        return default
    if _is_number(value):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) in (1, 3) and all(_is_number(v) for v in value):
        return tuple(float(v) for v in value)
    raise PreprocessError(f"preprocess {key} must be a number or 1 or 3 numbers, got {value!r}")


@dataclass
class PreprocessCfg:
    """How images become model input (OpenCLIP's ``PreprocessCfg`` keys and defaults).

    Values are checked on construction: ``resize_mode`` is one of :data:`RESIZE_MODES`,
    ``interpolation`` one of :data:`INTERPOLATIONS`, ``mode`` is ``"RGB"``; lists become tuples and
    a scalar ``mean``/``std`` is repeated over the three channels.
    """

    size: Union[int, Tuple[int, int]] = 224
    mode: str = "RGB"
    mean: Tuple[float, ...] = OPENAI_DATASET_MEAN
    std: Tuple[float, ...] = OPENAI_DATASET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: Union[int, Tuple[int, ...]] = 0

    def __post_init__(self) -> None:
        size = tuple(self.size) if isinstance(self.size, list) else self.size
        if not (_is_positive_int(size)
                or (isinstance(size, tuple) and len(size) == 2 and all(map(_is_positive_int, size)))):
            raise PreprocessError(f"preprocess size must be a positive int or (height, width), got {self.size!r}")
        self.size = size
        _check_choice("mode", self.mode, IMAGE_MODES)
        _check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        _check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        self.mean = _channel_stats("mean", self.mean, OPENAI_DATASET_MEAN)
        self.std = _channel_stats("std", self.std, OPENAI_DATASET_STD)
        if isinstance(self.fill_color, list):
            self.fill_color = tuple(self.fill_color)

    @property
    def num_channels(self) -> int:
        """Channels of the model input (always 3: images are converted to RGB)."""
        return 3

    @property
    def input_size(self) -> Tuple[int, int, int]:
        """``(channels, height, width)`` of one preprocessed image."""
        return (self.num_channels,) + _pair(self.size)

    def as_dict(self) -> Dict[str, Any]:
        """The settings as a plain dict (what models carry as ``preprocess_cfg``)."""
        return asdict(self)


PREPROCESS_KEYS = tuple(f.name for f in fields(PreprocessCfg))


@dataclass
class AugmentationCfg:
    """Training augmentation (OpenCLIP's ``AugmentationCfg`` keys and defaults).

    ``scale``/``ratio`` bound the random resized crop; ``color_jitter`` is a strength (brightness,
    contrast and saturation) or a 3-/4-tuple (…, hue), applied with probability ``color_jitter_prob``
    (always when that is None); ``gray_scale_prob`` converts to grayscale; ``re_prob`` erases up to
    ``re_count`` random boxes with noise; ``use_timm`` builds the pipeline with timm's
    ``create_transform`` instead. A key that could have no effect is refused on construction
    (``color_jitter_prob`` without ``color_jitter``, ``re_count`` without ``re_prob``).
    """

    scale: Tuple[float, float] = (0.9, 1.0)
    ratio: Optional[Tuple[float, float]] = None
    color_jitter: Optional[Union[float, Tuple[float, float, float], Tuple[float, float, float, float]]] = None
    re_prob: Optional[float] = None
    re_count: Optional[int] = None
    use_timm: bool = False
    color_jitter_prob: Optional[float] = None
    gray_scale_prob: Optional[float] = None

    def __post_init__(self) -> None:
        # Configs arrive from JSON and the CLI, where tuples are lists.
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        for key in ("scale", "ratio"):
            value = getattr(self, key)
            if value is None and key == "ratio":
                continue
            if not (isinstance(value, tuple) and len(value) == 2 and all(_is_number(v) and v > 0 for v in value)
                    and value[0] <= value[1]):
                raise PreprocessError(f"aug_cfg {key} must be (low, high) with 0 < low <= high, got {value!r}")
        jitter = self.color_jitter
        if jitter is not None and not (
                (isinstance(jitter, (int, float)) and _is_number(jitter) and jitter >= 0)
                or (isinstance(jitter, tuple) and len(jitter) in (3, 4) and all(map(_is_number, jitter)))):
            raise PreprocessError(f"aug_cfg color_jitter must be a number >= 0 or a 3- or 4-tuple "
                                  f"(brightness, contrast, saturation[, hue]), got {jitter!r}")
        for key in ("re_prob", "color_jitter_prob", "gray_scale_prob"):
            value = getattr(self, key)
            if value is not None and not (_is_number(value) and 0 <= value <= 1):
                raise PreprocessError(f"aug_cfg {key} must be a probability in [0, 1], got {value!r}")
        if self.re_count is not None and not _is_positive_int(self.re_count):
            raise PreprocessError(f"aug_cfg re_count must be an int >= 1, got {self.re_count!r}")
        if not isinstance(self.use_timm, bool):
            raise PreprocessError(f"aug_cfg use_timm must be true or false, got {self.use_timm!r}")
        if self.color_jitter_prob is not None and self.color_jitter is None:
            raise PreprocessError("aug_cfg color_jitter_prob needs color_jitter (the jitter strengths) to be set")
        if self.re_count is not None and self.re_prob is None:
            raise PreprocessError("aug_cfg re_count needs re_prob (the random erasing probability) to be set")


AUGMENTATION_KEYS = tuple(f.name for f in fields(AugmentationCfg))


def merge_preprocess(base: Union[PreprocessCfg, Dict[str, Any]], overrides: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``base`` updated with the non-None preprocessing keys of ``overrides`` (OpenCLIP's ``merge_preprocess_dict``).

    Keys that are not preprocessing keys are dropped from both, as OpenCLIP does: overrides often come
    from a larger dict (a hub ``open_clip_config.json``, a set of ``image_*`` arguments). Lists become tuples.
    """
    def clean(items: Iterable[Tuple[str, Any]]) -> Dict[str, Any]:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in items if k in PREPROCESS_KEYS}

    out = clean((base.as_dict() if isinstance(base, PreprocessCfg) else base).items())
    out.update(clean((k, v) for k, v in (overrides or {}).items() if v is not None))
    return out


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _interpolation_mode(name: str) -> InterpolationMode:
    from torchvision.transforms import InterpolationMode

    _check_choice("interpolation", name, INTERPOLATIONS)
    mode: InterpolationMode = InterpolationMode.BILINEAR if name == "bilinear" else InterpolationMode.BICUBIC
    return mode


class ResizeKeepRatio:
    """Resize keeping the aspect ratio so one side meets the target ``(height, width)``.

    ``longest=1`` fits the side that overshoots most (the whole image fits inside the target, as
    ``resize_mode='longest'`` needs); ``longest=0`` fits the other side (the image covers the target).
    """

    def __init__(self, size: Tuple[int, int], longest: float = 0.0, interpolation: str = "bicubic") -> None:
        self.size = _pair(size)
        self.longest = float(longest)
        self.interpolation = _interpolation_mode(interpolation)

    def target_size(self, height: int, width: int) -> Tuple[int, int]:
        """The ``(height, width)`` an image of this size is resized to."""
        ratios = (height / self.size[0], width / self.size[1])
        # A blend of the two per-side ratios; written so that longest in {0, 1} gives one of them exactly.
        ratio = max(ratios) * self.longest + min(ratios) * (1.0 - self.longest)
        return round(height / ratio), round(width / ratio)

    def __call__(self, img: Any) -> Any:
        import torchvision.transforms.functional as TF

        _, height, width = TF.get_dimensions(img)
        return TF.resize(img, list(self.target_size(height, width)), interpolation=self.interpolation)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, longest={self.longest}, "
                f"interpolation={self.interpolation.value})")


class CenterCropOrPad:
    """Center crop to ``(height, width)``, first padding evenly with ``fill`` the sides that are too short."""

    def __init__(self, size: Tuple[int, int], fill: Union[int, Tuple[int, ...]] = 0) -> None:
        self.size = _pair(size)
        self.fill = fill

    def __call__(self, img: Any) -> Any:
        import torchvision.transforms.functional as TF

        _, height, width = TF.get_dimensions(img)
        crop_h, crop_w = self.size
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        if pad_h or pad_w:
            # Odd padding puts the extra pixel on the right/bottom.
            img = TF.pad(img, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=self.fill)
            height, width = height + pad_h, width + pad_w
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
        return TF.crop(img, top, left, crop_h, crop_w)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill})"


class ConvertMode:
    """Convert a PIL image to ``mode``; tensors and arrays pass through unchanged."""

    def __init__(self, mode: str = "RGB") -> None:
        self.mode = mode

    def __call__(self, img: Any) -> Any:
        from PIL import Image

        return img.convert(self.mode) if isinstance(img, Image.Image) else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


class ToTensor:
    """PIL image or array to a float tensor in [0, 1]; a tensor passes through unchanged."""

    def __call__(self, img: Any) -> torch.Tensor:
        import torch
        import torchvision.transforms.functional as TF

        tensor: torch.Tensor = img if isinstance(img, torch.Tensor) else TF.to_tensor(img)
        return tensor

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RandomApply:
    """Apply ``transform`` with probability ``p``.

    The draw comes from Python's ``random`` (torchvision's ``RandomApply`` uses torch's generator), as
    in OpenCLIP's color jitter and grayscale steps, so seeded runs match OpenCLIP's.
    """

    def __init__(self, transform: Callable[[Any], Any], p: float) -> None:
        self.transform = transform
        self.p = p

    def __call__(self, img: Any) -> Any:
        return self.transform(img) if random.random() < self.p else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r}, p={self.p})"


class RandomErasing:
    """With probability ``p``, replace 1 to ``max_count`` random boxes of a normalised ``[C, H, W]`` tensor with noise.

    Numerically the same as timm's ``RandomErasing(p, mode='pixel', max_count=...)``, which OpenCLIP
    uses under ``use_timm``: a box covers 2 % to 1/3 of the image (divided by the number of boxes)
    with aspect ratio in [0.3, 1/0.3], each box gets up to 10 tries to fit, and erased pixels are
    standard normal noise (the normalised image's own scale). The tensor is modified in place.
    """

    min_area, max_area = 0.02, 1 / 3
    log_aspect = (math.log(0.3), math.log(1 / 0.3))

    def __init__(self, p: float, max_count: int = 1) -> None:
        self.p = p
        self.max_count = max_count

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        import torch

        if random.random() > self.p:
            return img
        channels, height, width = img.shape
        count = 1 if self.max_count == 1 else random.randint(1, self.max_count)
        for _ in range(count):
            for _attempt in range(10):
                box_area = random.uniform(self.min_area, self.max_area) * (height * width) / count
                aspect = math.exp(random.uniform(*self.log_aspect))
                box_h = int(round(math.sqrt(box_area * aspect)))
                box_w = int(round(math.sqrt(box_area / aspect)))
                if box_h < height and box_w < width:
                    top = random.randint(0, height - box_h)
                    left = random.randint(0, width - box_w)
                    noise = torch.empty((channels, box_h, box_w), dtype=img.dtype, device=img.device).normal_()
                    img[:, top:top + box_h, left:left + box_w] = noise
                    break
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, max_count={self.max_count})"


def _as_preprocess_cfg(cfg: Union[PreprocessCfg, Dict[str, Any]]) -> PreprocessCfg:
    if isinstance(cfg, PreprocessCfg):
        return cfg
    unknown = [k for k in cfg if k not in PREPROCESS_KEYS]
    if unknown:
        raise _unknown_keys_error("preprocess cfg", unknown, PREPROCESS_KEYS)
    return PreprocessCfg(**cfg)


def _as_augmentation_cfg(aug_cfg: Optional[Union[AugmentationCfg, Dict[str, Any]]]) -> AugmentationCfg:
    if isinstance(aug_cfg, AugmentationCfg):
        return aug_cfg
    aug_cfg = dict(aug_cfg or {})
    unknown = [k for k in aug_cfg if k not in AUGMENTATION_KEYS]
    if unknown:
        raise _unknown_keys_error("aug_cfg", unknown, AUGMENTATION_KEYS)
    return AugmentationCfg(**aug_cfg)


def _eval_transform(cfg: PreprocessCfg) -> ImageTransform:
    from torchvision import transforms as T

    size = _pair(cfg.size)
    interpolation = _interpolation_mode(cfg.interpolation)
    if cfg.resize_mode == "longest":
        steps = [ResizeKeepRatio(size, longest=1, interpolation=cfg.interpolation),
                 CenterCropOrPad(size, fill=cfg.fill_color)]
    elif cfg.resize_mode == "squash":
        steps = [T.Resize(size, interpolation=interpolation)]
    elif size[0] == size[1]:
        # An int size makes torchvision scale the shorter side and derive the other by truncation;
        # kept (rather than ResizeKeepRatio, which rounds) because that is what OpenCLIP does.
        steps = [T.Resize(size[0], interpolation=interpolation), T.CenterCrop(size)]
    else:
        # OpenCLIP 3.3.0 resizes non-square 'shortest' targets with bicubic whatever `interpolation`
        # says; followed here so that evaluation tensors stay identical to OpenCLIP's.
        steps = [ResizeKeepRatio(size, longest=0, interpolation="bicubic"), T.CenterCrop(size)]
    pipeline: ImageTransform = T.Compose([*steps, ConvertMode(cfg.mode), ToTensor(),
                                          T.Normalize(mean=cfg.mean, std=cfg.std)])
    return pipeline


def _timm_train_transform(cfg: PreprocessCfg, aug: AugmentationCfg) -> ImageTransform:
    from timm.data import create_transform  # timm is an optional dependency
    from torchvision import transforms as T

    # The arguments OpenCLIP passes: no flip, per-pixel noise for random erasing, color jitter off
    # unless asked for (timm would default to 0.4).
    options: Dict[str, Any] = {"scale": aug.scale, "color_jitter": aug.color_jitter}
    if aug.ratio is not None:
        options["ratio"] = aug.ratio
    if aug.re_prob is not None:
        options["re_prob"] = aug.re_prob
    if aug.re_count is not None:
        options["re_count"] = aug.re_count
    # OpenCLIP drops these two under use_timm; timm implements both, so clipkit hands them over.
    if aug.color_jitter_prob is not None:
        options["color_jitter_prob"] = aug.color_jitter_prob
    if aug.gray_scale_prob is not None:
        options["grayscale_prob"] = aug.gray_scale_prob
    timm_transform = create_transform(
        input_size=(3,) + _pair(cfg.size), is_training=True, hflip=0.0, mean=cfg.mean, std=cfg.std,
        re_mode="pixel", interpolation=cfg.interpolation, **options)
    # timm never converts the image mode, so grayscale or RGBA input would fail at Normalize; converting
    # first leaves RGB input untouched.
    pipeline: ImageTransform = T.Compose([ConvertMode(cfg.mode)] + list(timm_transform.transforms))
    return pipeline


def _train_transform(cfg: PreprocessCfg, aug: AugmentationCfg) -> ImageTransform:
    from torchvision import transforms as T

    if aug.use_timm:
        return _timm_train_transform(cfg, aug)
    # OpenCLIP crops with bicubic here whatever `interpolation` says; followed so seeded runs match.
    steps: list[Callable[[Any], Any]] = [
        T.RandomResizedCrop(_pair(cfg.size), scale=aug.scale, ratio=aug.ratio or DEFAULT_CROP_RATIO,
                            interpolation=_interpolation_mode("bicubic")),
        ConvertMode(cfg.mode)]
    if aug.color_jitter is not None and aug.color_jitter_prob != 0:
        strengths = aug.color_jitter if isinstance(aug.color_jitter, tuple) else (aug.color_jitter,) * 3
        jitter = T.ColorJitter(*strengths)
        steps.append(jitter if aug.color_jitter_prob is None else RandomApply(jitter, aug.color_jitter_prob))
    if aug.gray_scale_prob:
        steps.append(RandomApply(T.Grayscale(num_output_channels=3), aug.gray_scale_prob))
    steps += [ToTensor(), T.Normalize(mean=cfg.mean, std=cfg.std)]
    if aug.re_prob:
        steps.append(RandomErasing(aug.re_prob, max_count=aug.re_count or 1))
    pipeline: ImageTransform = T.Compose(steps)
    return pipeline


def image_transform_v2(cfg: Union[PreprocessCfg, Dict[str, Any]], is_train: bool,
                       aug_cfg: Optional[Union[AugmentationCfg, Dict[str, Any]]] = None) -> ImageTransform:
    """A torchvision pipeline from PIL image to normalised ``[3, H, W]`` tensor (OpenCLIP's ``image_transform_v2``).

    ``cfg`` is a :class:`PreprocessCfg` or a dict of its keys; ``aug_cfg`` an :class:`AugmentationCfg`
    or a dict of its keys, used for training only (it is still validated for evaluation). Unknown keys
    and invalid values raise :class:`PreprocessError` (a ``ClipkitError`` and ``ValueError``).

    Evaluation resizes by ``resize_mode``: ``shortest`` covers the target and center-crops,
    ``longest`` fits inside it and pads with ``fill_color``, ``squash`` resizes to it ignoring aspect.
    Its output equals OpenCLIP 3.3.0's.

    Training takes a bicubic random resized crop, then optional color jitter, grayscale and random
    erasing; with ``use_timm`` the pipeline is timm's ``create_transform``. Seeded identically (Python's
    ``random`` and torch's generator), it equals OpenCLIP's wherever OpenCLIP uses the keys. OpenCLIP
    ignores some keys with a warning; clipkit applies them: ``ratio``, ``re_prob``/``re_count`` and
    ``color_jitter`` without ``color_jitter_prob`` (then always applied) without ``use_timm``, and
    ``color_jitter_prob``/``gray_scale_prob`` with it.
    """
    cfg = _as_preprocess_cfg(cfg)
    aug = _as_augmentation_cfg(aug_cfg)
    return _train_transform(cfg, aug) if is_train else _eval_transform(cfg)


def image_transform(image_size: Union[int, Tuple[int, int]], is_train: bool, mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None, resize_mode: Optional[str] = None,
                    interpolation: Optional[str] = None, fill_color: int = 0,
                    aug_cfg: Optional[Union[AugmentationCfg, Dict[str, Any]]] = None) -> ImageTransform:
    """OpenCLIP's ``image_transform`` signature: the preprocessing keys as arguments (None = default)."""
    keys = {"size": image_size, "mean": mean, "std": std, "resize_mode": resize_mode,
            "interpolation": interpolation, "fill_color": fill_color}
    return image_transform_v2({k: v for k, v in keys.items() if v is not None}, is_train, aug_cfg)
