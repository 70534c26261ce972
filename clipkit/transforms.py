"""Image preprocessing for training and evaluation, described by a :class:`PreprocessCfg` kept on the model."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Sequence, Tuple, Union

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass
class PreprocessCfg:
    """How images become model input (OpenCLIP's ``PreprocessCfg`` keys and defaults)."""

    size: Union[int, Tuple[int, int]] = 224
    mode: str = "RGB"
    mean: Tuple[float, ...] = OPENAI_DATASET_MEAN
    std: Tuple[float, ...] = OPENAI_DATASET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class AugmentationCfg:
    """Training augmentation (OpenCLIP's ``AugmentationCfg`` keys and defaults)."""

    scale: Tuple[float, float] = (0.9, 1.0)
    ratio: Optional[Tuple[float, float]] = None
    color_jitter: Optional[Union[float, Tuple[float, float, float], Tuple[float, float, float, float]]] = None
    re_prob: Optional[float] = None
    re_count: Optional[int] = None
    use_timm: bool = False
    color_jitter_prob: Optional[float] = None
    gray_scale_prob: Optional[float] = None


PREPROCESS_KEYS = tuple(f.name for f in fields(PreprocessCfg))


def merge_preprocess(base: Dict[str, Any], overrides: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``base`` updated with the non-None preprocessing keys of ``overrides``."""
    out = dict(base)
    for key, value in (overrides or {}).items():
        if key in PREPROCESS_KEYS and value is not None:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
             "nearest": InterpolationMode.NEAREST}
    if name not in modes:
        raise ValueError(f"preprocess interpolation must be one of {', '.join(modes)}, got {name!r}")
    return modes[name]


class ResizeKeepRatio:
    """Resize so the longest side fits ``size`` (keeping aspect), for ``resize_mode='longest'``."""

    def __init__(self, size: Tuple[int, int], interpolation):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, img):
        import torchvision.transforms.functional as TF

        width, height = img.size
        ratio = max(height / self.size[0], width / self.size[1])
        target = [round(height / ratio), round(width / ratio)]
        return TF.resize(img, target, interpolation=self.interpolation)


class CenterCropOrPad:
    """Center crop to ``size``, padding with ``fill`` where the image is smaller."""

    def __init__(self, size: Tuple[int, int], fill: int = 0):
        self.size = size
        self.fill = fill

    def __call__(self, img):
        import torchvision.transforms.functional as TF

        width, height = img.size
        pad_h, pad_w = max(self.size[0] - height, 0), max(self.size[1] - width, 0)
        if pad_h or pad_w:
            img = TF.pad(img, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=self.fill)
        return TF.center_crop(img, list(self.size))


def _to_mode(mode: str):
    def convert(img):
        return img.convert(mode)
    return convert


def image_transform(cfg: Union[PreprocessCfg, Dict[str, Any]], is_train: bool,
                    aug_cfg: Optional[Union[AugmentationCfg, Dict[str, Any]]] = None):
    """A torchvision pipeline from PIL image to normalised tensor, for training or evaluation."""
    from torchvision import transforms as T

    if isinstance(cfg, dict):
        cfg = PreprocessCfg(**{k: v for k, v in cfg.items() if k in PREPROCESS_KEYS})
    size = (cfg.size, cfg.size) if isinstance(cfg.size, int) else tuple(cfg.size)
    interpolation = _interpolation(cfg.interpolation)
    normalize = T.Normalize(mean=cfg.mean, std=cfg.std)
    if is_train:
        aug = aug_cfg if isinstance(aug_cfg, AugmentationCfg) else AugmentationCfg(**(aug_cfg or {}))
        steps = [T.RandomResizedCrop(size, scale=aug.scale, ratio=aug.ratio or (3 / 4, 4 / 3),
                                     interpolation=interpolation), _to_mode(cfg.mode)]
        if aug.color_jitter is not None and (aug.color_jitter_prob or 0) > 0:
            jitter = aug.color_jitter if isinstance(aug.color_jitter, Sequence) else (aug.color_jitter,) * 3
            steps.append(T.RandomApply([T.ColorJitter(*jitter)], p=aug.color_jitter_prob))
        if (aug.gray_scale_prob or 0) > 0:
            steps.append(T.RandomGrayscale(p=aug.gray_scale_prob))
        return T.Compose(steps + [T.ToTensor(), normalize])
    if cfg.resize_mode == "longest":
        steps = [ResizeKeepRatio(size, interpolation), CenterCropOrPad(size, fill=cfg.fill_color)]
    elif cfg.resize_mode == "squash":
        steps = [T.Resize(size, interpolation=interpolation)]
    elif cfg.resize_mode == "shortest":
        steps = [T.Resize(size[0] if size[0] == size[1] else size, interpolation=interpolation), T.CenterCrop(size)]
    else:
        raise ValueError(f"preprocess resize_mode must be shortest, longest or squash, got {cfg.resize_mode!r}")
    return T.Compose(steps + [_to_mode(cfg.mode), T.ToTensor(), normalize])
