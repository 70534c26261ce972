"""``clipkit data bench``: how fast the trainer's own data pipeline reads a dataset, per number of workers.

The samples go through exactly what ``clipkit-train`` runs (:func:`clipkit.train.data.train_loader`: the
data source, the shuffle, decoding under the pixel limit, the model's training transform, tokenizing,
batching) so that the rate measured is the rate a run gets from its data, and ``--workers`` can be sized
before the run: the data keeps up when it delivers more samples per second than the training step takes.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import DataError


@dataclass
class BenchRow:
    """One worker count's measurement."""

    workers: int
    samples: int  # samples delivered in whole batches
    batches: int
    bad: Dict[str, int] = field(default_factory=dict)  # unreadable samples by kind (clipkit.train.data.SKIP_KINDS)
    first_batch_s: float = 0.0  # from starting the epoch (and its workers) to the first batch
    seconds: float = 0.0  # from the first batch to the last

    @property
    def samples_per_s(self) -> Optional[float]:
        """The steady rate: samples after the first batch over the time after it (``None`` with one batch)."""
        if self.batches < 2 or self.seconds <= 0:
            return None
        return (self.samples - self.samples / self.batches) / self.seconds


def model_inputs(model: str, cache_dir: Optional[str] = None) -> Tuple[Callable[..., Any], Callable[..., Any], int]:
    """``(training transform, tokenizer, image side)`` of ``model`` (a name or a config file), built on the
    meta device: the shapes and preprocessing without any weights."""
    from ..factory import create_model_and_transforms
    from ..tokenizer import get_tokenizer

    built, preprocess_train, _ = create_model_and_transforms(model, device="meta", load_weights=False,
                                                             cache_dir=cache_dir)
    size: Any = built.visual.image_size  # an int or (height, width): the tower contract
    return preprocess_train, get_tokenizer(model, cache_dir=cache_dir), size if isinstance(size, int) else max(size)


def bench(spec: str, *, workers: Sequence[int], batch_size: int, samples: int, transform: Callable[..., Any],
          tokenizer: Callable[..., Any], image_size: int, dataset_type: str = "auto", seed: int = 0,
          report: Optional[Callable[[BenchRow], None]] = None) -> List[BenchRow]:
    """Read up to ``samples`` samples of ``spec`` (training data as ``--train-data`` takes it) in batches of
    ``batch_size`` through the trainer's pipeline, once per entry of ``workers``; ``report`` sees each row as
    it is measured."""
    from .data import train_loader
    from .settings import DataSettings

    if samples < batch_size:
        raise DataError(f"--samples {samples} is less than one batch (--batch-size {batch_size})")
    data = replace(DataSettings(), train_data=spec, dataset_type=dataset_type, batch_size=batch_size,
                   train_num_samples=samples, workers=max(workers))
    rows = []
    for count in workers:
        loader = train_loader(replace(data, workers=count), seed, transform, tokenizer, 0, 1, image_size,
                              flag="SHARDS")
        row = BenchRow(count, 0, 0)
        start = time.perf_counter()
        first = None
        for item in loader.epoch(0):
            if first is None:
                first = time.perf_counter()
            row.batches += 1
            row.samples += len(item["images"])
        end = time.perf_counter()
        row.first_batch_s = (first or end) - start
        row.seconds = end - (first or end)
        row.bad = loader.progress.skipped()
        rows.append(row)
        if report is not None:
            report(row)
    return rows


def header(spec: str, model: str, image_size: int, batch_size: int, samples: int) -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return (f"{spec}: up to {samples} samples in batches of {batch_size}, decoded and transformed for {model} "
            f"({image_size} px) as clipkit-train does; {cpus} CPUs\n"
            f"{'workers':>7s} {'samples':>8s} {'batches':>7s} {'bad':>5s} {'first batch s':>13s} {'samples/s':>10s}"
            f"  bad kinds")


def row_line(row: BenchRow) -> str:
    rate = row.samples_per_s
    kinds = ", ".join(f"{k} {v}" for k, v in row.bad.items())
    return (f"{row.workers:7d} {row.samples:8d} {row.batches:7d} {sum(row.bad.values()):5d} "
            f"{row.first_batch_s:13.2f} {format(rate, '10.1f') if rate is not None else '-'.rjust(10)}  {kinds}").rstrip()


def advice(rows: List[BenchRow]) -> str:
    """The closing line: the fastest worker count, and what its rate means for a run."""
    rated = [r for r in rows if r.samples_per_s is not None]
    if not rated:
        return "too few batches to measure a rate: raise --samples"
    best = max(rated, key=lambda r: r.samples_per_s or 0.0)
    return (f"fastest: --workers {best.workers} at {best.samples_per_s:.1f} samples/s; the data keeps up with a run "
            f"whose log shows fewer samples/s per process than that (the first batch includes starting the workers)")


def parse_counts(text: str) -> List[int]:
    """``"0,1,2,4"`` as ``[0, 1, 2, 4]``; a :class:`ValueError` naming what is wrong."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"expected worker counts such as 0,1,2,4 (whole numbers, at least 0), got {text!r}")
    return counts


def run(spec: str, *, model: str, workers: Sequence[int], batch_size: int, samples: int, dataset_type: str = "auto",
        cache_dir: Optional[str] = None, out: Any = None) -> List[BenchRow]:
    """What ``clipkit data bench`` does: the table on ``out`` (default: stdout), a row per worker count."""
    import sys

    out = out or sys.stdout
    transform, tokenizer, size = model_inputs(model, cache_dir)

    printed: List[BenchRow] = []

    def report(row: BenchRow) -> None:
        if not printed:  # the table starts once the data has opened: a bad path is one line alone
            print(header(spec, model, size, batch_size, samples), file=out)
        printed.append(row)
        print(row_line(row), file=out, flush=True)
    rows = bench(spec, workers=workers, batch_size=batch_size, samples=samples, transform=transform,
                 tokenizer=tokenizer, image_size=size, dataset_type=dataset_type, report=report)
    print(advice(rows), file=out)
    return rows
