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
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import CheckpointError

logger = logging.getLogger("clipkit.train")

LATEST = "epoch_latest.pt"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
TMP_PREFIX = ".tmp-"
# --fsdp: Distributed Checkpoint folders, one shard file per process, and clipkit's extras in EXTRAS
LATEST_DIR = "epoch_latest"
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")
EXTRAS = "clipkit.pt"
_OLD = ".old-"


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


def _replace(path: Path, fill: Callable[[Path], None]) -> None:
    """``fill`` a temporary file beside ``path`` (and make it durable), then rename it over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a torn file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}"
    try:
        fill(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_save(payload: Dict[str, Any], path: Path) -> None:
    """Write a checkpoint to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())

    _replace(path, fill)


def atomic_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a complete copy of ``src``: its own bytes, never a hard link, so that damage to one file
    is not damage to both."""
    _replace(dst, lambda tmp: _copy_file(src, tmp))


def _copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def read(path: Path, mmap: bool = False) -> Dict[str, Any]:
    """A checkpoint dict, loaded safely (``weights_only``); ``mmap`` reads metadata without the tensors."""
    from ..checkpoint import unreadable

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such checkpoint") from exc
    except Exception as exc:
        raise unreadable(path, exc, "not a readable checkpoint") from exc
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError(f"{path}: not a training checkpoint (no 'state_dict' key)")
    return data


def progress_of(data: Dict[str, Any]) -> Tuple[int, int]:
    """``(optimizer steps, completed epochs)`` a checkpoint stands at; OpenCLIP's files have epochs only."""
    return int(data.get("clipkit", {}).get("step", -1)), int(data.get("epoch", 0))


def candidates(folder: Path, folders: bool) -> List[Path]:
    """The checkpoints in ``folder`` newest first, by the names the run gives them: ``epoch_latest`` (every save
    writes it first), then ``epoch_N`` by N; ``folders``: the Distributed Checkpoint folders of ``--fsdp``, else
    the ``.pt`` files. Never by what a checkpoint says about itself, which a planted file could exaggerate."""
    if not folder.is_dir():
        return []
    latest, numbered = (LATEST_DIR, _EPOCH_DIR) if folders else (LATEST, _EPOCH_FILE)
    ranked: List[Tuple[float, Path]] = []
    for path in folder.iterdir():
        match = numbered.match(path.name)
        if (path.name == latest or match) and path.is_dir() == folders:
            ranked.append((float("inf") if match is None else int(match.group(1)), path))
    return [path for _, path in sorted(ranked, key=lambda item: item[0], reverse=True)]


def find_latest(folder: Path, fsdp: Optional[bool] = None) -> Optional[Path]:
    """The newest intact checkpoint in ``folder`` (see :func:`candidates`); ``None`` when there is none.

    ``fsdp``: ``False`` considers ``.pt`` files only (a run without ``--fsdp`` never reads a checkpoint folder
    it did not name), ``True`` checkpoint folders and then ``.pt`` files, ``None`` the kind the folder holds.
    A damaged or unreadable checkpoint is named in a warning and the next one used; temporary files of
    interrupted writes are never considered.
    """
    if fsdp is None:
        fsdp = not candidates(folder, folders=False)
    order = candidates(folder, folders=True) + candidates(folder, folders=False) if fsdp else \
        candidates(folder, folders=False)
    for path in order:
        try:
            verify(path)
            if not path.is_dir():
                read(path, mmap=True)
        except CheckpointError as exc:
            logger.warning("skipping a damaged checkpoint: %s; falling back to the next older one", exc)
            continue
        return path
    return None


def verify(path: Path) -> None:
    """A :class:`CheckpointError` unless ``path`` is intact: every member of a ``.pt`` archive against its CRC32
    (``torch.load`` checks none), or a checkpoint folder's metadata, extras and shard files."""
    if path.is_dir():
        from ._dcp import METADATA, read_metadata

        read_extras(path)
        read_metadata(path / METADATA)
        return
    if not zipfile.is_zipfile(path):  # torch's legacy format: nothing to check it against
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged ({exc})") from exc
    if bad is not None:
        raise CheckpointError(f"{path}: damaged (the CRC of {bad} does not match its bytes)")


# -- Distributed Checkpoint folders (--fsdp) ------------------------------------------------------
def is_dcp(path: Path) -> bool:
    """A complete Distributed Checkpoint folder: DCP writes ``.metadata`` last, after every shard."""
    return path.is_dir() and (path / ".metadata").is_file() and (path / EXTRAS).is_file()


