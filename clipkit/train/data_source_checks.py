"""The contract checks of data sources (kind ``data_source``), behind ``clipkit.testing``'s cases.

Each case builds the source from its registered ``example=``: a spec of a tiny dataset the plugin ships
(a relative path is taken from the plugin's package), or ``make(folder) -> spec``, which writes one into
an empty temporary folder (removed afterwards). The source is then read through the trainer's own
``EpochStream`` and ``Loader``, so what is checked is what training relies on. Every failure is a
:class:`~clipkit.errors.ContractError` naming the source, its plugin and the rule.
"""
from __future__ import annotations

import contextlib
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import ClipkitError, ContractError
from .data import EpochStream, Loader, Progress
from .data_sources import DataSource, DataSourceContext, exact_resume, generated, yields

#: samples a generated source makes for its cases
EXAMPLE_SAMPLES = 16
_SIDE = 8  # pixels the checks' transform resizes images to


def _fail(where: str, contract: str, detail: str) -> ContractError:
    return ContractError(f"{where} breaks the contract '{contract}': {detail}")


def _pixels(image: Any) -> torch.Tensor:
    """A tiny float tensor of a PIL image: the checks need decoded images, not a model's preprocessing."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.resize((_SIDE, _SIDE)), dtype=np.float32)).permute(2, 0, 1)


def _tokens(texts: List[str]) -> torch.Tensor:
    return torch.tensor([[len(t)] for t in texts], dtype=torch.long)


class _Example:
    """A data source under test: its entry, its example spec, and sources built from it."""

    def __init__(self, entry: Any, example: Any, folder: Path) -> None:
        self.entry, self.folder = entry, folder
        self.label = "text" not in yields(entry)
        if example is None:
            raise _fail(entry.where, "builds", "it registered no example=; pass example='SPEC' (a tiny dataset the "
                                               "plugin ships, relative to its package) or example=make, where "
                                               "make(folder) writes a tiny dataset into the folder and returns its "
                                               "spec")
        if callable(example):
            try:
                example = example(folder)
            except Exception as exc:
                raise _fail(entry.where, "builds", f"its example maker raised {exc!r}") from exc
            if not isinstance(example, str):
                raise _fail(entry.where, "builds", f"its example maker returned {example!r}, not a spec string")
        elif example and not Path(example).is_absolute() and not generated(entry):
            found = importlib.util.find_spec(entry.plugin.module.split(":")[0])
            if found is not None and found.origin:
                example = str(Path(found.origin).parent / example)
        self.spec = str(example)

    def source(self, contract: str) -> DataSource:
        ctx = DataSourceContext(flag="example", label=self.label, train=True, seed=0, num_samples=EXAMPLE_SAMPLES,
                                image_size=32)
        try:
            source = self.entry.load()(self.spec, ctx)
        except ClipkitError as exc:
            raise _fail(self.entry.where, contract, f"building it from its example {self.spec!r} failed: {exc}") \
                from exc
        except Exception as exc:
            raise _fail(self.entry.where, contract, f"building it from its example {self.spec!r} raised {exc!r}") \
                from exc
        if not isinstance(source, DataSource):
            raise _fail(self.entry.where, contract, f"its factory returned {type(source).__name__}, not a "
                                                    f"clipkit.train.data_sources.DataSource")
        return source

    def stream(self, source: DataSource, *, batch: int, train: bool = True, rank: int = 0,
               world: int = 1) -> EpochStream:
        return EpochStream(source, batch_size=batch, transform=_pixels, tokenizer=None if self.label else _tokens,
                           train=train, seed=0, rank=rank, world=world, image_size=_SIDE)

    def read(self, contract: str, source: DataSource, *, batch: int = 1, train: bool = True, workers: int = 0,
             rank: int = 0, world: int = 1, progress: Optional[Progress] = None,
             exact: bool = True) -> Tuple[List[List[str]], Progress]:
        """The keys of every batch of one epoch, and the loader's closing progress."""
        loader = Loader(self.stream(source, batch=batch, train=train, rank=rank, world=world), workers, 0, None,
                        name=self.entry.name, exact_resume=exact)
        try:
            batches = [list(item["keys"]) for item in loader.epoch(0, progress)]
        except ContractError:
            raise
        except Exception as exc:
            raise _fail(self.entry.where, contract, f"reading its example raised {exc!r}; a sample that cannot be "
                                                    f"read is left out and counted, never raised") from exc
        return batches, loader.progress


