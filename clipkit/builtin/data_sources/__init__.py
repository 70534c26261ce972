"""Builtin data sources (``clipkit-train --dataset-type``): ``webdataset``, ``csv``, ``synthetic``, and the
class ``folder`` that zero-shot evaluation reads.

Registered through the same hook, with the same lazy targets, as a third party's data source; the
sources themselves are in :mod:`clipkit.train.data`. The example makers below write the tiny datasets
the contract cases read (``clipkit.testing``). No torch here, nor PIL until an example is made.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Tuple

from ...hookspecs import Register, hookimpl

_SIDE = 16  # pixels: example images only need to decode


def _images(n: int) -> Iterator[Tuple[bytes, str]]:
    """``n`` distinct small PNGs and their captions."""
    import io

    from PIL import Image

    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", (_SIDE, _SIDE), (40 * i % 256, 90, 200)).save(buffer, format="PNG")
        yield buffer.getvalue(), f"a square of shade {i}"


def example_shards(folder: Path) -> str:
    """Three shards of four captioned (and labelled) images; their brace pattern."""
    from ...train.shards import write_shards

    samples = ({"__key__": f"s{i:03d}", "png": png, "txt": text, "cls": str(i % 3)}
               for i, (png, text) in enumerate(_images(12)))
    write_shards(samples, folder, per_shard=4)
    return f"{folder}/{{00000..00002}}.tar"


def example_csv(folder: Path) -> str:
    """A tab-separated file of ten image paths (relative to it) and captions; its path."""
    rows = ["filepath\ttitle"]
    for i, (png, text) in enumerate(_images(10)):
        (folder / f"{i}.png").write_bytes(png)
        rows.append(f"{i}.png\t{text}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(folder / "pairs.csv")


def example_folder(folder: Path) -> str:
    """Three class folders of four images each; the root folder."""
    for i, (png, _) in enumerate(_images(12)):
        (folder / f"class{i % 3}").mkdir(exist_ok=True)
        (folder / f"class{i % 3}" / f"{i}.png").write_bytes(png)
    return str(folder)


@hookimpl
def register_data_sources(register: Register) -> None:
    register("webdataset", "clipkit.train.data:ShardSource.build", extensions=("tar",), prefixes=("pipe:",),
             yields=("text", "label"), example=example_shards)
    register("csv", "clipkit.train.data:CsvSource.build", extensions=("csv", "tsv"), example=example_csv)
    register("synthetic", "clipkit.train.data:SyntheticSource.build", generated=True, example="")
    register("folder", "clipkit.train.data:FolderSource.build", folders=True, yields=("label",),
             example=example_folder)
