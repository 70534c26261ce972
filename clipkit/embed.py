"""Embedding images and texts with a model: :func:`embed_images`, :func:`embed_texts`, and the resumable run
behind ``clipkit embed`` (:func:`embed_to_folder`).

An output folder holds ``embeddings.npy`` (float32 ``[N, D]``), ``ids.txt`` (one id a line, same order) and
``meta.json``. While a run is under way it also holds ``progress.json`` and ``parts/``: every finished chunk
of the input is written as a part file before ``progress.json`` (replaced atomically) records it, so a run
killed at any moment resumes at its first unrecorded chunk, and because each chunk is batched on its own,
the resumed run's files are byte for byte those of an uninterrupted one. See docs/inference.md.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ._image_sources import DEFAULT_CHUNK_SIZE, ImageCollection, open_images
from ._precision import PRECISIONS
from .errors import ClipkitError, DataError, explain_os_error

if TYPE_CHECKING:
    from tqdm import tqdm

logger = logging.getLogger("clipkit.embed")

EMBEDDINGS, IDS, META, PROGRESS, PARTS = "embeddings.npy", "ids.txt", "meta.json", "progress.json", "parts"
# an id that would break ids.txt's one-id-a-line format (a newline in a file name) is skipped and counted
BAD_ID = "bad_id"

# (chunk index, float32 embeddings [n, D], ids, skip counts by kind)
ChunkResult = Tuple[int, np.ndarray, List[str], Dict[str, int]]


def _count(counts: Dict[str, int], kind: str) -> None:
    counts[kind] = counts.get(kind, 0) + 1


def _writable_id(ident: str) -> bool:
    if "\n" in ident or "\r" in ident:
        return False
    try:
        ident.encode("utf-8")
    except UnicodeEncodeError:  # an undecodable file name (surrogate escapes)
        return False
    return True


class _Encoder:
    """Runs a model's ``encode_image``/``encode_text`` under a precision and returns float32 numpy rows."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device, precision: str,
                 normalize: bool) -> None:
        from .train.build import precision_setup

        if precision not in PRECISIONS:
            raise ClipkitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.encode, self.device, self.normalize = encode, device, normalize
        self.autocast_dtype, _, self.input_dtype = precision_setup(precision, device)

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        batch = batch.to(self.device)
        if self.input_dtype is not None and batch.is_floating_point():
            batch = batch.to(self.input_dtype)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            features = self.encode(batch)
        features = features.float()  # normalised in fp32 whatever the precision of the forward pass
        if self.normalize:
            features = F.normalize(features, dim=-1)
        rows: np.ndarray = features.cpu().numpy()
        return rows


def _device_of(model: torch.nn.Module, device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is not None:
        return torch.device(device)
    return next(model.parameters(), torch.empty(0)).device


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the duration, then as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _bar(total: Optional[int], initial: int, enabled: bool, unit: str) -> Optional[tqdm[Any]]:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, file=sys.stderr)


# -- images --------------------------------------------------------------------------------------------
# one batch: (chunk, images or None, ids, counts or None)
_ImageBatch = Tuple[int, Optional[torch.Tensor], List[str], Optional[Dict[str, int]]]


class _ImageChunks(IterableDataset[_ImageBatch]):
    """Decodes and preprocesses whole chunks: worker ``w`` of ``n`` takes every ``n``-th of ``chunks`` and
    yields ``(chunk, images [b, C, H, W] or None, ids, counts or None)`` batches, ``counts`` on a chunk's last."""

    def __init__(self, collection: ImageCollection, chunks: Sequence[int], preprocess: Callable[[Any], torch.Tensor],
                 batch_size: int,
                 max_pixels: int) -> None:
        self.collection, self.chunks, self.preprocess = collection, list(chunks), preprocess
        self.batch_size, self.max_pixels = batch_size, max_pixels

    def __iter__(self) -> Iterator[_ImageBatch]:
        from .train.data import decode_image

        info = get_worker_info()
        mine = self.chunks[info.id::info.num_workers] if info is not None else self.chunks
        for chunk in mine:
            counts: Dict[str, int] = {}
            images: List[torch.Tensor] = []
            ids: List[str] = []
            for ident, raw in self.collection.read(chunk, counts):
                if not _writable_id(ident):
                    _count(counts, BAD_ID)
                    continue
                image = decode_image(raw, counts, max_pixels=self.max_pixels)
                if image is None:
                    continue
                try:
                    images.append(self.preprocess(image))
                except Exception:  # a decodable image the transform cannot take (a 0-pixel side) is that image's
                    _count(counts, "bad_image")
                    continue
                ids.append(ident)
                if len(ids) == self.batch_size:
                    yield chunk, torch.stack(images), ids, None
                    images, ids = [], []
            yield chunk, torch.stack(images) if images else None, ids, counts


