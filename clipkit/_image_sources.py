"""Image collections for inference (``clipkit embed`` and friends): a folder, WebDataset shards or a CSV.

A collection is an ordered list of *chunks* (a run of files, or one shard) whose samples come out as
``(id, raw image)`` in a fixed order, so a chunk is the unit of work a loader worker takes and the unit
an interrupted run resumes from. Raw images are what :func:`clipkit.train.data.decode_image` takes, so
they go through the trainer's hardened decoding (pixel limit, formats, counted failures).
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple, Union

from .errors import DataError, explain_os_error
from .train import shards as wds

#: Images per chunk of a folder or CSV (a shard is always one chunk).
DEFAULT_CHUNK_SIZE = 1024


@dataclass(frozen=True)
class ImageCollection:
    """The images of one source: ``kind`` is ``folder``, ``shards`` or ``csv``; each chunk is a list of
    ``(id, file path)`` (folder, CSV) or a shard URL (shards)."""

    kind: str
    spec: str
    chunks: Sequence[Union[List[Tuple[str, str]], str]]

    def fingerprint(self) -> str:
        """A digest of what the collection lists (ids, files, shards): a different listing is different input."""
        digest = hashlib.sha256(self.kind.encode())
        for chunk in self.chunks:
            items = [chunk] if isinstance(chunk, str) else [part for pair in chunk for part in pair]
            for item in items:
                digest.update(b"\0" + item.encode("utf-8", "surrogateescape"))
            digest.update(b"\1")
        return digest.hexdigest()

    def size(self, chunk: int) -> Union[int, None]:
        """How many samples chunk ``chunk`` lists (``None`` for a shard: known only once read)."""
        listed = self.chunks[chunk]
        return None if isinstance(listed, str) else len(listed)

    def read(self, chunk: int, counts: Dict[str, int]) -> Iterator[Tuple[str, Any]]:
        """``(id, raw image)`` of one chunk in order; raw is bytes, ``None`` (unreadable file) or
        :data:`clipkit.train.shards.TOO_LARGE`. Damaged shards are counted in ``counts`` (``bad_shard``)."""
        listed = self.chunks[chunk]
        if isinstance(listed, str):
            for raw in wds.iter_shard(listed, wds.IMAGE_EXTS, counts):
                yield f"{listed}:{raw['__key__']}", next((raw[e] for e in wds.IMAGE_EXTS if e in raw), None)
            return
        for ident, path in listed:
            yield ident, wds.read_image_file(path)


def _runs(items: List[Tuple[str, str]], size: int) -> List[List[Tuple[str, str]]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def open_images(source: Union[str, os.PathLike[str]], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                csv_img_key: str = "filepath", csv_separator: str = "\t") -> ImageCollection:
    """The images ``source`` names: a folder (every file with an image extension, recursively, sorted by
    relative path, which is its id), a ``.csv``/``.tsv`` file (its ``csv_img_key`` column; relative paths
    are read from the CSV's folder unless they exist from the working directory; the id is the path as
    written), or WebDataset shards (``data/{00000..00009}.tar``, several joined by ``::``; ids are
    ``SHARD:KEY``). Raises :class:`DataError` naming the source when it is none of these."""
    spec = os.fspath(source)
    path = Path(spec)
    if path.is_dir():
        files = sorted((f.relative_to(path).as_posix(), str(f)) for f in path.rglob("*")
                       if f.is_file() and f.suffix.lower().lstrip(".") in wds.IMAGE_EXTS)
        if not files:
            raise DataError(f"{spec}: the folder holds no images (files ending in "
                            f"{', '.join('.' + e for e in wds.IMAGE_EXTS)})")
        return ImageCollection("folder", spec, _runs(files, chunk_size))
    if path.suffix.lower() in (".csv", ".tsv"):
        return ImageCollection("csv", spec, _runs(_csv_images(path, csv_img_key, csv_separator), chunk_size))
    if path.is_file() and not spec.endswith(".tar"):
        raise DataError(f"{spec}: not an image folder, .tar shards or a .csv/.tsv file")
    urls = [u for urls in wds.expand_sources(spec) for u in urls]
    local = [u for u in urls if not (u.startswith("pipe:") or "://" in u)]
    missing = [u for u in local if not os.path.exists(u.removeprefix("file:"))]
    if not urls or missing:
        first = missing[0] if missing else spec
        raise DataError(f"{spec}: not found" if urls == [spec] else f"{spec}: {len(missing)} shard(s) not found, "
                        f"e.g. {first}")
    return ImageCollection("shards", spec, urls)


def _csv_images(path: Path, img_key: str, separator: str) -> List[Tuple[str, str]]:
    try:
        with explain_os_error(str(path), DataError), open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            columns = reader.fieldnames or []
            if img_key not in columns:
                raise DataError(f"{path}: column {img_key!r} not found; columns found with --csv-separator "
                                f"{separator!r}: {columns} (set --csv-img-key/--csv-separator)")
            written = [row[img_key] or "" for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file: {exc}") from exc
    base = path.parent
    return [(p, p if os.path.isabs(p) or os.path.exists(p) else str(base / p)) for p in written]
