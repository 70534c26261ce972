"""Reading Distributed Checkpoint folders (``--fsdp``) as data only.

torch's ``FileSystemReader`` unpickles a folder's ``.metadata`` with plain ``pickle``, and its load
planners unpickle non-tensor entries (the optimizer's hyper-parameters) with ``weights_only=False``:
a crafted folder runs code on load. Here ``.metadata`` goes through an unpickler that admits only the
classes DCP's metadata is made of (found by reading what ``dcp.save`` writes), and every other entry
through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as _meta
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem

from ..errors import CheckpointError

METADATA = ".metadata"

# what DCP's metadata is made of: its dataclasses, torch.Size, dtypes and layouts (by name), the
# checkpoint's path; instances of _CLASSES are the only objects whose state a pickle may set
_CLASSES = (_meta.Metadata, _meta.MetadataIndex, _meta.StorageMeta, _meta.TensorProperties,
            _meta.TensorStorageMetadata, _meta.ChunkStorageMetadata, _meta.BytesStorageMetadata, _StorageInfo)
_CALLABLES = (*_CLASSES, _meta._MEM_FORMAT_ENCODING, torch.Size, torch.serialization._get_layout,
              pathlib.PurePosixPath, pathlib.PosixPath, pathlib.PureWindowsPath)


def _allowed() -> Dict[Tuple[str, str], Any]:
    table: Dict[Tuple[str, str], Any] = {(obj.__module__, obj.__qualname__): obj for obj in _CALLABLES}
    table.update({("pathlib", obj.__name__): obj for obj in _CALLABLES if obj.__module__.startswith("pathlib")})
    table.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    return table


_ALLOWED = _allowed()


class _MetadataUnpickler(pickle._Unpickler):  # the Python implementation, so that BUILD can be checked too
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of Distributed Checkpoint metadata") from None

    # stack and load_build are the pure-Python unpickler's internals, absent from typeshed's stubs
    def _load_build(self) -> None:
        target = self.stack[-2]  # type: ignore[attr-defined]
        if type(target) not in _CLASSES:
            raise pickle.UnpicklingError(f"sets the state of a {type(target).__name__}, which is not "
                                         f"Distributed Checkpoint metadata")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch = dict(pickle._Unpickler.dispatch)
    # typed for any Unpickler; this table is only ever used by instances of this class
    dispatch[pickle.BUILD[0]] = _load_build  # type: ignore[assignment]


def read_metadata(path: Path) -> _meta.Metadata:
    """A folder's ``.metadata`` (``path``), unpickled as data only; a :class:`CheckpointError` naming the file
    for anything else, or for a metadata that points outside its folder or at more data than it holds."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: refused, not Distributed Checkpoint metadata ({exc}); clipkit reads "
                              f"checkpoint metadata as data only, never as arbitrary pickled objects") from exc
    if not isinstance(metadata, _meta.Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: refused, not Distributed Checkpoint metadata "
                              f"(a {type(metadata).__name__})")
    _check_storage(path, metadata)
    return metadata


def _check_storage(path: Path, metadata: _meta.Metadata) -> None:
    """Every entry in a shard file of this folder, and no more tensor data declared than the shards hold
    (a crafted size would otherwise allocate without bound)."""
    folder = path.parent
    sizes: Dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(name, str) or Path(name).name != name \
                or name in ("", ".", ".."):
            raise CheckpointError(f"{path}: refused, an entry points outside the folder ({name!r})")
        if name not in sizes:
            shard = folder / name
            if not shard.is_file():
                raise CheckpointError(f"{path}: refers to {name}, which is missing from {folder}")
            sizes[name] = shard.stat().st_size
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and 0 <= info.offset
                and 0 <= info.length and info.offset + info.length <= sizes[name]):
            raise CheckpointError(f"{folder / name}: shorter than {path} says (damaged or cut short)")
    declared = 0
    for entry in metadata.state_dict_metadata.values():
        if isinstance(entry, _meta.TensorStorageMetadata):
            count = 1
            for n in entry.size:
                count *= int(n)
            declared += count * entry.properties.dtype.itemsize
    if declared > sum(sizes.values()):
        raise CheckpointError(f"{path}: declares {declared} bytes of tensors, more than its shard files hold")


class SafeReader(FileSystemReader):
    """``FileSystemReader`` that hands DCP a metadata already read by :func:`read_metadata`."""

    def __init__(self, folder: Path, metadata: _meta.Metadata) -> None:
        super().__init__(str(folder))
        self.metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> _meta.Metadata:
        if self.metadata.storage_meta is None:
            self.metadata.storage_meta = _meta.StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class _BytesAsData(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters) read with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"entry {read_item.dest_index.fqn}: refused, it holds pickled objects "
                                  f"beyond weights_only=True ({type(exc).__name__})") from exc
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _Planner(_BytesAsData, DefaultLoadPlanner):
    pass


class _WholePlanner(_BytesAsData, _EmptyStateDictLoadPlanner):
    pass


def load(state: Dict[str, Any], folder: Path, *, partial: bool = False) -> None:
    """``dcp.load`` of ``folder`` into ``state`` as data only: this run's tensors (``partial``: those the folder
    has), or, given ``{}``, everything the folder holds, read in this one process. Failures are one-line
    :class:`CheckpointError` s naming the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    # read here first: a refusal inside dcp.load would come wrapped in its tracebacks
    reader = SafeReader(folder, read_metadata(folder / METADATA))
    try:
        if state:
            dcp.load(state, storage_reader=reader, planner=_Planner(allow_partial_load=partial))
        else:  # dcp.load fills a copy of the dict it is given; this fills ``state`` itself (as dcp_to_torch_save)
            _load_state_dict(state, storage_reader=reader, planner=_WholePlanner(), no_dist=True)
    except CheckpointException as exc:  # DCP gathers each process's failure; a BaseException
        raise _first_failure(folder, exc) from None
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _first_failure(folder: Path, exc: BaseException) -> CheckpointError:
    failures = getattr(exc, "failures", {}) or {}
    for rank in sorted(failures):
        cause: Optional[BaseException] = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        if isinstance(cause, CheckpointError):
            text = str(cause)
            return CheckpointError(text if text.startswith(str(folder)) else f"{folder}: {text}")
        if cause is not None:
            return CheckpointError(f"{folder}: cannot be loaded ({type(cause).__name__}: "
                                   f"{str(cause).splitlines()[0] if str(cause) else ''})")
    return CheckpointError(f"{folder}: cannot be loaded")
