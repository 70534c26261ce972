"""Training checkpoints: atomic writes, finding the newest complete one, which one a run resumes from,
and the :class:`Checkpointer` that saves a run and restores it (``.pt`` files and ``--fsdp`` folders).

Not to be confused with :mod:`clipkit.weights`, which loads weights into a model (``pretrained=``).

A checkpoint is OpenCLIP's dict (``epoch`` = completed epochs, ``name``, ``state_dict``, ``optimizer``,
``scaler``) plus ``clipkit``: the optimizer step, the epoch's data position, generator states and the
optimizer's parameter names, and each process's data position, generators and objective state (``ranks``);
``objective`` is process 0's objective state. Every value loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import zipfile
from dataclasses import dataclass
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
OBJECTIVE_STATE = "objective"  # the key of an objective's state_dict: process 0's at the top, each one's in ranks
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
    from ..weights import unreadable

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
        extras: Dict[str, Any] = torch.load(path / EXTRAS, map_location="cpu", weights_only=True)
        return extras
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
    assert isinstance(np_state, tuple)  # numpy's global generator is MT19937: its state is the legacy tuple
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


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (in dicts, lists and tuples, at any depth) a detached copy on the CPU:
    what another process can unpickle and ``torch.load(weights_only=True)`` reads on any machine."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [on_cpu(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def optimizer_names(optimizer: torch.optim.Optimizer, names: Dict[int, str]) -> List[List[str]]:
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def load_optimizer(optimizer: torch.optim.Optimizer, saved: Dict[str, Any], saved_names: Optional[List[List[str]]],
                   names: Dict[int, str]) -> None:
    """Restore optimizer state by parameter name, so a resume with other lock flags works.

    Parameters that were frozen before start with fresh state (gradual unfreezing: docs/towers.md, "Lock semantics").
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


# -- which checkpoint a run starts from -----------------------------------------------------------------
def find_resume(resume: Optional[str], run_dir: Optional[Path], fsdp: bool, owner: Any) -> Optional[Path]:
    """The local checkpoint ``--resume`` names (``None``: a fresh start, or a URL fetched later by
    :func:`fetch_resume`). Locks the run folder first, for ``owner`` (the settings), and clears the torn
    writes of an interrupted attempt. Process 0 calls it."""
    from ..errors import TrainingError
    from ._runlock import lock_run_folder

    if run_dir is not None:  # before anything in it is read, written or removed
        lock_run_folder(run_dir, owner=owner)
    found: Optional[Path] = None
    if resume and resume != "latest" and "://" not in resume:
        found = Path(resume)
        if not (found.is_file() or is_dcp(found)):
            raise TrainingError(f"--resume {resume}: no such file (nor a complete --fsdp checkpoint folder)")
        verify(found)
    if run_dir is None:
        return found
    folder = run_dir / "checkpoints"
    # a folder whose earlier attempt failed before its first checkpoint can be reused as is
    started = bool(candidates(folder, folders=False) or candidates(folder, folders=True))
    if started and resume is None:
        raise TrainingError(f"run folder {run_dir} already exists: pass --resume latest to continue that run, "
                            f"or a new --name")
    remove_torn(folder)
    if resume != "latest":
        return found
    found = find_latest(folder, fsdp=fsdp)
    dirs = candidates(folder, folders=True)
    # never a folder that the run did not write or the user did not name
    if found is None and not fsdp and dirs and not candidates(folder, folders=False):
        raise TrainingError(f"--resume latest: {folder} holds --fsdp checkpoint folders only; add --fsdp, or "
                            f"name one: --resume {dirs[0]}")
    return found


