"""Evaluation during training: retrieval on ``--val-data``, zero-shot classification on class-labelled data.

Keys are OpenCLIP's (``image_to_text_R@1``, ``clip_val_loss``, ``imagenet-zeroshot-val-top1``, ...);
clipkit's own ``--zeroshot-data`` reports ``zeroshot-top1``/``zeroshot-top5``. An :class:`Evaluator` gets
the settings it reads and, for each evaluation, an :class:`EvalContext`: the model and what feeds it.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ArgsError, DataError
from .data import data_source, eval_loader, eval_type, read_list
from .loss import clip_metrics

if TYPE_CHECKING:
    from ..zero_shot import Template
    from .data_sources import DataSource

logger = logging.getLogger("clipkit.train")


@dataclass(frozen=True)
class EvalContext:
    """What evaluation runs on: the bare model (never its DDP or compiled wrapper), the validation
    preprocess and tokenizer, the device, and the run's number formats."""

    # a CLIP model, clipkit's or OpenCLIP's (duck-typed: called with output_dict=True, and encode_image)
    model: Any
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[List[str]], torch.Tensor]
    device: torch.device
    autocast: Callable[[], ContextManager[Any]]
    input_dtype: Optional[torch.dtype]
    seed: int

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(self.device, dtype=self.input_dtype or torch.float32)


def _due(frequency: int, completed: int, final: bool) -> bool:
    return bool(frequency) and (completed % frequency == 0 or final)


def retrieval_metrics(ctx: EvalContext, batches: Iterable[Dict[str, Any]],
                      num_samples: Optional[int] = None) -> Dict[str, Any]:
    """OpenCLIP's ``get_clip_metrics`` plus the sample-weighted ``clip_val_loss`` and ``num_samples`` over
    loader items with ``images`` and ``texts`` (stopping once ``num_samples`` are in); ``{}`` for none."""
    model = ctx.model
    images: List[torch.Tensor] = []
    texts: List[torch.Tensor] = []
    total_loss, count = 0.0, 0
    with torch.no_grad():
        for item in batches:
            with ctx.autocast():
                out = model(ctx.images(item["images"]), item["texts"].to(ctx.device))
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
            if num_samples and count >= num_samples:
                break
    if not count:
        return {}
    metrics = clip_metrics(torch.cat(images), torch.cat(texts), scale.item())
    metrics.update(clip_val_loss=total_loss / count, num_samples=count)
    return metrics


def retrieval(ctx: EvalContext, data: Any, spec: str) -> Dict[str, Any]:
    """:func:`retrieval_metrics` on ``spec`` (``--val-data``); ``data``: the data settings."""
    loader = eval_loader(spec, data, ctx.seed, ctx.preprocess, ctx.tokenizer, flag="--val-data",
                         num_samples=data.val_num_samples)
    with contextlib.closing(loader.epoch(0)) as batches:  # its workers stop even if evaluation fails
        metrics = retrieval_metrics(ctx, batches, data.val_num_samples)
    if not metrics:
        logger.warning("--val-data %s: no usable samples", spec)
        return {}
    skipped = loader.progress.skipped()
    if skipped:
        logger.warning("--val-data: skipped %s", ", ".join(f"{k} {v}" for k, v in skipped.items()))
    return metrics


@dataclass
class ZeroShotCounts:
    """Per class: how many labelled images there were, and how many of them the classifier ranked first
    (``top1``) or among its first five (``top5``)."""

    samples: torch.Tensor
    top1: torch.Tensor
    top5: torch.Tensor

    @property
    def total(self) -> int:
        return int(self.samples.sum())

    def accuracy(self, hits: torch.Tensor) -> float:
        return hits.sum().item() / self.total

    def mean_per_class_recall(self) -> float:
        """The mean over the classes that have images of each one's top-1 recall (scikit-learn's
        ``balanced_accuracy_score``, as CLIP_benchmark reports it)."""
        present = self.samples > 0
        return (self.top1[present].double() / self.samples[present].double()).mean().item()


def zero_shot_classifier(ctx: EvalContext, classnames: Sequence[str], templates: Sequence[Template]) -> torch.Tensor:
    """The ``[embed_dim, classes]`` fp32 classifier; string templates may write the class as ``{}`` or ``{c}``."""
    from ..zero_shot import build_zero_shot_classifier

    templates = [t.replace("{c}", "{}") if isinstance(t, str) else t for t in templates]
    with torch.no_grad(), ctx.autocast():
        return build_zero_shot_classifier(ctx.model, ctx.tokenizer, list(classnames), templates,
                                          num_classes_per_batch=10, device=ctx.device).float()


def zero_shot_counts(ctx: EvalContext, batches: Iterable[Dict[str, Any]], classifier: torch.Tensor,
                     where: str) -> ZeroShotCounts:
    """Classify the images of loader items with ``images`` and ``labels``; a label with no column in
    ``classifier`` is a :class:`DataError` naming ``where`` (flag and spec) and the sample."""
    classes = classifier.shape[1]
    counts = ZeroShotCounts(*(torch.zeros(classes, dtype=torch.long) for _ in range(3)))
    k = min(5, classes)
    with torch.no_grad():
        for item in batches:
            labels = item["labels"].to(ctx.device)
            outside = (labels < 0) | (labels >= classes)
            if outside.any():
                i = int(outside.nonzero()[0])
                raise DataError(f"{where}: sample {item['keys'][i]} has label {labels[i].item()}, but there "
                                f"are {classes} classes (labels 0 to {classes - 1})")
            with ctx.autocast():
                image = ctx.model.encode_image(ctx.images(item["images"]), normalize=True)
            logits = 100.0 * image.float() @ classifier
            hits = (logits.topk(k, dim=1).indices == labels.view(-1, 1)).cpu()
            labels = labels.cpu()
            counts.samples += torch.bincount(labels, minlength=classes)
            counts.top1 += torch.bincount(labels[hits[:, 0]], minlength=classes)
            counts.top5 += torch.bincount(labels[hits.any(dim=1)], minlength=classes)
    return counts