def read_extras(path: Path) -> Dict[str, Any]:
    """The clipkit part of a DCP checkpoint folder (epoch, name, step, per-process data and generators)."""
    if not is_dcp(path):
        raise CheckpointError(f"{path}: not a complete Distributed Checkpoint folder (no .metadata or {EXTRAS})")
    try:
        return torch.load(path / EXTRAS, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path / EXTRAS}: not readable ({type(exc).__name__}: {exc})") from exc


def swap_in(tmp: Path, path: Path) -> None:
    """Put the complete folder ``tmp`` at ``path``; the previous ``path`` survives until the new one is in place
    (a crash in between leaves both under temporary names, and :func:`remove_torn` puts one back)."""
    old = path.parent / f"{_OLD}{path.name}"
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


def copy_tree(src: Path, dst: Path) -> None:
    """``dst`` (a new folder) with copies of ``src``'s files (not hard links: see :func:`atomic_copy`)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        _copy_file(f, dst / f.name)
    _fsync_dir(dst)


def consolidate(dcp_dir: Path, out_file: Path) -> Dict[str, Any]:
    """One ``.pt`` from a ``--fsdp`` checkpoint folder, in the layout of clipkit's other checkpoints.

    ``state_dict`` holds every weight in OpenCLIP's key layout (what ``model.state_dict()`` gives), so
    ``create_model_and_transforms(model, pretrained=out_file)`` loads it; the optimizer state comes along in
    the positional layout, so ``--resume out_file`` continues the run in any number of processes.
    Runs in one process, without a process group.
    """
    import warnings

    from . import _dcp

    dcp_dir, out_file = Path(dcp_dir), Path(out_file)
    extras = read_extras(dcp_dir)
    state: Dict[str, Any] = {}
    with warnings.catch_warnings():  # "no process group: loading in a single process", which is the point
        warnings.simplefilter("ignore", UserWarning)
        _dcp.load(state, dcp_dir)
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{dcp_dir}: holds no model weights (no 'model' entry)")
    payload = dict(extras)
    payload["state_dict"] = state["model"]
    optim = state.get("optim")
    if optim is not None:
        optimizer, names = optimizer_from_fqn(optim)
        payload["optimizer"] = optimizer
        payload.setdefault("clipkit", {})["param_names"] = names
    atomic_save(payload, out_file)
    return payload


def optimizer_from_fqn(optim: Dict[str, Any]) -> Tuple[Dict[str, Any], List[List[str]]]:
    """``torch.distributed.checkpoint.state_dict``'s optimizer layout (keyed by parameter name) in
    ``optimizer.state_dict()``'s (keyed by position), with the names by group for :func:`load_optimizer`."""
    names = [list(g["params"]) for g in optim["param_groups"]]
    state: Dict[int, Any] = {}
    groups = []
    index = 0
    for group in optim["param_groups"]:
        ids = []
        for name in group["params"]:
            if name in optim.get("state", {}):  # DCP drops an empty "state" (an optimizer without any yet)
                state[index] = optim["state"][name]
            ids.append(index)
            index += 1
        groups.append(dict(group, params=ids))
    return {"state": state, "param_groups": groups}, names


def optimizer_to_fqn(saved: Dict[str, Any], saved_names: List[List[str]]) -> Dict[str, Any]:
    """The inverse of :func:`optimizer_from_fqn`."""
    state: Dict[str, Any] = {}
    groups = []
    for group_names, group in zip(saved_names, saved["param_groups"]):
        for name, index in zip(group_names, group["params"]):
            if index in saved["state"]:
                state[name] = saved["state"][index]
        groups.append(dict(group, params=list(group_names)))
    return {"state": state, "param_groups": groups}


def remove_torn(folder: Path) -> None:
    """Delete temporary files left by writes that a crash interrupted (they were never renamed into use).

    Call it only while holding the run folder's lock (``_runlock``): then no live writer owns them.
    """
    if not folder.is_dir():
        return
    for old in [p for p in folder.iterdir() if p.name.startswith(_OLD)]:  # a folder swap cut short
        target = folder / old.name[len(_OLD):]
        if not is_dcp(target) and is_dcp(old):
            if target.exists():
                shutil.rmtree(target)
            os.replace(old, target)
        else:
            shutil.rmtree(old)
    torn = [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
    for path in torn:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
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