def fetch_resume(resume: Optional[str], remote_sync: Optional[str], run_dir: Optional[Path], fsdp: bool,
                 found: Optional[Path]) -> Optional[Path]:
    """``--resume URL`` fetched into the run folder, or for ``--resume latest`` on a machine without the run,
    its ``--remote-sync`` copy pulled back; otherwise ``found``. Process 0 calls it."""
    from ..errors import TrainingError

    if resume is not None and "://" in resume:
        if run_dir is None:
            raise TrainingError(f"--resume {resume}: a remote checkpoint is fetched into the run folder; "
                                f"--logs is 'none'")
        from .remote import fetch

        try:
            fetched = fetch(resume, run_dir / "checkpoints" / "fetched")
        except (OSError, ValueError, ImportError) as exc:
            raise TrainingError(f"--resume {resume}: cannot fetch it: {exc}") from exc
        verify(fetched)
        return fetched
    if resume != "latest" or found is not None or not remote_sync or run_dir is None:
        return found
    from .remote import pull  # a requeued job on a fresh machine

    try:
        pull(remote_sync, run_dir.name, run_dir / "checkpoints", folders=fsdp)
    except (OSError, ValueError, ImportError) as exc:
        raise TrainingError(f"--resume latest: cannot read the run's copy under --remote-sync "
                            f"{remote_sync}: {exc}") from exc
    return find_latest(run_dir / "checkpoints", fsdp=fsdp)


@dataclass
class Resumed:
    """Where a checkpoint leaves the run: completed epochs, optimizer steps, and the epoch's data position
    (``None``: at an epoch's end)."""

    epoch: int
    step: int
    data: Optional[Dict[str, Any]]


@dataclass(frozen=True)
class SavedParts:
    """The objects whose state a training checkpoint holds: the model, its optimizer (``None``: a run that
    does not train) with its parameters' names by id (what makes the optimizer state portable between
    layouts), the loss scaler and the objective (``None``: absent)."""

    model: Any
    optimizer: Any
    param_names: Dict[int, str]
    scaler: Any = None
    objective: Any = None


