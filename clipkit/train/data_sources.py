"""Data sources (kind ``data_source``): how training and evaluation samples are read, as registered parts.

A data source is built by a factory, ``factory(spec, ctx) -> DataSource``: ``spec`` is the string the
user gave (``--train-data``, ``--val-data``, ``--zeroshot-data``, ``--imagenet-val``/``-v2``: a path, a
brace pattern, several sources joined by ``::``; empty for a source that makes its own samples) and
``ctx`` a :class:`DataSourceContext` with the data settings a source may read. The
:class:`DataSource` it returns is a list of *units* and a way to read units into raw samples; the
trainer's ``EpochStream`` orders the units per epoch, deals them out to ranks and loader workers,
decodes, counts unreadable samples and makes resume exact. A source keeps those guarantees by being
deterministic: the same units read in the same order give the same samples. A source that cannot
(a live feed, reads whose order depends on the network) registers ``exact_resume=False``: the trainer
says so when the run starts, and a run resumed from a mid-epoch checkpoint reads that epoch's data again
from its start, with a warning.

``--dataset-type NAME`` selects any registered source; ``auto`` (the default) picks one by what the
registrations declare: ``prefixes=`` (``pipe:``), ``extensions=`` (``tar``, ``csv``) and ``folders=True``
(a directory). This module imports no torch: ``clipkit.kinds`` reads the protocol, and ``clipkit-train``'s
flag checks use the inference.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple

from ..errors import ArgsError, DataError, UnknownPartError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..kinds import Kind
    from ..registry import Entry

#: What ``--dataset-type`` takes besides a registered name: infer the source from each path.
AUTO = "auto"
#: What a sample may carry besides its image (``yields=``): a caption, or a class label.
TARGETS = ("text", "label")


class DataSource(ABC):
    """A dataset as units; ``read(units, counts)`` yields raw samples.

    A raw sample is a dict ``{"__key__": str, "image": bytes | PIL.Image | None, "text": str | bytes | None,
    "label": int | bytes | None}``. ``__key__`` names the sample uniquely and stably (it seeds the
    sample's augmentation and appears in errors). Images may be undecoded bytes: they are decoded under
    clipkit's pixel limit, and undecodable ones counted. A sample the source cannot read at all is left
    out and counted in ``counts`` (``counts[kind] += 1``, a kind of :data:`clipkit.train.data.SKIP_KINDS`
    such as ``missing_image`` or ``bad_shard``); nothing a sample holds may raise.
    """

    #: samples shuffled in a buffer after reading (shards need it; row lists are permuted whole)
    shuffle_buffer = 0
    #: what messages call one unit
    unit = "unit"
    #: per-unit sampling weights for ``--dataset-resampled`` (``None``: uniform)
    weights: Optional[Sequence[float]] = None
    #: class names in label order, when the data names them (a class folder's sub-folders); zero-shot
    #: evaluation uses them when ``--zeroshot-classnames`` is not given
    classes: Optional[List[str]] = None

    @abstractmethod
    def units(self) -> List[Any]:
        """The dataset's units (shard URLs, row indices), the same list on every call and in every process."""

    @abstractmethod
    def read(self, units: Iterable[Any], counts: Dict[str, int]) -> Iterator[Dict[str, Any]]:
        """Raw samples of ``units``, in order; unreadable ones counted in ``counts`` by kind."""

    def count(self) -> Tuple[int, str]:
        """How many samples one pass over every unit gives, and how that was found (for the log), when
        ``--train-num-samples`` is not given. The default: one sample per unit."""
        return len(self.units()), f"one per {self.unit}"


@dataclass(frozen=True)
class DataSourceContext:
    """What the trainer tells a data source's factory.

    Attributes:
        flag: the flag the spec came from (``--train-data``, ``--val-data``, ...), for messages.
        label: samples must carry class labels (zero-shot data), not captions.
        train: training data (shuffled, augmented) rather than evaluation data.
        seed: the run's ``--seed``.
        num_samples: ``--train-num-samples`` (a source that makes its own samples makes this many).
        image_size: the model's input side, for a source that makes images.
        weights: ``--train-data-upsampling-factors``, one per ``::`` source (training data only).
        csv_img_key, csv_caption_key, csv_separator: the CSV flags.
    """

    flag: str = "--train-data"
    label: bool = False
    train: bool = True
    seed: int = 0
    num_samples: Optional[int] = None
    image_size: Optional[int] = None
    weights: Optional[Tuple[float, ...]] = None
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"

    @classmethod
    def of(cls, data: Any, *, flag: str, label: bool = False, train: bool = False, seed: int = 0,
           image_size: Optional[int] = None) -> "DataSourceContext":
        """The context for ``flag``'s spec from the data settings ``data``."""
        factors = data.train_data_upsampling_factors if train and not label else None
        return cls(flag=flag, label=label, train=train, seed=seed, num_samples=data.train_num_samples,
                   image_size=image_size, weights=tuple(float(f) for f in factors.split("::")) if factors else None,
                   csv_img_key=data.csv_img_key, csv_caption_key=data.csv_caption_key,
                   csv_separator=data.csv_separator)


class DataSourceFactory(Protocol):
    """``register_data_sources`` factories: ``factory(spec, ctx)`` returns a :class:`DataSource`.

    Bad input (a file that is not there, a header without the columns) raises
    :class:`~clipkit.errors.DataError` with one line naming the spec; the trainer adds the flag.
    """

    def __call__(self, spec: str, ctx: DataSourceContext) -> DataSource: ...


# -- what registrations declare ----------------------------------------------------------------------
def _kind() -> Kind:
    from ..kinds import DATA_SOURCE  # not at import: clipkit.kinds imports this module for its protocol

    return DATA_SOURCE


def _strings(value: Any) -> Tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def exact_resume(entry: "Entry") -> bool:
    """Whether the source keeps the exact resume position (it declares ``exact_resume=False`` if not)."""
    return bool(entry.meta.get("exact_resume", True))


def generated(entry: "Entry") -> bool:
    """Whether the source makes its own samples (no spec; ``--train-num-samples`` says how many)."""
    return bool(entry.meta.get("generated", False))


def yields(entry: "Entry") -> Tuple[str, ...]:
    """What its samples carry besides the image: ``"text"`` (captions), ``"label"`` (classes), or both."""
    return _strings(entry.meta.get("yields", ("text",)))


def _entries() -> List["Entry"]:
    from ..registry import registry

    # builtins first: a third party's rule for an extension a builtin claims does not take it over
    return sorted(registry.entries(_kind()), key=lambda e: not e.plugin.builtin)


def _extensions(path: str) -> List[str]:
    """The extension(s) a path ends with: ``x.tar`` -> tar; ``x.{tar,tgz}`` -> tar, tgz; a URL's query dropped."""
    ext = path.split("?")[0].rsplit("/", 1)[-1].rsplit(".", 1)[-1].lower()
    return [e for e in ext.replace("{", "").replace("}", "").split(",") if e]


def infer(spec: str) -> Optional[str]:
    """The registered data source that reads ``spec`` by what registrations declare, judged by its first
    ``::`` source: a declared prefix (``pipe:``), else a declared extension, else ``folders=True`` for a
    directory. ``None`` when none does."""
    first = spec.split("::")[0]
    entries = _entries()
    for entry in entries:
        if any(first.startswith(p) for p in _strings(entry.meta.get("prefixes"))):
            return entry.name
    found = _extensions(first) if "." in first.rsplit("/", 1)[-1] else []
    for entry in entries:
        declared = {e.lower().lstrip(".") for e in _strings(entry.meta.get("extensions"))}
        if declared & set(found):
            return entry.name
    if os.path.isdir(first):
        for entry in entries:
            if entry.meta.get("folders"):
                return entry.name
    return None


def declared_inference() -> str:
    """What ``auto`` recognises, in words, for messages (``.csv/.tsv -> csv, .tar and pipe: -> webdataset``)."""
    parts = []
    for entry in _entries():
        rules = [f".{e}" for e in _strings(entry.meta.get("extensions"))] + list(_strings(entry.meta.get("prefixes")))
        if entry.meta.get("folders"):
            rules.append("a folder")
        if rules:
            parts.append(f"{'/'.join(rules)} -> {entry.name}")
    return ", ".join(parts)


def choices() -> List[str]:
    """What ``--dataset-type`` accepts: ``auto`` and every registered data source."""
    from ..registry import registry

    return [AUTO] + registry.names(_kind())


def resolve(spec: Optional[str], dataset_type: str, flag: str) -> "Entry":
    """The registration that reads ``spec`` given with ``flag``: ``dataset_type`` by name, or inferred
    for ``auto``. :class:`ArgsError` for an unknown name or a spec ``auto`` cannot place."""
    from ..registry import registry

    if dataset_type == AUTO:
        name = infer(spec or "")
        if name is None:
            raise ArgsError(f"{flag} {spec!r}: cannot tell the dataset type from the extension "
                            f"({declared_inference()}); pass --dataset-type, one of {', '.join(registry.names(_kind()))}")
        dataset_type = name
    try:
        return registry.get(_kind(), dataset_type, where=f"--dataset-type {dataset_type}")
    except UnknownPartError as exc:
        raise ArgsError(str(exc)) from None


def lookup(name: str) -> Optional["Entry"]:
    """The registered data source ``name``, or ``None`` (``auto``, or a name nothing registers)."""
    from ..registry import registry

    return registry.get(_kind(), name) if registry.has(_kind(), name) else None


def has_training_data(data: Any) -> bool:
    """Whether the data settings ``data`` give training data: ``--train-data``, or a ``--dataset-type`` that
    makes its own samples (``synthetic``)."""
    entry = lookup(data.dataset_type)
    return bool(data.train_data) or (entry is not None and generated(entry))


def build(entry: "Entry", spec: str, ctx: DataSourceContext) -> DataSource:
    """Call the entry's factory; its :class:`DataError` gains the flag, anything else names the plugin."""
    from ..errors import ClipkitError

    factory = entry.load()
    try:
        source = factory(spec, ctx)
    except DataError as exc:
        raise DataError(f"{ctx.flag}: {exc}") from exc
    except ClipkitError:
        raise
    except Exception as exc:
        raise DataError(f"{ctx.flag} {spec!r}: {entry.where} raised {exc!r}") from exc
    if not (callable(getattr(source, "units", None)) and callable(getattr(source, "read", None))):
        raise DataError(f"{ctx.flag} {spec!r}: {entry.where} returned {type(source).__name__}, not a DataSource "
                        f"(units() and read(units, counts))")
    checked: DataSource = source
    return checked