def _max_pixels(model: torch.nn.Module) -> int:
    from .train.data import max_image_pixels

    side = getattr(getattr(model, "visual", None), "image_size", None)
    return max_image_pixels(max(side) if isinstance(side, (tuple, list)) else side)


def _image_chunks(model: torch.nn.Module, preprocess: Callable[[Any], torch.Tensor], collection: ImageCollection,
                  chunks: Sequence[int], *, batch_size: int,
                  workers: int, device: torch.device, precision: str, normalize: bool, dim: int,
                  bar: Optional[tqdm[Any]] = None) -> Iterator[ChunkResult]:
    """Each of ``chunks`` embedded, in the order they complete (workers finish chunks out of order)."""
    encoder = _Encoder(cast(Callable[[torch.Tensor], torch.Tensor], model.encode_image), device, precision, normalize)
    loader = DataLoader(_ImageChunks(collection, chunks, preprocess, batch_size, _max_pixels(model)),
                        batch_size=None, num_workers=workers, pin_memory=device.type == "cuda")
    pending: Dict[int, Tuple[List[np.ndarray], List[str]]] = {}
    for chunk, images, ids, counts in loader:
        rows, chunk_ids = pending.setdefault(chunk, ([], []))
        if images is not None:
            rows.append(encoder(images))
            chunk_ids.extend(ids)
            if bar is not None:
                bar.update(len(ids))
        if counts is not None:
            del pending[chunk]
            if bar is not None and sum(counts.values()) and collection.kind != "shards":
                bar.update(sum(v for k, v in counts.items() if k != "bad_shard"))
            yield chunk, _stack(rows, dim), chunk_ids, counts


def _embed_dim(model: torch.nn.Module) -> int:
    # nn.Module types unknown attributes as Tensor | Module; a clipkit model's embed_dim is an int
    return cast(int, model.embed_dim)


