"""The parts of clipkit-plugin-trainparts (torch is imported here, never by the plugin module)."""
import json
from pathlib import Path

import torch

from clipkit.errors import DataError
from clipkit.plugin import DataSource
from clipkit.train.loss import ClipLoss
from clipkit.train.objectives import FEATURES, BaseObjective


class CentredObjective(BaseObjective):
    """Terms ``contrastive_loss`` (OpenCLIP's) and ``centring`` (squared norm of the mean feature)."""

    name = "clip_centred"
    needs = FEATURES

    def __init__(self, weight, ctx):
        self.weight = weight
        self.clip = ClipLoss(rank=ctx.rank, world=ctx.world)

    def __call__(self, outputs):
        image, text, scale = self.inputs(outputs)
        mean = torch.cat([image, text]).float().mean(0)
        return {"contrastive_loss": self.clip(image, text, scale), "centring": self.weight * mean.square().sum()}


def build_objective(options, ctx):
    return CentredObjective(options.weight, ctx)


class PairListSource(DataSource):
    """One sample per line of a JSON Lines file ``{"image": path, "caption": text}``.

    Every sample read is also appended, by key, to ``SPEC.read`` beside the file, so a test can count
    exactly what the trainer took from this source (data-loader workers are other processes).
    """

    unit = "line"

    def __init__(self, spec):
        path = Path(spec)
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        self.rows = [json.loads(line) for line in lines]
        self.base, self.log = path.parent, path.with_name(path.name + ".read")

    def units(self):
        return list(range(len(self.rows)))

    def read(self, units, counts):
        for i in units:
            row = self.rows[i]
            image = self.base / row["image"]
            with open(self.log, "a", encoding="utf-8") as log:
                log.write(f"line{i}\n")
            yield {"__key__": f"line{i}", "image": image.read_bytes() if image.is_file() else None,
                   "text": row["caption"], "label": None}


def build_source(spec, ctx):
    return PairListSource(spec)


class ScalarFileReporter:
    """Each ``scalars`` call as one JSON line ``{"step": n, "values": {...}}`` of ``RUN/scalars.jsonl``."""

    def __init__(self, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def scalars(self, values, step):
        self.file.write(json.dumps({"step": step, "values": values}) + "\n")
        self.file.flush()

    def result(self, metrics):
        """Evaluation results also arrive as ``val/`` scalars."""

    def close(self):
        self.file.close()  # closing a closed file does nothing


def build_reporter(ctx):
    return ScalarFileReporter(ctx.run_folder / "scalars.jsonl")
