"""Evaluation during training: retrieval on ``--val-data``, zero-shot classification on class-labelled data.

Keys are OpenCLIP's (``image_to_text_R@1``, ``clip_val_loss``, ``imagenet-zeroshot-val-top1``, ...);
clipkit's own ``--zeroshot-data`` reports ``zeroshot-top1``/``zeroshot-top5``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F

from .data import DataError, FolderSource, _source, eval_loader, read_list
from .loss import clip_metrics

logger = logging.getLogger("clipkit.train")


def _due(frequency: int, completed: int, final: bool) -> bool:
    return bool(frequency) and (completed % frequency == 0 or final)


def retrieval(run, spec: str) -> Dict[str, Any]:
    """OpenCLIP's ``get_clip_metrics`` plus the sample-weighted ``clip_val_loss``."""
    args, model = run.args, run.module
    loader = eval_loader(spec, "auto", args, run.preprocess_val, run.tokenizer, num_samples=args.val_num_samples)
    images: List[torch.Tensor] = []
    texts: List[torch.Tensor] = []
    total_loss, count = 0.0, 0
    with torch.no_grad():
        for item in loader.epoch(0):
            with run.autocast():
                out = model(item["images"].to(run.env.device, dtype=run.input_dtype or torch.float32),
                            item["texts"].to(run.env.device))
            image, text = out["image_features"].float(), out["text_features"].float()
            scale = out["logit_scale"].float().mean()
            logits = scale * image @ text.T
            if out.get("logit_bias") is not None:
                logits = logits + out["logit_bias"].float()
            labels = torch.arange(len(image), device=image.device)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            total_loss += loss.item() * len(image)
            count += len(image)
            images.append(image.cpu())
            texts.append(text.cpu())
            if args.val_num_samples and count >= args.val_num_samples:
                break
    if not count:
        logger.warning("--val-data %s: no usable samples", spec)
        return {}
    metrics = clip_metrics(torch.cat(images), torch.cat(texts), scale.item())
    metrics.update(clip_val_loss=total_loss / count, num_samples=count)
    skipped = loader.progress.skipped()
    if skipped:
        logger.warning("--val-data: skipped %s", ", ".join(f"{k} {v}" for k, v in skipped.items()))
    return metrics


def zero_shot(run, spec: str, classnames: Sequence[str], templates: Sequence[str], prefix: str,
              flag: str) -> Dict[str, Any]:
    """Top-1/top-5 accuracy of the text-derived classifier over labelled images (from ``flag``)."""
    from ..zero_shot import build_zero_shot_classifier

    args, model = run.args, run.module
    templates = [t.replace("{c}", "{}") if isinstance(t, str) else t for t in templates]
    with torch.no_grad(), run.autocast():
        classifier = build_zero_shot_classifier(model, run.tokenizer, list(classnames), templates,
                                                num_classes_per_batch=10, device=run.env.device).float()
    loader = eval_loader(spec, "auto", args, run.preprocess_val, None, label=True)
    top1 = top5 = n = 0
    with torch.no_grad():
        for item in loader.epoch(0):
            labels = item["labels"].to(run.env.device)
            outside = (labels < 0) | (labels >= len(classnames))
            if outside.any():
                i = int(outside.nonzero()[0])
                raise DataError(f"{flag} {spec}: sample {item['keys'][i]} has label {labels[i].item()}, but there "
                                f"are {len(classnames)} classes (labels 0 to {len(classnames) - 1})")
            with run.autocast():
                image = model.encode_image(item["images"].to(run.env.device, dtype=run.input_dtype or torch.float32),
                                           normalize=True)
            logits = 100.0 * image.float() @ classifier
            k = min(5, len(classnames))
            best = logits.topk(k, dim=1).indices
            hits = best == labels.view(-1, 1)
            top1 += hits[:, 0].sum().item()
            top5 += hits.any(dim=1).sum().item()
            n += len(labels)
    if not n:
        logger.warning("%s: no usable labelled samples", spec)
        return {}
    return {f"{prefix}top1": top1 / n, f"{prefix}top5": top5 / n}


def _class_names(args) -> List[str]:
    if args.zeroshot_classnames:
        return read_list(args.zeroshot_classnames, "class names")
    return [c.replace("_", " ") for c in FolderSource(args.zeroshot_data).classes]


def _templates(args) -> List[str]:
    return read_list(args.zeroshot_templates, "templates") if args.zeroshot_templates else ["a photo of a {}."]


def check_evaluation(args) -> None:
    """Fail now, with the flag and the file, on what evaluation would only find after an epoch of
    training: data that is not there, class names or templates that do not read, more class folders
    than class names."""
    from ..zero_shot_metadata import IMAGENET_CLASSNAMES

    def source(flag: str, spec: str, label: bool):
        try:
            return _source(spec, "auto", args, label=label)
        except DataError as exc:
            raise DataError(f"{flag}: {exc}") from exc

    def classes_fit(flag: str, found, names: Sequence[str], named_by: str) -> None:
        if isinstance(found, FolderSource) and len(found.classes) > len(names):
            raise DataError(f"{flag} {found.root}: {len(found.classes)} class folders, but {named_by} has "
                            f"{len(names)} class names")

    if args.val_data:
        source("--val-data", args.val_data, False)
    if args.zeroshot_data:
        found = source("--zeroshot-data", args.zeroshot_data, True)
        try:
            names = _class_names(args)
        except DataError as exc:
            raise DataError(f"--zeroshot-classnames: {exc}") from exc
        try:
            _templates(args)
        except DataError as exc:
            raise DataError(f"--zeroshot-templates: {exc}") from exc
        if args.zeroshot_classnames:
            classes_fit("--zeroshot-data", found, names, f"--zeroshot-classnames {args.zeroshot_classnames}")
    for flag, spec in (("--imagenet-val", args.imagenet_val), ("--imagenet-v2", args.imagenet_v2)):
        if spec:
            classes_fit(flag, source(flag, spec, True), IMAGENET_CLASSNAMES, "ImageNet")


def evaluate(run, completed: int, final: bool) -> Dict[str, Any]:
    """Every evaluation the flags ask for that is due after ``completed`` epochs."""
    args = run.args
    was_training = run.module.training
    run.module.eval()
    metrics: Dict[str, Any] = {}
    try:
        if args.val_data and _due(args.val_frequency, completed, final):
            metrics.update(retrieval(run, args.val_data))
        if _due(args.zeroshot_frequency, completed, final):
            if args.zeroshot_data:
                metrics.update(zero_shot(run, args.zeroshot_data, _class_names(args), _templates(args), "zeroshot-",
                                         "--zeroshot-data"))
            if args.imagenet_val or args.imagenet_v2:
                from ..zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

                for spec, prefix, flag in ((args.imagenet_val, "imagenet-zeroshot-val-", "--imagenet-val"),
                                           (args.imagenet_v2, "imagenetv2-zeroshot-val-", "--imagenet-v2")):
                    if spec:
                        metrics.update(zero_shot(run, spec, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, prefix,
                                                 flag))
    finally:
        run.module.train(was_training)
    return metrics
