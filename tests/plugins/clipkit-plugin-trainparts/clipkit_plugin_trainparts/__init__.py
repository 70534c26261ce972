"""A third-party clipkit plugin with one part of each trainer kind: objective "clip_centred" (CLIP's loss
plus a term pulling the mean feature towards the origin), data source "pairlist" (JSON Lines of image
paths and captions) and reporter "scalarfile" (every scalar as a JSON line in the run folder).

No torch here: clipkit imports this module in every process, data-loader workers included.
"""
import json
from dataclasses import dataclass

import clipkit
from clipkit.plugin import option


@dataclass
class CentredOptions:
    """Options of objective "clip_centred" (``--objective-opt weight=...``)."""

    weight: float = option(0.5, "How much the centring term counts against the contrastive loss.", ge=0)


def make_example(folder):
    """Six small images and the ``.pairs`` file listing them, for the data source's contract cases."""
    from PIL import Image

    rows = []
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(folder / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": f"square {i}"}))
    (folder / "data.pairs").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(folder / "data.pairs")


@clipkit.hookimpl
def register_objectives(register):
    register("clip_centred", "clipkit_plugin_trainparts.parts:build_objective", config=CentredOptions)


@clipkit.hookimpl
def register_data_sources(register):
    register("pairlist", "clipkit_plugin_trainparts.parts:build_source", extensions=("pairs",),
             example=make_example)


@clipkit.hookimpl
def register_reporters(register):
    register("scalarfile", "clipkit_plugin_trainparts.parts:build_reporter", needs_folder=True)
