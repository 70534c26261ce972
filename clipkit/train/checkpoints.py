"""Training checkpoints: atomic writes, finding the newest complete one, and restoring a run from it.

A checkpoint is OpenCLIP's dict (``epoch`` = completed epochs, ``name``, ``state_dict``, ``optimizer``,
``scaler``) plus ``clipkit``: the optimizer step, the epoch's data position, generator states and the
optimizer's parameter names. Every value loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import CheckpointError

logger = logging.getLogger("clipkit.train")

LATEST = "epoch_latest.pt"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
TMP_PREFIX = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(payload: Dict[str, Any], path: Path) -> None:
    """Write to a temporary file, fsync it, rename it over ``path``, fsync the folder.

    A crash at any moment leaves either the previous file or the new one, never a torn file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a complete copy of ``src`` (a hard link where the filesystem allows)."""
    tmp = dst.parent / f"{TMP_PREFIX}{dst.name}.{os.getpid()}"
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(dst.parent)


def read(path: Path, mmap: bool = False) -> Dict[str, Any]:
    """A checkpoint dict, loaded safely (``weights_only``); ``mmap`` reads metadata without the tensors."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such checkpoint") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError(f"{path}: not a training checkpoint (no 'state_dict' key)")
    return data


def progress_of(data: Dict[str, Any]) -> Tuple[int, int]:
    """``(optimizer steps, completed epochs)`` a checkpoint stands at; OpenCLIP's files have epochs only."""
    return int(data.get("clipkit", {}).get("step", -1)), int(data.get("epoch", 0))


def find_latest(folder: Path) -> Optional[Path]:
    """The most advanced checkpoint in ``folder`` that reads back whole; ``None`` when there is none.

    Temporary files of interrupted writes are never considered; a file that fails to load is
    reported and the next candidate used.
    """
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.iterdir() if p.name == LATEST or _EPOCH_FILE.match(p.name)]
    ranked: List[Tuple[Tuple[int, int, int], Path]] = []
    for path in candidates:
        try:
            step, epoch = progress_of(read(path, mmap=True))
        except CheckpointError as exc:
            logger.warning("ignoring %s", exc)
            continue
        ranked.append(((step, epoch, path.name == LATEST), path))
    return max(ranked)[1] if ranked else None


def remove_torn(folder: Path) -> None:
    """Delete temporary files left by writes that a crash interrupted (they were never renamed into use)."""
    if not folder.is_dir():
        return
    torn = [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
    for path in torn:
        path.unlink()
    if torn:
        logger.info("removed %d incomplete checkpoint write(s) from an interrupted run in %s", len(torn), folder)


def rng_state() -> Dict[str, Any]:
    import numpy as np

    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(),
           "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
           "numpy": {"keys": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_names(optimizer: torch.optim.Optimizer, names: Dict[int, str]) -> List[List[str]]:
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def load_optimizer(optimizer: torch.optim.Optimizer, saved: Dict[str, Any], saved_names: Optional[List[List[str]]],
                   names: Dict[int, str]) -> None:
    """Restore optimizer state by parameter name, so a resume with other lock flags works.

    Parameters that were frozen before start with fresh state (DESIGN: gradual unfreezing).
    """
    current = optimizer_names(optimizer, names)
    if saved_names is None:  # an OpenCLIP checkpoint: by position, when its parameter groups line up
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError) as exc:
            logger.warning("the checkpoint's optimizer state does not fit this optimizer (%s); the optimizer "
                           "starts fresh, the weights are restored", exc)
        return
    if saved_names == current:
        optimizer.load_state_dict(saved)
        return
    by_name: Dict[str, Any] = {}
    for group_names, group in zip(saved_names, saved["param_groups"]):
        for name, index in zip(group_names, group["params"]):
            if index in saved["state"]:
                by_name[name] = saved["state"][index]
    state: Dict[int, Any] = {}
    index = 0
    restored = fresh = 0
    for group_names in current:
        for name in group_names:
            if name in by_name:
                state[index] = by_name[name]
                restored += 1
            else:
                fresh += 1
            index += 1
    groups = [dict(g, params=list(range(start, start + len(g["params"]))))
              for g, start in zip(optimizer.state_dict()["param_groups"],
                                  _starts([len(n) for n in current]))]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    dropped = len(by_name) - restored
    logger.info("optimizer state restored by name for %d parameters; %d start fresh (newly trainable)%s",
                restored, fresh, f"; {dropped} now frozen" if dropped else "")


def _starts(sizes: List[int]) -> List[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out
