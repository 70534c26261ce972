"""The parts a run trains, each from its own settings: the model (with its tokenizer and locks), the
number formats, the optimizer, and the objective (a registered one: what a step computes)."""
from __future__ import annotations

import contextlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Optional, Set, Tuple

import torch
from torch import nn

from ..errors import TrainingError
from ..freeze import lock_as_asked

if TYPE_CHECKING:
    from ..model import ClipModel
    from ..transforms import ImageTransform

logger = logging.getLogger("clipkit.train")


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def precision_setup(precision: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool, Optional[torch.dtype]]:
    """``(autocast dtype or None, use a GradScaler, input dtype or None)`` for a ``--precision``."""
    if precision == "amp":
        # fp16 autocast needs loss scaling on GPU; the CPU's fast low precision is bf16
        return (torch.float16, True, None) if device.type == "cuda" else (torch.bfloat16, False, None)
    if precision in ("amp_bf16", "amp_bfloat16"):
        return torch.bfloat16, False, None
    if precision in ("bf16", "pure_bf16"):
        return None, False, torch.bfloat16
    if precision in ("fp16", "pure_fp16"):
        return None, False, torch.float16
    return None, False, None


@dataclass(frozen=True)
class Precision:
    """How numbers are computed: ``autocast()`` around forward passes, the ``scaler`` of fp16 loss scaling
    (or ``None``), and the dtype inputs are cast to (``None``: as they come)."""

    autocast: Callable[[], ContextManager[Any]]
    scaler: Optional[Any]
    input_dtype: Optional[torch.dtype]

    @classmethod
    def of(cls, precision: str, device: torch.device) -> "Precision":
        autocast_dtype, scaled, input_dtype = precision_setup(precision, device)
        if device.type == "cpu" and torch.bfloat16 in (autocast_dtype, input_dtype) and not _cpu_has_bf16():
            logger.warning("--precision %s computes in bf16, which this CPU emulates (no avx512_bf16/amx): expect it "
                           "to be many times slower than --precision fp32", precision)
        autocast = ((lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype
                    else contextlib.nullcontext)
        return cls(autocast=autocast, scaler=torch.amp.GradScaler("cuda") if scaled else None, input_dtype=input_dtype)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True  # not Linux: cannot tell, so say nothing
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class BuiltModel:
    """The model as built (bare: no DDP, no compile), its preprocessing and its tokenizer."""

    model: ClipModel
    preprocess_train: ImageTransform
    preprocess_val: ImageTransform
    tokenizer: Callable[..., torch.Tensor]


def build_model(model: Any, cache_dir: Optional[str], precision: str, seed: int, device: torch.device,
                distributed: bool, use_bn_sync: bool, grad_checkpointing: bool) -> BuiltModel:
    """The model the model settings (``model``) describe, with its tokenizer and locks; the same initial
    weights on every process."""
    from ..factory import create_model_and_transforms

    extra: Dict[str, Any] = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if model.siglip else {}
    size = model.force_image_size
    seed_everything(seed)
    built, preprocess_train, preprocess_val = create_model_and_transforms(
        model.model, model.pretrained or None, precision=precision, device=device,
        force_quick_gelu=model.force_quick_gelu, force_custom_text=model.force_custom_text,
        force_patch_dropout=model.force_patch_dropout,
        force_image_size=(size[0] if size and len(size) == 1 else tuple(size) if size else None),
        force_context_length=model.force_context_length, image_mean=model.image_mean, image_std=model.image_std,
        image_interpolation=model.image_interpolation, image_resize_mode=model.image_resize_mode,
        aug_cfg=model.aug_cfg or None, pretrained_image=model.pretrained_image, cache_dir=cache_dir,
        output_dict=True, trust_remote_code=model.trust_remote_code, **extra)
    tokenizer = _tokenizer(model, cache_dir, built)
    lock_as_asked(built, model)
    if grad_checkpointing:
        built.set_grad_checkpointing(True)
    if distributed and use_bn_sync:
        nn.SyncBatchNorm.convert_sync_batchnorm(built)  # swaps the model's BatchNorms in place: it stays the model
    trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    total = sum(p.numel() for p in built.parameters())
    logger.info("model %s: %.2fM parameters, %.2fM trainable", model.model, total / 1e6, trainable / 1e6)
    return BuiltModel(built, preprocess_train, preprocess_val, tokenizer)


def _tokenizer(model: Any, cache_dir: Optional[str], built: ClipModel) -> Callable[..., torch.Tensor]:
    from .._trust import caller_trust
    from ..tokenizer import _check_special_ids, get_tokenizer

    name = model.hf_tokenizer_name
    if not name:
        return get_tokenizer(model.model, cache_dir=cache_dir, trust_remote_code=model.trust_remote_code)
    from ..kinds import TOKENIZER
    from ..registry import registry

    text_cfg = dict(built.model_config.raw.get("text_cfg", {}), hf_tokenizer_name=name)
    kwargs = {"cache_dir": cache_dir} if cache_dir else {}
    with caller_trust(model.trust_remote_code):
        tokenizer: Callable[..., torch.Tensor] = registry.get(TOKENIZER, "hf").load()(text_cfg, built.context_length,
                                                                                      **kwargs)
    _check_special_ids(f"--hf-tokenizer-name {name}", built.model_config, tokenizer)
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and vocab > built.vocab_size:
        raise TrainingError(f"--hf-tokenizer-name {name}: its {vocab} tokens do not fit the text "
                            f"tower's vocab_size {built.vocab_size}")
    return tokenizer


def build_optimizer(optimization: Any, model: nn.Module) -> Tuple[torch.optim.Optimizer, Dict[int, str]]:
    """AdamW with OpenCLIP's weight-decay exclusions: 1-d tensors, and names with bn, ln, bias or
    logit_scale in them; so that OpenCLIP recipes train the same parameters the same way."""
    opt = optimization
    names = {id(p): n for n, p in model.named_parameters()}

    def excluded(name: str, p: nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise TrainingError("every parameter is frozen: nothing to train (check the --lock-* flags)")
    groups = [{"params": [p for n, p in params if excluded(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in params if not excluded(n, p)], "weight_decay": opt.wd}]
    groups = [g for g in groups if g["params"]]
    if opt.opt.startswith("timm/"):
        from timm.optim import create_optimizer_v2

        extra = {"momentum": opt.momentum} if opt.momentum is not None else {}
        try:
            optimizer = create_optimizer_v2(groups, opt.opt[len("timm/"):], lr=opt.lr, weight_decay=opt.wd,
                                            betas=(opt.beta1, opt.beta2), eps=opt.eps, **extra)
        except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
            raise TrainingError(f"--opt {opt.opt}: timm cannot build it: {exc}") from exc
    else:
        trained = [p for _, p in params]
        kernel = adamw_kernel({p.device.type for p in trained}, all(p.is_floating_point() for p in trained),
                              all(type(p) in (torch.Tensor, nn.Parameter) for p in trained))
        flags = {"fused": {"fused": True}, "foreach": {"foreach": True}}.get(kernel, {})
        optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, **flags)
        logger.info("optimizer: AdamW, %s", {"fused": "fused kernels", "foreach": "multi-tensor (foreach) kernels"}
                    .get(kernel, "torch's default implementation (a loop over parameters on CPU)"))
    return optimizer, names


def adamw_kernel(device_types: Set[str], floating: bool, plain: bool) -> str:
    """Which AdamW implementation to ask for: ``fused`` (one kernel per step) for plain floating-point
    parameters on CUDA or XPU, ``foreach`` on other accelerators, else ``default``: torch's choice. The CPU
    keeps the default loop, whose results the CPU runs and their exact comparisons were made with;
    sharded (DTensor) parameters keep torch's own choice, which is made for them."""
    if not plain or not device_types or "cpu" in device_types or "meta" in device_types:
        return "default"
    if floating and device_types <= {"cuda", "xpu"}:
        return "fused"
    return "foreach"


def build_objective(choice: Any, ctx: Any) -> Any:
    """The run's objective (``choice``: a :class:`~clipkit.train.selection.ObjectiveChoice`), built by its
    registered factory from its checked options and ``ctx`` (an
    :class:`~clipkit.train.objectives.ObjectiveContext`). An object lacking part of the objective protocol
    is a :class:`TrainingError` naming the plugin that registered it."""
    entry = choice.entry()
    objective = entry.load()(choice.bound(), ctx)
    missing = [attr for attr in ("needs", "per_process", "extra_forward", "state_dict", "load_state_dict")
               if not hasattr(objective, attr)] + ([] if callable(objective) else ["__call__"])
    if missing:
        raise TrainingError(f"{entry.where}: its factory returned {type(objective).__name__}, which lacks "
                            f"{', '.join(missing)} (the objective protocol: clipkit.train.objectives.Objective)")
    return objective