def _stack(rows: List[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)


def embed_images(model: torch.nn.Module, preprocess: Callable[[Any], torch.Tensor], source: Union[str, os.PathLike[str]], *,
                 batch_size: int = 64, workers: int = 0, device: Optional[Union[str, torch.device]] = None,
                 normalize: bool = True, precision: str = "fp32", csv_img_key: str = "filepath",
                 csv_separator: str = "\t", progress: bool = False) -> Tuple[np.ndarray, List[str], Dict[str, int]]:
    """Embed every image of ``source`` with ``model.encode_image``.

    ``source`` is an image folder (recursively; ids are paths relative to it, sorted), WebDataset shards
    (``shards/{00000..00009}.tar``; ids ``SHARD:KEY``) or a ``.csv``/``.tsv`` file of image paths (column
    ``csv_img_key``; ids are the paths as written). ``preprocess`` is the model's evaluation transform
    (the third value of :func:`clipkit.create_model_and_transforms`). Images are decoded by ``workers``
    processes (0: in this one) with the trainer's safeguards, ``batch_size`` at a time, and encoded on
    ``device`` (default: where the model's parameters are) under ``precision`` (``fp32``, ``bf16``,
    ``fp16`` or ``amp``: autocast). The model is in eval mode while it runs.

    Returns ``(embeddings, ids, skipped)``: float32 ``[N, D]`` rows, L2-normalised unless
    ``normalize=False``; the ``N`` ids in the same order; and how many images were skipped, by kind
    (``bad_image``, ``empty_image``, ``too_large``, ``missing_image``, ``bad_shard``, ``bad_id``).
    """
    collection = open_images(source, csv_img_key=csv_img_key, csv_separator=csv_separator)
    device = _device_of(model, device)
    chunks = list(range(len(collection.chunks)))
    results: Dict[int, ChunkResult] = {}
    bar = _bar(_known_total(collection, chunks), 0, progress, "img")
    with _evaluating(model):
        for result in _image_chunks(model, preprocess, collection, chunks, batch_size=batch_size, workers=workers,
                                    device=device, precision=precision, normalize=normalize,
                                    dim=_embed_dim(model), bar=bar):
            results[result[0]] = result
    if bar is not None:
        bar.close()
    ordered = [results[c] for c in chunks]
    skipped = _sum_counts(r[3] for r in ordered)
    _log_skipped(skipped, collection.spec)
    return (_stack([r[1] for r in ordered], _embed_dim(model)), [i for r in ordered for i in r[2]], skipped)


def _known_total(collection: ImageCollection, chunks: Sequence[int]) -> Optional[int]:
    sizes = [collection.size(c) for c in chunks]
    return sum(n for n in sizes if n is not None) if None not in sizes else None


def _sum_counts(all_counts: Iterable[Dict[str, int]]) -> Dict[str, int]:
    total: Dict[str, int] = {}
    for counts in all_counts:
        for kind, n in counts.items():
            total[kind] = total.get(kind, 0) + n
    return dict(sorted(total.items()))


def _log_skipped(skipped: Dict[str, int], where: str) -> None:
    if skipped:
        logger.warning("%s: skipped %d input(s) that cannot be used: %s", where, sum(skipped.values()),
                       ", ".join(f"{kind} {n}" for kind, n in skipped.items()))


# -- texts ---------------------------------------------------------------------------------------------
def _text_chunks(model: torch.nn.Module, tokenizer: Callable[[List[str]], torch.Tensor], ids: Sequence[str],
                 texts: Sequence[str], chunk_size: int,
                 chunks: Sequence[int], *, batch_size: int, device: torch.device, precision: str,
                 normalize: bool, bar: Optional[tqdm[Any]] = None) -> Iterator[ChunkResult]:
    encoder = _Encoder(cast(Callable[[torch.Tensor], torch.Tensor], model.encode_text), device, precision, normalize)
    for chunk in chunks:
        lo, hi = chunk * chunk_size, min(len(texts), (chunk + 1) * chunk_size)
        rows = []
        for start in range(lo, hi, batch_size):
            batch = list(texts[start:min(hi, start + batch_size)])
            rows.append(encoder(tokenizer(batch)))
            if bar is not None:
                bar.update(len(batch))
        yield chunk, _stack(rows, _embed_dim(model)), list(ids[lo:hi]), {}


def embed_texts(model: torch.nn.Module, tokenizer: Callable[[List[str]], torch.Tensor], texts: Sequence[str], *,
                batch_size: int = 256,
                device: Optional[Union[str, torch.device]] = None, normalize: bool = True,
                precision: str = "fp32", progress: bool = False) -> np.ndarray:
    """Embed ``texts`` with ``model.encode_text`` after ``tokenizer`` (:func:`clipkit.get_tokenizer`).

    Returns float32 ``[len(texts), D]`` rows in the order given, L2-normalised unless ``normalize=False``;
    ``device``, ``precision`` and eval mode as :func:`embed_images`.
    """
    texts = list(texts)
    device = _device_of(model, device)
    bar = _bar(len(texts), 0, progress, "text")
    with _evaluating(model):
        rows = [r[1] for r in _text_chunks(model, tokenizer, [""] * len(texts), texts, max(1, len(texts)), [0],
                                           batch_size=batch_size, device=device, precision=precision,
                                           normalize=normalize, bar=bar)]
    if bar is not None:
        bar.close()
    return rows[0]


def read_texts(path: Union[str, os.PathLike[str]], *, text_key: str = "text", id_key: Optional[str] = None,
               csv_text_key: str = "title", csv_separator: str = "\t") -> Tuple[List[str], List[str], Dict[str, int]]:
    """``(ids, texts, skipped)`` from a ``.txt`` file (one text a line), ``.jsonl`` (field ``text_key`` of each
    object) or ``.csv``/``.tsv`` (column ``csv_text_key``). Ids are line numbers (1 is the first line;
    a CSV's header is line 1), or the ``id_key`` field/column when given. Blank texts are skipped and
    counted (``empty_text``), as are JSONL lines without the field (``missing_text``) and ids that
    cannot be one line of ids.txt (``bad_id``). A malformed file is a :class:`DataError` naming file and line.
    """
    path = Path(path)
    ids: List[str] = []
    texts: List[str] = []
    skipped: Dict[str, int] = {}

    def add(ident: Any, text: Any, line: int) -> None:
        if not isinstance(text, str):
            _count(skipped, "missing_text")
        elif not text.strip():
            _count(skipped, "empty_text")
        elif not _writable_id(str(ident)):
            _count(skipped, BAD_ID)
        else:
            ids.append(str(ident))
            texts.append(text)

    suffix = path.suffix.lower()
    try:
        with explain_os_error(str(path), DataError), \
                open(path, newline="" if suffix in (".csv", ".tsv") else None, encoding="utf-8") as f:
            if suffix == ".jsonl":
                for line, text in enumerate(f, 1):
                    if not text.strip():
                        continue
                    try:
                        record = json.loads(text)
                    except ValueError as exc:
                        raise DataError(f"{path}:{line}: not a JSON object: {exc}") from exc
                    if not isinstance(record, dict):
                        raise DataError(f"{path}:{line}: not a JSON object")
                    if id_key is not None and id_key not in record:
                        raise DataError(f"{path}:{line}: no id field {id_key!r}")
                    add(record[id_key] if id_key is not None else line, record.get(text_key), line)
            elif suffix in (".csv", ".tsv"):
                reader = csv.DictReader(f, delimiter=csv_separator)
                wanted = [k for k in (csv_text_key, id_key) if k is not None and k not in (reader.fieldnames or [])]
                if wanted:
                    raise DataError(f"{path}: column(s) {', '.join(map(repr, wanted))} not found; columns found "
                                    f"with --csv-separator {csv_separator!r}: {reader.fieldnames or []}")
                for row in reader:
                    add(row[id_key] if id_key is not None else reader.line_num, row[csv_text_key], reader.line_num)
            else:
                for line, text in enumerate(f, 1):
                    add(line, text.rstrip("\r\n"), line)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file: {exc}") from exc
    if suffix == ".jsonl" and not texts and skipped.get("missing_text"):
        raise DataError(f"{path}: no line has a text field {text_key!r} (set --text-key)")
    return ids, texts, skipped


# -- the resumable output folder ---------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"))


def _write_ids(path: Path, ids: Sequence[str]) -> None:
    _atomic_write(path, lambda f: f.write("".join(i + "\n" for i in ids)))


def _part(out: Path, chunk: int) -> Tuple[Path, Path]:
    return out / PARTS / f"{chunk:06d}.npy", out / PARTS / f"{chunk:06d}.ids.txt"


def _write_part(out: Path, chunk: int, rows: np.ndarray, ids: Sequence[str]) -> None:
    rows_path, ids_path = _part(out, chunk)
    _atomic_write(rows_path, lambda f: np.save(f, rows, allow_pickle=False), binary=True)
    _write_ids(ids_path, ids)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _difference(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    first = ("model", "pretrained", "images", "texts", "inputs")  # what a user most likely changed
    key = next(k for k in [*first, *sorted(set(old) | set(new))] if old.get(k) != new.get(k))
    return f"{key} {old.get(key)!r}, now {new.get(key)!r}"


def _clear(out: Path) -> None:
    for name in (EMBEDDINGS, IDS, META, PROGRESS):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)


def _prepare(out: Path, run: Dict[str, Any], force: bool) -> Optional[Dict[str, Any]]:
    """The progress record to resume (``{}`` for a fresh start), or ``None`` when ``out`` already holds this
    finished run. A folder holding another run, or files that are not a run's, is an error unless ``force``."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out is a file; it must be a folder (new, or one an earlier run wrote)")
    if force and out.is_dir():
        _clear(out)
    meta, progress = _read_json(out / META), _read_json(out / PROGRESS)
    if meta is not None and meta.get("run") == run and (out / EMBEDDINGS).is_file() and (out / IDS).is_file():
        shutil.rmtree(out / PARTS, ignore_errors=True)  # left behind by a run killed while it tidied up
        (out / PROGRESS).unlink(missing_ok=True)
        return None
    held = progress if progress is not None else meta
    if held is not None:
        if held.get("run") != run:
            state = "an unfinished" if progress is not None else "a finished"
            raise DataError(f"{out}: holds {state} embed run that differs ({_difference(held.get('run') or {}, run)}); "
                            f"rerun that command to finish it, choose another --out, or pass --force to start over")
        return progress if progress is not None else {}
    if not force and out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out}: --out is a folder that is not empty and holds no embed run; choose another, "
                        f"or pass --force to write into it")
    return {}


def _recorded(out: Path, done: Any, total_chunks: int) -> Dict[str, Dict[str, Any]]:
    """The finished chunks of a progress record whose part files are there; an entry that is not what this
    code writes (a record edited by hand) only means that chunk is computed again."""
    kept: Dict[str, Dict[str, Any]] = {}
    for chunk in range(total_chunks):
        entry = done.get(str(chunk)) if isinstance(done, dict) else None
        if (isinstance(entry, dict) and isinstance(entry.get("count"), int) and isinstance(entry.get("skipped"), dict)
                and all(path.is_file() for path in _part(out, chunk))):
            kept[str(chunk)] = entry
    return kept


def embed_to_folder(out: Union[str, os.PathLike[str]], run: Dict[str, Any], total_chunks: int,
                    compute: Callable[[List[int]], Iterator[ChunkResult]], *, dim: int, force: bool = False,
                    on_start: Optional[Callable[[List[int]], None]] = None) -> Optional[Dict[str, Any]]:
    """Write ``compute``'s chunks into ``out`` resumably and assemble the final files; returns meta.json's
    content, or ``None`` when ``out`` already held this very run, finished (nothing to do).

    ``run`` describes everything that decides the output (model, weights, inputs and their listing,
    options): a folder holding a run with another description is a :class:`DataError`, unless ``force``.
    ``compute(chunks)`` yields a :data:`ChunkResult` for each of the chunks it is given, in any order.
    """
    out = Path(out)
    progress = _prepare(out, run, force)
    if progress is None:
        return None
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    done = _recorded(out, progress.get("done"), total_chunks)
    todo = [c for c in range(total_chunks) if str(c) not in done]
    if on_start is not None:
        on_start(todo)
    if todo:
        for chunk, rows, ids, counts in compute(todo):
            _write_part(out, chunk, rows, ids)
            done[str(chunk)] = {"count": len(ids), "skipped": counts}
            _write_json(out / PROGRESS, {"run": run, "chunks": total_chunks, "done": done})
    return _assemble(out, run, total_chunks, done, dim)


def _assemble(out: Path, run: Dict[str, Any], total_chunks: int, done: Dict[str, Dict[str, Any]],
              dim: int) -> Dict[str, Any]:
    count = sum(done[str(c)]["count"] for c in range(total_chunks))
    tmp = out / (EMBEDDINGS + ".tmp")
    rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
    ids: List[str] = []
    at = 0
    for chunk in range(total_chunks):
        rows_path, ids_path = _part(out, chunk)
        part = np.load(rows_path, allow_pickle=False)
        rows[at:at + len(part)] = part
        at += len(part)
        ids.extend(ids_path.read_text(encoding="utf-8").splitlines())
    rows.flush()
    del rows
    os.replace(tmp, out / EMBEDDINGS)
    _write_ids(out / IDS, ids)
    skipped = _sum_counts(done[str(c)]["skipped"] for c in range(total_chunks))
    meta = {"model": run["model"], "pretrained": run["pretrained"], "count": count, "dim": dim,
            "normalized": run["normalized"], "skipped": skipped, "run": run}
    _write_json(out / META, meta)  # last: a meta.json means the folder is complete
    shutil.rmtree(out / PARTS, ignore_errors=True)
    (out / PROGRESS).unlink(missing_ok=True)
    return meta


def _digest(items: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def run_embed(model_name: str, out: Union[str, os.PathLike[str]], *, pretrained: Optional[str] = None,
              images: Optional[str] = None, texts: Optional[str] = None, batch_size: int = 64, workers: int = 0,
              device: Optional[str] = None, precision: str = "fp32", normalize: bool = True,
              chunk_size: int = DEFAULT_CHUNK_SIZE, csv_img_key: str = "filepath", csv_text_key: str = "title",
              csv_separator: str = "\t", text_key: str = "text", id_key: Optional[str] = None,
              force: bool = False, progress: bool = False) -> Optional[Dict[str, Any]]:
    """``clipkit embed``: embed ``images`` or ``texts`` (exactly one) with the named model into folder ``out``,
    resuming an interrupted run of the same command; returns meta.json's content (``None``: already done).
    ``device`` defaults to ``cuda`` when there is one."""
    from .factory import create_model_and_transforms
    from .tokenizer import get_tokenizer

    source = images if images is not None else texts
    if source is None or (images is not None and texts is not None):
        raise ClipkitError("give exactly one of --images SRC and --texts FILE")
    if precision not in PRECISIONS:
        raise ClipkitError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    run: Dict[str, Any] = {"model": model_name, "pretrained": pretrained, "normalized": normalize,
                           "precision": precision, "batch_size": batch_size}
    if images is not None:
        collection = open_images(images, chunk_size=chunk_size, csv_img_key=csv_img_key, csv_separator=csv_separator)
        run.update(images=images, inputs=collection.fingerprint(), chunk_size=chunk_size)
        total = len(collection.chunks)
    else:
        ids, text_list, text_skipped = read_texts(source, text_key=text_key, id_key=id_key,
                                                  csv_text_key=csv_text_key, csv_separator=csv_separator)
        run.update(texts=texts, inputs=_digest(ids + text_list), chunk_size=chunk_size)
        total = max(1, -(-len(text_list) // chunk_size))
    if _prepare(Path(out), run, force) is None:  # checked before the model loads, which may take minutes
        return None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # a model without saved weights is initialised at random: seeded, so a resumed run continues with the same one
    torch.manual_seed(0)
    model, _, preprocess = create_model_and_transforms(model_name, pretrained=pretrained, precision=precision,
                                                       device=device)
    model.eval()
    torch_device = torch.device(device)
    bar = None

    def start(todo: List[int]) -> None:
        nonlocal bar
        if images is not None:
            total_items = _known_total(collection, range(total))
            left = _known_total(collection, todo)
            bar = _bar(total_items, (total_items or 0) - (left or 0) if total_items is not None else 0, progress,
                       "img")
        else:
            left = sum(len(text_list[c * chunk_size:(c + 1) * chunk_size]) for c in todo)
            bar = _bar(len(text_list), len(text_list) - left, progress, "text")

    if images is not None:
        def compute(todo: List[int]) -> Iterator[ChunkResult]:
            return _image_chunks(model, preprocess, collection, todo, batch_size=batch_size, workers=workers,
                                 device=torch_device, precision=precision, normalize=normalize,
                                 dim=_embed_dim(model), bar=bar)
    else:
        tokenizer = get_tokenizer(model_name)

        def compute(todo: List[int]) -> Iterator[ChunkResult]:
            for chunk, rows, chunk_ids, counts in _text_chunks(
                    model, tokenizer, ids, text_list, chunk_size, todo, batch_size=batch_size, device=torch_device,
                    precision=precision, normalize=normalize, bar=bar):
                yield chunk, rows, chunk_ids, text_skipped if chunk == 0 else counts

    try:
        meta = embed_to_folder(out, run, total, compute, dim=_embed_dim(model), on_start=start)
    finally:
        if bar is not None:
            bar.close()
    if meta is not None:
        _log_skipped(meta["skipped"], source)
    return meta
