"""Training and evaluation data with a deterministic order that a resumed run can replay.

Every dataset (WebDataset shards, CSV, image folders, synthetic) is a list of *units* (shards or
rows) that one epoch orders with a generator seeded by ``(seed, epoch)`` and deals out round-robin
to ``rank + world * worker``, as OpenCLIP splits by node then by worker. Each loader worker turns its
units into batches of ``batch_size`` itself and numbers them; the ``DataLoader`` hands workers' items
over in a fixed cycle. Which batch comes next is therefore a function of the flags alone, and a
resumed run reaches the exact position of a killed one by letting each worker skip the items it had
delivered, undecoded and untransformed, and rotating the worker cycle to where it stopped.

Unreadable samples are dropped before batching and counted by kind (see :data:`SKIP_KINDS`); each
item carries its worker's running counts, so the counts survive resume and reach the log. Nothing a
sample holds can end the run: any error decoding or transforming one sample is that sample's, and a
worker holds at most one decoded image at a time (each sample is transformed as it is decoded), under a
pixel limit checked from the image header before any pixels are decoded.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Generator, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..builtin.tokenizers.clip_bpe import text_cap
from ..errors import DataError, explain_os_error
from . import data_sources
from . import shards as wds
from .data_sources import DataSource, DataSourceContext

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger("clipkit.train")

SKIP_KINDS = ("bad_image", "empty_image", "missing_image", "missing_caption", "missing_label", "bad_caption",
              "too_large", "bad_shard")
# evaluation data that no registration claims by its name, in a run whose --dataset-type does not say either
EVAL_FALLBACK = "webdataset"
SHUFFLE_BUFFER = 2000  # raw samples per worker between shard order and batching (OpenCLIP: 5000 decoded)
# The decompression-bomb guard (see max_image_pixels). A decode costs up to ~7 bytes a pixel (RGBA plus the
# RGB copy), so the floor lets a worker hold one 32 MP image (6,500 x 4,900: any camera or scan in common
# use) in ~220 MB; models with larger inputs get room for 8x their side.
IMAGE_PIXELS_FLOOR = 32_000_000
IMAGE_PIXELS_SIDE_FACTOR = 8
# JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) as long as the shorter side stays at least this many
# times the model's input: a random resized crop of 8% of the area (ratio 4/3) still has input-size pixels
DRAFT_SIDE_FACTOR = 4
# PIL formats a sample may be: what the web and cameras produce. Others (EPS runs Ghostscript, and
# dozens of rarely exercised parsers) count as bad_image whatever the member's extension claims.
DECODE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "ICO", "AVIF")


def max_image_pixels(image_size: Optional[int]) -> int:
    """The default pixel limit for a model whose input side is ``image_size`` (``--max-image-pixels`` overrides)."""
    side = IMAGE_PIXELS_SIDE_FACTOR * (image_size or 0)
    return max(IMAGE_PIXELS_FLOOR, side * side)


# -- the builtin data sources: what the units are and how a unit becomes raw samples -------------------
# (registered by clipkit.builtin.data_sources through the same hook as a third party's; the protocol is
# clipkit.train.data_sources)
class ShardSource(DataSource):
    """WebDataset shards: units are shard URLs, read as tar streams."""

    shuffle_buffer = SHUFFLE_BUFFER
    unit = "shard"

    def __init__(self, spec: str, weights: Optional[Sequence[float]] = None, label: bool = False):
        self.spec = spec
        self.sources = wds.expand_sources(spec)
        self.label = label
        if not any(self.sources):
            raise DataError(f"{spec!r}: the pattern names no shards")
        missing = [u for urls in self.sources for u in urls
                   if not (u.startswith("pipe:") or "://" in u) and not os.path.exists(u.removeprefix("file:"))]
        if missing:
            raise DataError(f"{spec!r}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
        self.urls = [u for urls in self.sources for u in urls]
        # as OpenCLIP, every shard of a source carries that source's factor
        self.weights = [w for urls, w in zip(self.sources, weights or [1.0] * len(self.sources)) for _ in urls]

    @classmethod
    def build(cls, spec: str, ctx: DataSourceContext) -> "ShardSource":
        """The ``webdataset`` factory."""
        return cls(spec, ctx.weights, label=ctx.label)

    def units(self) -> List[Any]:
        return list(self.urls)

    def count(self) -> Tuple[int, str]:
        return wds.count_samples(self.spec)

    def read(self, units: Iterable[Any], counts: Dict[str, int]) -> Iterator[Dict[str, Any]]:
        wanted = (wds.LABEL_EXT,) if self.label else (wds.TEXT_EXT,)
        for url in units:
            for raw in wds.iter_shard(url, wanted + wds.IMAGE_EXTS, counts):
                image = next((raw[e] for e in wds.IMAGE_EXTS if e in raw), None)
                yield {"__key__": f"{url}:{raw['__key__']}", "image": image,
                       "text": raw.get(wds.TEXT_EXT), "label": raw.get(wds.LABEL_EXT)}


class CsvSource(DataSource):
    """A CSV file of image paths and captions: units are rows."""

    unit = "row"

    def __init__(self, path: str, img_key: str, caption_key: str, separator: str):
        self.path = Path(path)
        with explain_os_error(str(self.path), DataError), open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            columns = reader.fieldnames or []
            if img_key not in columns or caption_key not in columns:
                wanted = [k for k in (img_key, caption_key) if k not in columns]
                hint = ""
                if len(columns) == 1 and any(s in columns[0] for s in (",", "\t", ";", "|")):
                    sep = next(s for s in (",", "\t", ";", "|") if s in columns[0])
                    hint = f"; the header looks {sep!r}-separated: pass --csv-separator {sep!r}"
                raise DataError(f"{self.path}: column(s) {', '.join(map(repr, wanted))} not found; columns "
                                f"found with --csv-separator {separator!r}: {columns}{hint} "
                                f"(set --csv-img-key/--csv-caption-key)")
            self.rows = [(row[img_key], row[caption_key]) for row in reader]
        base = self.path.parent
        self.rows = [(p if os.path.isabs(p) or os.path.exists(p) else str(base / p), c) for p, c in self.rows]

    @classmethod
    def build(cls, spec: str, ctx: DataSourceContext) -> "CsvSource":
        """The ``csv`` factory: the columns and separator come from the CSV flags."""
        return cls(spec, ctx.csv_img_key, ctx.csv_caption_key, ctx.csv_separator)

    def units(self) -> List[Any]:
        return list(range(len(self.rows)))

    def read(self, units: Iterable[Any], counts: Dict[str, int]) -> Iterator[Dict[str, Any]]:
        for i in units:
            path, caption = self.rows[i]
            yield {"__key__": f"{self.path}:{i + 2}", "image": wds.read_image_file(path), "text": caption, "label": None}


class FolderSource(DataSource):
    """An image folder with one sub-folder per class (ImageNet's validation layout): units are images."""

    unit = "image"

    def __init__(self, root: str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{root}: not a folder of class sub-folders")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise DataError(f"{root}: no class sub-folders")
        self.items = [(str(f), label) for label, name in enumerate(self.classes)
                      for f in sorted((self.root / name).iterdir())
                      if f.suffix.lower().lstrip(".") in wds.IMAGE_EXTS]

    @classmethod
    def build(cls, spec: str, ctx: DataSourceContext) -> "FolderSource":
        """The ``folder`` factory."""
        return cls(spec)

    def units(self) -> List[Any]:
        return list(range(len(self.items)))

    def read(self, units: Iterable[Any], counts: Dict[str, int]) -> Iterator[Dict[str, Any]]:
        for i in units:
            path, label = self.items[i]
            yield {"__key__": path, "image": wds.read_image_file(path), "text": None, "label": label}


class SyntheticSource(DataSource):
    """Learnable random pairs: a coloured shape on noise, captioned with its colour and shape.

    Unlike OpenCLIP's synthetic data (one black image, one caption), the contrastive loss can fall,
    so a synthetic run tests learning, not only plumbing.
    """

    COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
               "purple": (150, 60, 190), "white": (240, 240, 240)}
    SHAPES = ("square", "circle", "stripe")

    unit = "sample"

    def __init__(self, num_samples: int, seed: int, size: int = 64):
        self.num_samples, self.seed, self.size = num_samples, seed, size

    @classmethod
    def build(cls, spec: str, ctx: DataSourceContext) -> "SyntheticSource":
        """The ``synthetic`` factory: ``--train-num-samples`` pairs at the model's input size (at least 32)."""
        if not ctx.num_samples:
            raise DataError("synthetic data needs --train-num-samples")
        return cls(ctx.num_samples, ctx.seed, size=max(32, ctx.image_size or 0))

    def units(self) -> List[Any]:
        return list(range(self.num_samples))

    def sample(self, index: int) -> Tuple[Image.Image, str]:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng([self.seed, index])
        colour = list(self.COLOURS)[int(rng.integers(len(self.COLOURS)))]
        shape = self.SHAPES[int(rng.integers(len(self.SHAPES)))]
        s = self.size
        img = rng.integers(0, 60, (s, s, 3)).astype(np.uint8)
        yy, xx = np.mgrid[:s, :s]
        cy, cx, r = rng.integers(s // 4, 3 * s // 4, 2).tolist() + [s // 5]
        mask = {"square": (abs(yy - cy) < r) & (abs(xx - cx) < r),
                "circle": (yy - cy) ** 2 + (xx - cx) ** 2 < r * r,
                "stripe": abs(yy - cy) < r // 3}[shape]
        img[mask] = self.COLOURS[colour]
        return Image.fromarray(img), f"a {colour} {shape}"

    def read(self, units: Iterable[Any], counts: Dict[str, int]) -> Iterator[Dict[str, Any]]:
        for i in units:
            image, caption = self.sample(i)
            yield {"__key__": f"synthetic:{i}", "image": image, "text": caption, "label": None}


# -- the per-worker stream ------------------------------------------------------------------------
@contextlib.contextmanager
def _pixel_limit(limit: int) -> Iterator[None]:
    """PIL's own bomb guard set to ``limit`` (it refuses at twice that) and silent: clipkit's limit decides."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _decode(raw: Dict[str, Any], needs: str, counts: Dict[str, int], *, max_pixels: int,
            draft_side: Optional[int] = None, caption_chars: Optional[int] = None) -> Optional[Tuple[Image.Image, Any, str]]:
    """``(PIL RGB image, text or label, key)``, or ``None`` after counting why the sample is unusable.

    The image size is checked from its header (after choosing a reduced JPEG scale of at least
    ``draft_side``) against ``max_pixels`` before anything is decoded; captions are cut to ``caption_chars``.
    Whatever a sample's bytes make the decoders raise is counted against the sample.
    """
    def skip(kind: str) -> Optional[Tuple[Image.Image, Any, str]]:
        counts[kind] = counts.get(kind, 0) + 1
        return None

    if raw["image"] is wds.TOO_LARGE or raw["text"] is wds.TOO_LARGE or raw["label"] is wds.TOO_LARGE:
        return skip("too_large")

    if needs == "text":
        target = raw["text"]
        if target is None:
            return skip("missing_caption")
        try:
            if isinstance(target, bytes):
                target = target.decode("utf-8")
            target = str(target)[:caption_chars]
        except Exception:
            return skip("bad_caption")
        if not target.strip():
            return skip("missing_caption")
    else:
        target = raw["label"]
        if target is None:
            return skip("missing_label")
        try:
            target = int(target.decode("utf-8") if isinstance(target, bytes) else target)
        except Exception:
            return skip("missing_label")
    image = decode_image(raw["image"], counts, max_pixels=max_pixels, draft_side=draft_side)
    return None if image is None else (image, target, raw["__key__"])


def decode_image(image: Any, counts: Dict[str, int], *, max_pixels: int,
                 draft_side: Optional[int] = None) -> Optional[Image.Image]:
    """A PIL RGB image from a sample's image (bytes, a PIL image, ``None`` or :data:`shards.TOO_LARGE`), or
    ``None`` after counting why it is unusable (the kinds of :data:`SKIP_KINDS`); see :func:`_decode`."""
    from PIL import Image

    def skip(kind: str) -> Optional[Image.Image]:
        counts[kind] = counts.get(kind, 0) + 1
        return None

    if image is wds.TOO_LARGE:
        return skip("too_large")
    if image is None:
        return skip("missing_image")
    if isinstance(image, bytes):
        if not image:
            return skip("empty_image")
        try:
            with _pixel_limit(max_pixels), Image.open(io.BytesIO(image), formats=_formats()) as img:
                if draft_side and img.format in ("JPEG", "MPO"):
                    img.draft(img.mode, (draft_side, draft_side))
                if img.width * img.height > max_pixels:
                    return skip("too_large")
                image = img.convert("RGB")
        except Image.DecompressionBombError:
            return skip("too_large")
        except Exception:  # PIL's parsers raise far more than OSError on crafted bytes
            return skip("bad_image")
    rgb: Image.Image = image.convert("RGB") if image.mode != "RGB" else image
    return rgb


def _formats() -> List[str]:
    from PIL import Image

    Image.init()
    return [f for f in DECODE_FORMATS if f in Image.OPEN]


def _shuffled(items: Iterator[Any], rng: random.Random, size: int) -> Iterator[Any]:
    """A seeded buffer shuffle: memory ``size`` items, output order a function of the seed alone."""
    buffer: List[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


# seeds are hashes of int tuples: stable across processes, unlike hashes of strings
class EpochStream(IterableDataset[Dict[str, Any]]):
    """One epoch of batches from a :class:`DataSource`, split over ranks and loader workers.

    Items are dicts: batches ``{"worker", "index", "images", "keys", "texts"|"labels", "stats"}``, and one last
    ``{"worker", "index", "final": True, "stats", "dropped"}`` per worker with its closing counts.
    Set :attr:`epoch`, :attr:`skip` and :attr:`rotate` before iterating (workers are forked per epoch).
    """

    def __init__(self, source: DataSource, *, batch_size: int, transform: Callable[[Any], torch.Tensor],
                 tokenizer: Optional[Callable[[List[str]], torch.Tensor]],
                 train: bool, seed: int = 0, rank: int = 0, world: int = 1, resampled: bool = False,
                 image_size: Optional[int] = None, max_pixels: Optional[int] = None):
        self.source, self.batch_size, self.transform, self.tokenizer = source, batch_size, transform, tokenizer
        self.train, self.seed, self.rank, self.world, self.resampled = train, seed, rank, world, resampled
        self.needs = "text" if tokenizer is not None else "label"
        self.max_pixels = max_pixels or max_image_pixels(image_size)
        self.draft_side = DRAFT_SIDE_FACTOR * image_size if image_size else None
        context = getattr(tokenizer, "context_length", None)
        self.caption_chars = text_cap(context if isinstance(context, int) else 77)
        self.epoch = 0
        self.skip: List[int] = []  # items each logical worker already delivered (resume)
        self.rotate = 0  # the logical worker that physical worker 0 plays (resume)

    def _units(self, slot: int, slots: int) -> Iterator[Any]:
        units = self.source.units()
        if self.resampled:  # endless draws with replacement, a generator per worker
            rng = random.Random(hash((self.seed, self.epoch, slot, 1)))
            weights = getattr(self.source, "weights", None)
            while True:
                yield rng.choices(units, weights=weights, k=1)[0]
        if self.train:
            random.Random(hash((self.seed, self.epoch, 2))).shuffle(units)
        yield from units[slot::slots]

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.rotate) % workers
        skip = self.skip[worker] if worker < len(self.skip) else 0
        slot, slots = self.rank + self.world * worker, self.world * workers
        counts: Dict[str, int] = {}
        raws = self.source.read(self._units(slot, slots), counts)
        if self.train and self.source.shuffle_buffer:
            raws = _shuffled(raws, random.Random(hash((self.seed, self.epoch, slot, 3))),
                             self.source.shuffle_buffer)
        index, pending = 0, []
        for raw in raws:
            sample = _decode(raw, self.needs, counts, max_pixels=self.max_pixels, draft_side=self.draft_side,
                             caption_chars=self.caption_chars)
            if sample is None:
                continue
            image, target, key = sample
            pixels: Optional[torch.Tensor] = None
            if index >= skip:
                # transformed now, so that only input-sized tensors wait for the batch to fill
                try:
                    pixels = self._transform(image, key)
                except Exception:
                    counts["bad_image"] = counts.get("bad_image", 0) + 1
                    continue
            # else a batch delivered before the resume: only which samples decode matters (a transform
            # failure, which a decodable RGB image should never cause, would shift these batches)
            pending.append((pixels, target, key))
            if len(pending) == self.batch_size:
                if index >= skip:
                    yield self._batch(pending, worker, index, counts)
                index, pending = index + 1, []
        if pending and not self.train:
            if index >= skip:
                yield self._batch(pending, worker, index, counts)
            index, pending = index + 1, []
        if index >= skip:
            yield {"worker": worker, "index": index, "final": True, "stats": dict(counts), "dropped": len(pending)}

    def _transform(self, image: Any, key: str) -> torch.Tensor:
        if not self.train:
            return self.transform(image)  # typed by __init__'s transform
        # augmentations draw from torch's and Python's global generators: seed them per sample, from its
        # key and the epoch, so that a replayed batch is augmented exactly as the first time and a sample
        # gets the same crop whatever the number of processes and workers
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                # the key without its folder: the same crops wherever the dataset lives
                stable = key.rsplit("/", 1)[-1].encode("utf-8")
                seed = hash((hash((self.seed, self.epoch)), zlib.crc32(stable))) & 0x7FFF_FFFF_FFFF_FFFF
                torch.manual_seed(seed)
                random.seed(seed)
                return self.transform(image)
        finally:
            random.setstate(state)

    def _batch(self, samples: List[Any], worker: int, index: int, counts: Dict[str, int]) -> Dict[str, Any]:
        pixels, targets, keys = zip(*samples)
        item = {"worker": worker, "index": index, "images": torch.stack(pixels), "keys": list(keys),
                "stats": dict(counts), "final": False}
        if self.tokenizer is not None:  # needs "text"
            item["texts"] = self.tokenizer(list(targets))
        else:
            item["labels"] = torch.tensor(targets, dtype=torch.long)
        return item


@dataclass
class Progress:
    """Where an epoch's data stands: items taken from each logical worker, and its latest counts."""

    consumed: List[int]
    last_worker: int = -1
    stats: Dict[int, Dict[str, int]] = field(default_factory=dict)
    dropped: Dict[int, int] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0

    def as_state(self) -> Dict[str, Any]:
        return {"consumed": list(self.consumed), "last_worker": self.last_worker, "batches": self.batches,
                "samples": self.samples, "stats": {str(k): dict(v) for k, v in self.stats.items()},
                "dropped": {str(k): v for k, v in self.dropped.items()}}

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "Progress":
        return cls(consumed=list(state["consumed"]), last_worker=int(state["last_worker"]),
                   stats={int(k): dict(v) for k, v in state["stats"].items()},
                   dropped={int(k): int(v) for k, v in state.get("dropped", {}).items()},
                   batches=int(state["batches"]), samples=int(state["samples"]))

    def skipped(self) -> Dict[str, int]:
        total: Dict[str, int] = {}
        for counts in self.stats.values():
            for kind, n in counts.items():
                total[kind] = total.get(kind, 0) + n
        return {k: total[k] for k in SKIP_KINDS if total.get(k)}


@dataclass
class Loader:
    """A :class:`EpochStream` behind a ``DataLoader``, with the bookkeeping that makes resume exact."""

    stream: EpochStream
    workers: int
    num_samples: int
    num_batches: Optional[int]  # per epoch on this rank; None: until the data runs out
    pin_memory: bool = False
    name: str = ""  # the registered data source's name, for messages
    exact_resume: bool = True  # False: the source cannot skip to a mid-epoch position (it says so)

    def epoch(self, epoch: int, progress: Optional[Progress] = None) -> Generator[Dict[str, Any], None, None]:
        """The epoch's batches after what ``progress`` says was consumed; updates ``self.progress``."""
        workers = max(1, self.workers)
        if progress is not None and len(progress.consumed) != workers:
            logger.warning("the checkpoint was written with %d data workers and this run has %d: the rest of "
                           "epoch %d is read from its beginning, not from where the first run stopped",
                           len(progress.consumed), workers, epoch + 1)
            progress = Progress(consumed=[0] * workers, batches=progress.batches, samples=progress.samples)
        elif progress is not None and not self.exact_resume and any(progress.consumed):
            logger.warning("data source %r cannot resume exactly: the rest of epoch %d is read from the beginning "
                           "of its data, not from where the first run stopped (%d batches of it were trained on)",
                           self.name, epoch + 1, progress.batches)
            progress = Progress(consumed=[0] * workers, batches=progress.batches, samples=progress.samples)
        self.progress = progress or Progress(consumed=[0] * workers)
        self.stream.epoch = epoch
        self.stream.skip = list(self.progress.consumed)
        self.stream.rotate = (self.progress.last_worker + 1) % workers
        if self.num_batches is not None and self.progress.batches >= self.num_batches:
            return
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.stream.seed + epoch),
                            persistent_workers=False)
        for item in loader:
            worker = item["worker"]
            self.progress.consumed[worker] += 1
            self.progress.last_worker = worker
            self.progress.stats[worker] = item["stats"]
            if item["final"]:
                self.progress.dropped[worker] = item["dropped"]
                continue
            self.progress.batches += 1
            self.progress.samples += len(item["images"])
            yield item
            if self.num_batches is not None and self.progress.batches >= self.num_batches:
                return


# -- building loaders from the data settings --------------------------------------------------------
def data_source(spec: Optional[str], dataset_type: str, data: Any, *, flag: str, label: bool = False,
                train: bool = False, seed: int = 0, image_size: Optional[int] = None) -> DataSource:
    """The :class:`DataSource` reading ``spec`` (given with ``flag``), built by the registered data source
    ``dataset_type`` (``auto``: the one ``spec`` selects by what the registrations declare); ``data`` is the
    data settings the source may read."""
    entry = data_sources.resolve(spec, dataset_type, flag)
    needs = "label" if label else "text"
    if needs not in data_sources.yields(entry):
        what = "class labels, which zero-shot evaluation needs" if label else "captions, which it needs"
        raise DataError(f"{flag} {spec!r}: data source {entry.name!r} gives samples without {what}")
    return data_sources.build(entry, spec or "", DataSourceContext.of(data, flag=flag, label=label, train=train,
                                                                      seed=seed, image_size=image_size))


def train_loader(data: Any, seed: int, transform: Callable[..., Any], tokenizer: Optional[Callable[..., Any]],
                 rank: int, world: int, image_size: int, *, pin_memory: bool = False,
                 flag: str = "--train-data") -> Loader:
    """The training loader from the data settings; the sample count comes from them, or from the source
    (``sizes.json``/``__len__`` or counting for shards, one per row for a CSV). ``pin_memory``: batches in
    page-locked memory, so that copies to a CUDA device run asynchronously; ``flag``: what messages call
    the data."""
    entry = data_sources.resolve(data.train_data, data.dataset_type, flag)
    source = data_source(data.train_data, entry.name, data, flag=flag, train=True, seed=seed,
                         image_size=image_size)
    exact = data_sources.exact_resume(entry)
    if not exact:
        logger.info("data source %r cannot resume exactly: a run resumed from a mid-epoch checkpoint reads that "
                    "epoch's data again from its beginning", entry.name)
    num_samples = data.train_num_samples
    if num_samples is None:
        if data.dataset_resampled:
            raise DataError(f"--dataset-resampled needs --train-num-samples (an epoch's length); the "
                            f"{source.unit}s are drawn forever")
        num_samples, how = source.count()
        logger.info("train data: %d samples (%s); pass --train-num-samples to set it", num_samples, how)
    global_batch = data.batch_size * world
    num_batches = num_samples // global_batch
    if num_batches == 0:
        raise DataError(f"--train-data: {num_samples} samples are fewer than one global batch "
                        f"({data.batch_size} x {world} processes); lower --batch-size")
    if not data.dataset_resampled:
        slots, units = world * max(1, data.workers), len(source.units())
        if units < slots:
            logger.warning("%d %ss for %d data workers: %d workers will have no data (no hang, but slower); "
                           "write more %ss or lower --workers", units, source.unit, slots, slots - units, source.unit)
    stream = EpochStream(source, batch_size=data.batch_size, transform=transform, tokenizer=tokenizer, train=True,
                         seed=seed, rank=rank, world=world, resampled=data.dataset_resampled,
                         image_size=image_size, max_pixels=data.max_image_pixels)
    return Loader(stream, data.workers, num_samples, num_batches, pin_memory=pin_memory, name=entry.name,
                  exact_resume=exact)


def eval_loader(spec: str, data: Any, seed: int, transform: Callable[[Any], torch.Tensor],
                tokenizer: Optional[Callable[[List[str]], torch.Tensor]], *, flag: str, label: bool = False,
                num_samples: Optional[int] = None, image_size: Optional[int] = None) -> Loader:
    """An evaluation loader on one process: natural order, partial last batches, no augmentation. The
    source is inferred from ``spec`` as with ``--dataset-type auto``, falling back to ``--dataset-type``."""
    source = data_source(spec, eval_type(spec, data), data, flag=flag, label=label, seed=seed)
    stream = EpochStream(source, batch_size=data.batch_size, transform=transform, tokenizer=tokenizer, train=False,
                         seed=seed, image_size=image_size, max_pixels=data.max_image_pixels)
    limit = None if num_samples is None else math.ceil(num_samples / data.batch_size)
    return Loader(stream, data.workers, num_samples or 0, limit)


def eval_type(spec: str, data: Any) -> str:
    """The data source that reads evaluation data ``spec``: each path by its own extension, as OpenCLIP;
    one no registration claims is read as the training data is (``--dataset-type``), else as shards."""
    if data_sources.infer(spec) is not None:
        return data_sources.AUTO
    entry = data_sources.lookup(data.dataset_type)
    return entry.name if entry is not None and not data_sources.generated(entry) else EVAL_FALLBACK


def read_list(path: str, what: str) -> List[str]:
    """Class names or templates: a JSON list of strings, or one per line."""
    with explain_os_error(path, DataError, doing=f"read {what}"):
        text = Path(path).read_text(encoding="utf-8")
    items: List[str]
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{path}: {what} look like JSON but do not parse: {exc}") from exc
        if not all(isinstance(i, str) for i in items):
            raise DataError(f"{path}: {what} must be a JSON list of strings")
    else:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    if not items:
        raise DataError(f"{path}: no {what}")
    return items
