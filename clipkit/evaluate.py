"""``clipkit eval``: zero-shot classification and image-text retrieval of any model clipkit can build.

The numbers come from the trainer's own evaluation (:mod:`clipkit.train.evaluate`: the same loaders,
classifier and metric code), so ``clipkit eval`` on a checkpoint reports what training logged for it.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, TypeVar, Union

from ._precision import PRECISIONS
from .errors import DataError, explain_os_error

TASKS = ("zeroshot", "retrieval")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
#: The metrics of each task the table on stdout shows (the JSON line has every metric).
TABLE_KEYS = {
    "zeroshot": ("top1", "top5", "mean_per_class_recall"),
    "retrieval": tuple(f"{way}_R@{k}" for way in ("image_to_text", "text_to_image") for k in (1, 5, 10)),
}

_T = TypeVar("_T")


def _progress(batches: Iterable[_T], show: bool, what: str) -> Iterable[_T]:
    if not show:
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc=what, unit="batch", file=sys.stderr)


def _skipped_message(skipped: Dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in skipped.items()) or "nothing"


def evaluate(model: str, task: str, data: str, *, pretrained: Optional[str] = None,
             classnames: Optional[str] = None, templates: Optional[str] = None, batch_size: int = 64,
             workers: int = 4, device: Optional[str] = None, precision: str = "fp32",
             progress: Optional[bool] = None, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate ``model`` (a config name, ``.json`` file, ``local-dir:``/``hf-hub:`` name) with weights
    ``pretrained`` (a tag, a file, a training checkpoint) on ``data`` for ``task``.

    ``zeroshot``: ``data`` is a folder of class sub-folders or WebDataset shards whose samples carry a
    ``cls`` label; ``classnames`` and ``templates`` are files (a JSON list or one per line; templates write
    the class as ``{}`` or ``{c}``). ``retrieval``: shards with ``txt`` captions or a CSV file (columns
    ``filepath`` and ``title``, tab-separated, as the trainer reads them).

    Returns ``{"model", "pretrained", "task", "data", "metrics", "counts"}``: zero-shot ``top1``, ``top5``
    and ``mean_per_class_recall``; retrieval OpenCLIP's keys (``image_to_text_R@1``, ...,
    ``text_to_image_R@10``, mean/median ranks) and ``clip_val_loss``. ``counts`` has the ``samples``
    evaluated, ``skipped`` unreadable ones by kind and, for zero-shot, the number of ``classes``.
    ``progress``: a progress bar on stderr (default: when stderr is a terminal).
    Bad input raises a :class:`~clipkit.errors.ClipkitError` with one line naming what is wrong.
    """
    if task not in TASKS:
        raise DataError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if workers < 0:
        raise DataError(f"workers {workers}: expected 0 (load in this process) or more")
    if precision not in PRECISIONS:
        raise DataError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if task == "retrieval" and (classnames or templates):
        raise DataError("--classnames/--templates: retrieval uses the captions of --data; they are for "
                        "--task zeroshot")
    import torch

    from .factory import create_model_and_transforms
    from .tokenizer import get_tokenizer
    from .train.build import Precision
    from .train.data import eval_loader, read_list
    from .train.evaluate import EvalContext, class_names, retrieval_metrics, zero_shot_classifier, zero_shot_counts
    from .train.settings import DataSettings

    settings = DataSettings(batch_size=batch_size, workers=workers, cache_dir=cache_dir)
    names: List[str] = []  # both read for zeroshot only
    templates_list: List[str] = []
    if task == "zeroshot":  # every file is read before the model is built
        names = class_names(data, classnames, settings, "--data", "--classnames")
        templates_list = read_list(templates, "templates") if templates else list(DEFAULT_TEMPLATES)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    built, _, preprocess = create_model_and_transforms(model, pretrained, precision=precision, device=target,
                                                       cache_dir=cache_dir, output_dict=True)
    built.eval()
    numbers = Precision.of(precision, target)
    ctx = EvalContext(model=built, preprocess=preprocess, tokenizer=get_tokenizer(model, cache_dir=cache_dir),
                      device=target, autocast=numbers.autocast, input_dtype=numbers.input_dtype, seed=0)
    show = sys.stderr.isatty() if progress is None else progress
    counts: Dict[str, Any] = {}
    if task == "zeroshot":
        classifier = zero_shot_classifier(ctx, names, templates_list)
        loader = eval_loader(data, settings, 0, preprocess, None, flag="--data", label=True)
        with contextlib.closing(loader.epoch(0)) as batches:  # its workers stop even if evaluation fails
            found = zero_shot_counts(ctx, _progress(batches, show, "zeroshot"), classifier, f"--data {data}")
        skipped = loader.progress.skipped()
        if not found.total:
            raise DataError(f"--data {data}: no image with a class label (a 'cls' member or a class folder) could "
                            f"be read (skipped: {_skipped_message(skipped)})")
        metrics = {"top1": found.accuracy(found.top1), "top5": found.accuracy(found.top5),
                   "mean_per_class_recall": found.mean_per_class_recall()}
        counts.update(samples=found.total, classes=len(names))
    else:
        loader = eval_loader(data, settings, 0, preprocess, ctx.tokenizer, flag="--data")
        with contextlib.closing(loader.epoch(0)) as batches:  # its workers stop even if evaluation fails
            metrics = retrieval_metrics(ctx, _progress(batches, show, "retrieval"))
        skipped = loader.progress.skipped()
        if not metrics:
            raise DataError(f"--data {data}: no image-caption pair could be read (skipped: "
                            f"{_skipped_message(skipped)})")
        counts["samples"] = metrics.pop("num_samples")
    counts["skipped"] = skipped
    return {"model": model, "pretrained": pretrained, "task": task, "data": data, "metrics": metrics,
            "counts": counts}


def table(result: Dict[str, Any]) -> str:
    """The short table ``clipkit eval`` prints: the task's headline metrics and the counts."""
    rows = [(key, f"{result['metrics'][key]:.4f}") for key in TABLE_KEYS[result["task"]]]
    counts = result["counts"]
    rows.append(("samples", str(counts["samples"])))
    if "classes" in counts:
        rows.append(("classes", str(counts["classes"])))
    rows.append(("skipped", _skipped_message(counts["skipped"]) if counts["skipped"] else "0"))
    width = max(len(k) for k, _ in rows)
    head = f"{result['model']}" + (f" ({result['pretrained']})" if result["pretrained"] else "")
    return "\n".join([f"{head}: {result['task']} on {result['data']}"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def append_jsonl(path: Union[str, Path], result: Dict[str, Any]) -> None:
    """Append ``result`` as one JSON line to ``path`` (created with its folder when absent)."""
    path = Path(path)
    with explain_os_error(f"--out {path}", DataError, doing="write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")


__all__ = ["evaluate", "table", "append_jsonl", "TASKS"]