@contextlib.contextmanager
def _example(entry: Any, section: Any) -> Iterator[_Example]:
    folder = Path(tempfile.mkdtemp(prefix="clipkit-data-source-"))
    try:
        yield _Example(entry, section if section is not None else entry.meta.get("example"), folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _keys(batches: List[List[str]]) -> List[str]:
    return [key for batch in batches for key in batch]


def _builds(entry: Any, section: Any) -> None:
    with _example(entry, section) as ex:
        units = ex.source("builds").units()
        if not isinstance(units, list) or not units:
            raise _fail(entry.where, "builds", f"units() of its example returned {units!r}; expected a non-empty list")


def _units(entry: Any, section: Any) -> None:
    with _example(entry, section) as ex:
        source = ex.source("units")
        first, again, rebuilt = source.units(), source.units(), ex.source("units").units()
        if first != again or first != rebuilt:
            raise _fail(entry.where, "units", "units() differs between two calls or two builds of the same spec; every "
                                              "process and data worker must see the same units to split them")


def _samples(entry: Any, section: Any) -> None:
    with _example(entry, section) as ex:
        source = ex.source("samples")
        counts: Dict[str, int] = {}
        raws = list(source.read(source.units(), counts))
        if not raws:
            raise _fail(entry.where, "samples", f"reading every unit of its example gave no samples (counted: "
                                                f"{counts})")
        wanted = ("__key__", "image", "label" if ex.label else "text")
        for raw in raws:
            if not isinstance(raw, dict) or any(k not in raw for k in wanted) or not isinstance(raw["__key__"], str):
                raise _fail(entry.where, "samples", f"read() yielded {_short(raw)}; a sample is a dict with a str "
                                                    f"'__key__', 'image' and '{wanted[2]}'")
        keys = [raw["__key__"] for raw in raws]
        if len(set(keys)) != len(keys):
            raise _fail(entry.where, "samples", "two samples of its example have the same '__key__' (keys seed each "
                                                "sample's augmentation and name it in errors)")
        batches, progress = ex.read("samples", source, train=False)
        if len(_keys(batches)) != len(raws) or progress.skipped():
            raise _fail(entry.where, "samples", f"of {len(raws)} samples of its example, {len(_keys(batches))} decode "
                                                f"(skipped: {progress.skipped()})")


def _short(value: Any) -> str:
    text = repr({k: type(v).__name__ for k, v in value.items()} if isinstance(value, dict) else value)
    return text[:200]


def _damage(folder: Path) -> int:
    """Cut every other file of the example to half its length and delete the second; how many files there were."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files[::2]:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    if len(files) > 1:
        files[1].unlink()
    return len(files)


def _counted_skips(entry: Any, section: Any) -> None:
    with _example(entry, section) as ex:
        whole, _ = ex.read("counted-skips", ex.source("counted-skips"), train=False)
        source = ex.source("counted-skips")  # built before the damage: it already knows what to read
        if not _damage(ex.folder):  # a shipped or generated example: nothing to damage
            return
        batches, progress = ex.read("counted-skips", source, train=False)
        lost = len(_keys(whole)) - len(_keys(batches))
        if lost > 0 and not progress.skipped():
            raise _fail(entry.where, "counted-skips", f"with its example's files damaged (cut short, one deleted), "
                                                      f"{lost} sample(s) went missing without being counted")


def _workers(entry: Any, section: Any) -> None:
    with _example(entry, section) as ex:
        source = ex.source("workers")
        whole = sorted(_keys(ex.read("workers", source)[0]))
        split = [_keys(ex.read("workers", source, rank=rank, world=2)[0]) for rank in (0, 1)]
        if set(split[0]) & set(split[1]) or sorted(split[0] + split[1]) != whole:
            raise _fail(entry.where, "workers", "split over 2 processes, its example's samples are not each read "
                                                "exactly once")
        forked = sorted(_keys(ex.read("workers", source, workers=2)[0]))
        if forked != whole:
            raise _fail(entry.where, "workers", f"read by 2 data-loader workers, its example gave {len(forked)} "
                                                f"samples ({len(set(forked))} distinct); read in one process, "
                                                f"{len(whole)}")


def _resume(entry: Any, section: Any) -> None:
    with _example(entry, section) as ex:
        source = ex.source("resume")
        exact = exact_resume(entry)
        whole, _ = ex.read("resume", source, batch=2, exact=exact)
        if len(whole) < 2:
            raise _fail(entry.where, "resume", f"its example gives {len(whole)} batch(es) of 2; it needs at least 2 "
                                               f"to check a resume")
        progress = Progress(consumed=[1], last_worker=0, batches=1, samples=len(whole[0]))
        rest, _ = ex.read("resume", source, batch=2, progress=progress, exact=exact)
        if exact and rest != whole[1:]:
            raise _fail(entry.where, "resume", "resumed after its first batch, an epoch of its example went on with "
                                               "other samples than the epoch read whole; the same units must give the "
                                               "same samples in the same order (or register exact_resume=False)")
        if not exact and sorted(_keys(rest)) != sorted(_keys(whole)):
            raise _fail(entry.where, "resume", "it declares exact_resume=False, but a resumed epoch did not read its "
                                               "data again from the beginning")


DATA_SOURCE_CHECKS = {"builds": _builds, "units": _units, "samples": _samples, "counted-skips": _counted_skips,
                      "workers": _workers, "resume": _resume}