class Checkpointer:
    """Saves and restores a run's training state: ``.pt`` files written by process 0, or, for a sharded model,
    Distributed Checkpoint folders every process writes its shard into.

    ``folder`` is ``RUN/checkpoints`` (``None``: ``--logs none``, nothing is saved); ``parallel`` the
    strategy, which decides the format and how whole weights go into the model.
    """

    def __init__(self, settings: Any, folder: Optional[Path], *, env: Any, parallel: Any, parts: SavedParts,
                 run_name: str, model_name: str, epochs: int, remote: Any = None) -> None:
        self.settings = settings
        self.folder = folder
        self.env = env
        self.parallel = parallel
        self.parts = parts
        self.run_name = run_name
        self.model_name = model_name
        self.epochs = epochs
        self.remote = remote

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint of this run, for messages (``None``: none yet)."""
        return find_latest(self.folder) if self.folder is not None and self.folder.is_dir() else None

    # saving ----------------------------------------------------------------------------------------
    def _payload(self, completed_epochs: int, step: int, data: Optional[Dict[str, Any]], ranks: List[Dict[str, Any]],
                 with_state: bool = True) -> Dict[str, Any]:
        payload: Dict[str, Any] = {
            "epoch": completed_epochs, "name": self.run_name,
            "clipkit": {"step": step, "data": data, "rng": rng_state(),
                        "param_names": optimizer_names(self.parts.optimizer, self.parts.param_names),
                        "model": self.model_name, "version": _version(), "ranks": ranks},
        }
        if with_state:
            payload["state_dict"] = {k: v.detach().cpu() for k, v in self.parts.model.state_dict().items()}
            payload["optimizer"] = self.parts.optimizer.state_dict()
        if self.parts.scaler is not None:
            payload["scaler"] = self.parts.scaler.state_dict()
        objective_state = ranks[0].get(OBJECTIVE_STATE)
        if objective_state:  # process 0's, for a resume with another number of processes (and older readers)
            payload[OBJECTIVE_STATE] = objective_state
        config = getattr(self.parts.model, "model_config", None)
        if config is not None:
            from .._provenance import PROVENANCE_KEY, parts_provenance

            payload[PROVENANCE_KEY] = parts_provenance(config)
        return payload

    def save(self, completed_epochs: int, step: int, data: Optional[Dict[str, Any]], epoch_end: bool) -> None:
        """Write ``epoch_N`` at epoch ends the settings ask for, and always ``epoch_latest``; ``data`` is the
        epoch's data position (``None`` at an epoch's end). Every process calls it."""
        from ..errors import TrainingError
        from .distributed import gather_to_main

        if self.folder is None:
            return
        bad = self.parallel.any_nonfinite(self.parts.model)
        if bad:  # a checkpoint that cannot be trained from is worse than none
            raise TrainingError(f"parameters became non-finite ({', '.join(bad[:3])}); not saving a checkpoint")
        # each process's data position, generators and objective state, so that every one resumes where it was
        mine: Dict[str, Any] = {"data": data, "rng": rng_state()}
        if self.parts.objective is not None:  # on the CPU: it travels to process 0 over the CPU group, and is saved
            mine[OBJECTIVE_STATE] = on_cpu(self.parts.objective.state_dict())
        ranks = gather_to_main(mine, self.env)  # process 0 writes them; the others get []
        every = self.settings.save_frequency
        numbered = epoch_end and every > 0 and (completed_epochs == self.epochs or completed_epochs % every == 0)
        if self.parallel.sharded:
            self._save_folder(self.folder, completed_epochs, step, data, ranks, numbered, epoch_end)
            return
        if not self.env.main:
            return
        payload = self._payload(completed_epochs, step, data, ranks)
        latest = self.folder / LATEST
        if numbered:
            path = self.folder / f"epoch_{completed_epochs}.pt"
            # epoch_latest first, so that it is the newest checkpoint at every moment (resuming trusts the names)
            atomic_save(payload, latest)
            atomic_copy(latest, path)
            logger.info("saved %s", path)
            previous = self.folder / f"epoch_{completed_epochs - 1}.pt"
            if self.settings.delete_previous_checkpoint and previous.exists():
                previous.unlink()
        else:
            atomic_save(payload, latest)
            logger.info("saved %s (epoch %d, step %d)", latest, completed_epochs + (0 if epoch_end else 1), step)
        if self.remote is not None:
            self.remote.sync(final=False)

    def _save_folder(self, folder: Path, completed_epochs: int, step: int, data: Optional[Dict[str, Any]], ranks: List[Any],
                     numbered: bool, epoch_end: bool) -> None:
        """Every process writes its shard into a Distributed Checkpoint folder; process 0 adds ``clipkit.pt``
        (the rest of a .pt checkpoint) and swaps the complete folder into place as ``epoch_latest``, then
        copies it to ``epoch_N`` when numbered (as :meth:`save` does with files)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from .distributed import barrier

        # the model's own state_dict (FSDP2: its shards as DTensors), so keys keep OpenCLIP's layout;
        # the optimizer's keyed by parameter name
        model_state = self.parts.model.state_dict()
        optim_state = get_optimizer_state_dict(self.parts.model, self.parts.optimizer)
        latest = folder / LATEST_DIR
        tmp = folder / f"{TMP_PREFIX}{LATEST_DIR}"
        if self.env.main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            extras = self._payload(completed_epochs, step, data, ranks, with_state=False)
            atomic_save(extras, tmp / EXTRAS)
        barrier(self.env)  # the folder exists before anyone writes into it
        # DCP writes .metadata last, once every process's shard is written: its presence marks a whole checkpoint
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        if self.env.main:
            swap_in(tmp, latest)
            if numbered:
                target = folder / f"epoch_{completed_epochs}"
                copy = folder / f"{TMP_PREFIX}{target.name}"
                if copy.exists():
                    shutil.rmtree(copy)
                copy_tree(latest, copy)
                swap_in(copy, target)
                logger.info("saved %s", target)
                previous = folder / f"epoch_{completed_epochs - 1}"
                if self.settings.delete_previous_checkpoint and previous.is_dir():
                    shutil.rmtree(previous)
            else:
                logger.info("saved %s (epoch %d, step %d)", latest, completed_epochs + (0 if epoch_end else 1), step)
            if self.remote is not None:
                self.remote.sync(final=False)
        barrier(self.env)

    # restoring -------------------------------------------------------------------------------------
    def _load_folder(self, path: Path) -> Dict[str, Any]:
        """Weights and optimizer state from a Distributed Checkpoint folder, in this run's layout (sharded or
        not, any number of processes): DCP reads each process its part."""
        import warnings

        from torch.distributed.checkpoint.state_dict import (
            _init_optim_state,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from ..errors import TrainingError
        from . import _dcp
        from .distributed import all_agree

        data = read_extras(path)
        # DCP fills in the tensors it is given: the optimizer needs its state (zeros) to receive the saved one;
        # optimizer state of parameters that were frozen then (no saved state) stays fresh
        model, optimizer = self.parts.model, self.parts.optimizer
        _init_optim_state(optimizer)
        state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
        with warnings.catch_warnings():  # one process without a group: DCP says it loads alone, as meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            _dcp.load(state, path, partial=True)  # as data only: never torch's plain unpickling
        from .parallel import local_part

        bad = [k for k, v in state["model"].items()
               if v.is_floating_point() and not torch.isfinite(local_part(v)).all()]
        if all_agree(bool(bad), self.env):
            where = ", ".join(bad[:3]) if bad else "another process's shard"
            raise TrainingError(f"--resume {path}: non-finite values (NaN or inf) in {where}")
        model.load_state_dict(state["model"], strict=True)
        set_optimizer_state_dict(model, optimizer, state["optim"])
        return data

    def _load_file(self, path: Path) -> Dict[str, Any]:
        data = read(path)
        state = data["state_dict"]
        if next(iter(state), "").startswith("module."):
            state = {k[len("module."):]: v for k, v in state.items()}
        self.parallel.load_whole(self.parts.model, state, str(path))
        if "optimizer" in data:
            self.parallel.load_whole_optimizer(self.parts.model, self.parts.optimizer, data["optimizer"],
                                               data.get("clipkit", {}).get("param_names"), self.parts.param_names,
                                               str(path))
        return data

    def restore(self, path: Path, steps_per_epoch: int) -> Resumed:
        """Load a checkpoint into the model, optimizer and scaler, and this process's generators and objective
        state (process 0's when the checkpoint was written by another number of processes)."""
        from .._provenance import PROVENANCE_KEY, check_provenance

        check_provenance((read_extras(path) if path.is_dir() else read(path, mmap=True)).get(PROVENANCE_KEY),
                         str(path))
        data = self._load_folder(path) if path.is_dir() else self._load_file(path)
        extra = data.get("clipkit", {})
        if self.parts.scaler is not None and "scaler" in data:
            self.parts.scaler.load_state_dict(data["scaler"])
        epoch = int(data.get("epoch", 0))
        step = int(extra.get("step", epoch * steps_per_epoch))
        mine = extra
        ranks = extra.get("ranks") or []
        if len(ranks) == self.env.world:
            mine = ranks[self.env.rank]
        elif self.env.distributed and ranks:
            kept = data.get(OBJECTIVE_STATE) or any(r.get(OBJECTIVE_STATE) for r in ranks)
            what = "data position, generators and objective state" if kept else "data position and generators"
            logger.warning("the checkpoint was written by %d processes and this run has %d: every process resumes "
                           "from process 0's %s", len(ranks), self.env.world, what)
        # a checkpoint older than per-process objective state has process 0's only
        self._load_objective(mine[OBJECTIVE_STATE] if OBJECTIVE_STATE in mine else data.get(OBJECTIVE_STATE, {}))
        if "rng" in mine:
            set_rng_state(mine["rng"])
        position = mine.get("data") or None
        logger.info("resumed from %s (%s)", path,
                    f"epoch {epoch + 1}, step {step}" if position else f"after epoch {epoch}")
        self._finish_numbered_copy(path, epoch, mid_epoch=position is not None)
        return Resumed(epoch=epoch, step=step, data=position)

    def _load_objective(self, state: Dict[str, Any]) -> None:
        """``state`` into the objective; when it refuses its state on any process, every process stops (one
        alone would leave the others waiting for it)."""
        from ..errors import TrainingError
        from .distributed import all_agree

        if self.parts.objective is None:
            return
        failed: Optional[BaseException] = None
        try:  # a stateless objective refuses another objective's state
            self.parts.objective.load_state_dict(state)
        except Exception as exc:
            failed = exc
        if all_agree(failed is not None, self.env):
            raise failed or TrainingError("the objective refused its checkpoint state on another process")

    def _finish_numbered_copy(self, path: Path, done: int, mid_epoch: bool) -> None:
        """The ``epoch_N.pt`` copy that a run stopped between writing ``epoch_latest.pt`` and copying it lacks."""
        every = self.settings.save_frequency
        numbered = path.parent / f"epoch_{done}.pt"
        if (self.env.main and not mid_epoch and self.folder is not None and path == self.folder / LATEST
                and done > 0 and every > 0 and (done == self.epochs or done % every == 0)
                and not numbered.exists()):
            atomic_copy(path, numbered)
            logger.info("saved %s (the copy of %s the previous attempt did not finish)", numbered, path.name)


def _version() -> str:
    from .. import __version__

    return __version__
