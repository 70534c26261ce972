"""Reading and writing WebDataset shards: plain tar files whose members ``KEY.EXT`` group into samples.

Reading streams each tar once (local files, ``pipe:`` commands and URLs through ``webdataset.gopen``),
keeps only the members a sample needs (image, caption, label) and never unpickles anything.
"""
from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tarfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger("clipkit.train")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
TEXT_EXT = "txt"
LABEL_EXT = "cls"
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # members are read into memory; a bigger one is skipped and counted
TOO_LARGE = object()  # stands for a member over MAX_MEMBER_BYTES, which is not read


def read_image_file(path: str) -> Any:
    """An image file's bytes (a CSV row's, a class folder's): ``None`` when it cannot be read, or
    :data:`TOO_LARGE` for one over :data:`MAX_MEMBER_BYTES`, which is not read."""
    try:
        if os.path.getsize(path) > MAX_MEMBER_BYTES:
            return TOO_LARGE
        return Path(path).read_bytes()
    except OSError:
        return None


def split_sources(spec: str) -> List[str]:
    return [s for s in spec.split("::") if s]


def expand(pattern: str) -> List[str]:
    """Brace-expand one source (``shard-{000..009}.tar``, ``{a,b}.tar``) into shard URLs."""
    from braceexpand import braceexpand  # installed with webdataset

    return list(braceexpand(pattern))


def expand_sources(spec: str) -> List[List[str]]:
    """``a/{0..3}.tar::b/{0..1}.tar`` -> the shard URLs of each source."""
    return [expand(source) for source in split_sources(spec)]


def _split_name(name: str) -> Tuple[str, str]:
    """WebDataset's convention: the key runs to the first dot of the file name, the rest is the extension."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower() if dot else ""


def open_url(url: str) -> BinaryIO:
    """A readable binary stream for a local path, ``file:``, ``pipe:`` command or URL."""
    if url.startswith("pipe:") or "://" in url:
        import webdataset

        stream: BinaryIO = webdataset.gopen(url, "rb")
        return stream
    return open(url.removeprefix("file:"), "rb")


class _Member(tarfile.TarInfo):
    """A tar header that records, on its archive, whether the end-of-archive marker was read.

    ``tarfile`` ends iteration alike on the zero block that closes an archive and on a file that simply
    stops (cut on a 512-byte boundary) or a garbage header: only the marker tells a whole shard.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> _Member:
        try:
            return super().fromtarfile(tar)
        # defined by tarfile but missing from typeshed's stubs; the one signal of the end-of-archive marker
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]
            # a mark of clipkit's own on the archive, read back by iter_shard
            tar.clipkit_end_seen = True  # type: ignore[attr-defined]
            raise


def iter_shard(url: str, wanted: Sequence[str], counts: Dict[str, int]) -> Iterator[Dict[str, Any]]:
    """Samples ``{"__key__", "__url__", EXT: bytes, ...}`` of one shard, in file order.

    Only members whose extension is in ``wanted`` are read. A shard that cannot be opened or read to
    its end, or that ends without the end-of-archive marker (a truncated file), counts one ``bad_shard``
    (its complete samples before the damage are kept); an oversized member is not read:
    :data:`TOO_LARGE` stands in for it.
    """
    current: Optional[Dict[str, Any]] = None
    stream, damaged = None, False
    try:
        stream = open_url(url)
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_Member) as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                # TarFile.members is the header cache tarfile keeps (missing from typeshed's stubs)
                tar.members.clear()  # type: ignore[attr-defined]  # a stream is read once: keep no headers, however many members a shard has
                if not info.isreg():
                    continue
                key, ext = _split_name(info.name)
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                if ext not in wanted:
                    continue
                if info.size > MAX_MEMBER_BYTES:
                    current[ext] = TOO_LARGE  # counted where the sample is decoded
                    continue
                handle = tar.extractfile(info)
                current[ext] = handle.read() if handle is not None else b""
            ended = getattr(tar, "clipkit_end_seen", False)
        if current is not None:
            yield current  # judged like any other sample: an incomplete one is counted by what it lacks
        if not ended:
            damaged = True
            counts["bad_shard"] = counts.get("bad_shard", 0) + 1
            logger.warning("shard %s ends without the tar end-of-archive marker: the file is truncated or damaged "
                           "after its last complete member, and whatever followed is lost", url)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        # the sample being read when the damage hit is incomplete: dropped with the shard's rest
        damaged = True
        counts["bad_shard"] = counts.get("bad_shard", 0) + 1
        logger.warning("skipping the rest of shard %s: %s", url, exc)
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as exc:  # a pipe: command that failed reports here
                if not damaged:
                    counts["bad_shard"] = counts.get("bad_shard", 0) + 1
                logger.warning("shard %s: %s", url, exc)


def _sizes_from_files(urls: List[str]) -> Optional[int]:
    """Sample count from ``sizes.json`` (``{shard file name: n}``) or ``__len__`` beside local shards."""
    if not urls or urls[0].startswith("pipe:") or "://" in urls[0]:
        return None
    folder = Path(urls[0].removeprefix("file:")).parent
    sizes = folder / "sizes.json"
    if sizes.is_file():
        table = json.loads(sizes.read_text(encoding="utf-8"))
        try:
            return sum(int(table[os.path.basename(u)]) for u in urls)
        except KeyError as exc:
            logger.warning("%s has no entry for shard %s; counting samples instead", sizes, exc)
            return None
    length = folder / "__len__"
    if length.is_file():
        return int(length.read_text(encoding="utf-8").strip())
    return None


def count_samples(spec: str, need: str = TEXT_EXT) -> Tuple[int, str]:
    """Samples in a shard spec and how the number was found (``sizes.json``/``__len__`` or counting)."""
    total, how = 0, set()
    for urls in expand_sources(spec):
        known = _sizes_from_files(urls)
        if known is not None:
            total += known
            how.add("sizes.json/__len__")
            continue
        start = time.perf_counter()
        counts: Dict[str, int] = {}
        n = sum(1 for s in _all(urls, counts) if need in s and any(e in s for e in IMAGE_EXTS))
        total += n
        how.add(f"counted in {time.perf_counter() - start:.1f} s")
    return total, ", ".join(sorted(how))


def _all(urls: Iterable[str], counts: Dict[str, int]) -> Iterator[Dict[str, Any]]:
    for url in urls:
        yield from iter_shard(url, (TEXT_EXT, LABEL_EXT) + IMAGE_EXTS, counts)


def write_shards(samples: Iterable[Dict[str, Any]], folder: Path, *, per_shard: int, prefix: str = "") -> List[Path]:
    """Write samples ``{"__key__": str, EXT: bytes|str}`` as ``{prefix}{00000..}.tar`` plus ``sizes.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: List[Path] = []
    sizes: Dict[str, int] = {}
    tar = None
    count = 0

    def close() -> None:
        if tar is not None:
            tar.close()
            sizes[paths[-1].name] = count

    for sample in samples:
        if tar is None or count == per_shard:
            close()
            paths.append(folder / f"{prefix}{len(paths):05d}.tar")
            tar, count = tarfile.open(paths[-1], "w"), 0
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
        count += 1
    close()
    (folder / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    return paths