def zero_shot(ctx: EvalContext, data: Any, spec: str, classnames: Sequence[str], templates: Sequence[Template],
              prefix: str, flag: str) -> Dict[str, Any]:
    """Top-1/top-5 accuracy of the text-derived classifier over labelled images (from ``flag``)."""
    classifier = zero_shot_classifier(ctx, classnames, templates)
    loader = eval_loader(spec, data, ctx.seed, ctx.preprocess, None, flag=flag, label=True)
    with contextlib.closing(loader.epoch(0)) as batches:  # its workers stop even if evaluation fails
        counts = zero_shot_counts(ctx, batches, classifier, f"{flag} {spec}")
    if not counts.total:
        logger.warning("%s: no usable labelled samples", spec)
        return {}
    return {f"{prefix}top1": counts.accuracy(counts.top1), f"{prefix}top5": counts.accuracy(counts.top5)}


def class_names(spec: str, names_file: Optional[str], data: Any, flag: str, names_flag: str) -> List[str]:
    """The class names of zero-shot data ``spec`` (given with ``flag``): read from ``names_file``, else the
    data source's own (a folder's sub-folders, ``_`` read as a space); ``names_flag`` is named when neither."""
    if names_file:
        return read_list(names_file, "class names")
    classes = data_source(spec, eval_type(spec, data), data, flag=flag, label=True).classes
    if not classes:
        raise DataError(f"{flag} {spec}: its data source does not name its classes; pass {names_flag}")
    return [c.replace("_", " ") for c in classes]


class Evaluator:
    """Every evaluation the settings ask for: ``evaluation`` says how often, ``data`` on what (the data
    settings: ``--val-data``, ``--zeroshot-*``, ``--imagenet-*``, and how to load them)."""

    def __init__(self, evaluation: Any, data: Any) -> None:
        self.evaluation = evaluation
        self.data = data

    def _class_names(self) -> List[str]:
        return class_names(self.data.zeroshot_data, self.data.zeroshot_classnames, self.data,
                           "--zeroshot-data", "--zeroshot-classnames")

    def _templates(self) -> List[str]:
        templates = self.data.zeroshot_templates
        return read_list(templates, "templates") if templates else ["a photo of a {}."]

    def check(self) -> None:
        """Fail now, with the flag and the file, on what evaluation would only find after an epoch of
        training: data that is not there, class names or templates that do not read, more class folders
        than class names."""
        from ..zero_shot_metadata import IMAGENET_CLASSNAMES

        data = self.data

        def source(flag: str, spec: str, label: bool) -> DataSource:
            try:
                return data_source(spec, eval_type(spec, data), data, flag=flag, label=label)
            except ArgsError as exc:  # a --dataset-type that names no registered data source
                raise DataError(f"{flag} {spec!r}: {exc}") from exc

        def classes_fit(flag: str, spec: str, found: DataSource, names: Sequence[str], named_by: str) -> None:
            if found.classes and len(found.classes) > len(names):  # a source that names its classes: folders
                raise DataError(f"{flag} {spec}: {len(found.classes)} class folders, but {named_by} has "
                                f"{len(names)} class names")

        if data.val_data:
            source("--val-data", data.val_data, False)
        if data.zeroshot_data:
            found = source("--zeroshot-data", data.zeroshot_data, True)
            try:
                names = self._class_names()
            except DataError as exc:
                raise DataError(f"--zeroshot-classnames: {exc}") from exc
            try:
                self._templates()
            except DataError as exc:
                raise DataError(f"--zeroshot-templates: {exc}") from exc
            if data.zeroshot_classnames:
                classes_fit("--zeroshot-data", data.zeroshot_data, found, names,
                            f"--zeroshot-classnames {data.zeroshot_classnames}")
        for flag, spec in (("--imagenet-val", data.imagenet_val), ("--imagenet-v2", data.imagenet_v2)):
            if spec:
                classes_fit(flag, spec, source(flag, spec, True), IMAGENET_CLASSNAMES, "ImageNet")

    def run(self, ctx: EvalContext, completed: int, final: bool) -> Dict[str, Any]:
        """Every evaluation that is due after ``completed`` epochs (``final``: the run's last)."""
        data, every = self.data, self.evaluation
        was_training = ctx.model.training
        ctx.model.eval()
        metrics: Dict[str, Any] = {}
        try:
            if data.val_data and _due(every.val_frequency, completed, final):
                metrics.update(retrieval(ctx, data, data.val_data))
            if _due(every.zeroshot_frequency, completed, final):
                if data.zeroshot_data:
                    metrics.update(zero_shot(ctx, data, data.zeroshot_data, self._class_names(), self._templates(),
                                             "zeroshot-", "--zeroshot-data"))
                if data.imagenet_val or data.imagenet_v2:
                    from ..zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

                    for spec, prefix, flag in ((data.imagenet_val, "imagenet-zeroshot-val-", "--imagenet-val"),
                                               (data.imagenet_v2, "imagenetv2-zeroshot-val-", "--imagenet-v2")):
                        if spec:
                            metrics.update(zero_shot(ctx, data, spec, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES,
                                                     prefix, flag))
        finally:
            ctx.model.train(was_training)
        return metrics
