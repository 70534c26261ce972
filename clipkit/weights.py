"""Reading weights into a model: safetensors, or ``torch.load(weights_only=True)``; every mismatch named."""
from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Set, Union

import torch
from torch import nn

from ._provenance import names_missing_parts
from .errors import CheckpointError

logger = logging.getLogger("clipkit")

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# not weights: OpenAI's archives store their hyper-parameters beside the tensors
_DROPPED_KEYS = ("text.transformer.embeddings.position_ids", "input_resolution", "context_length", "vocab_size")


def read_state_dict(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: safetensors, or a torch pickle read with ``weights_only=True``.

    Unwraps ``{"state_dict": ...}`` (clipkit and OpenCLIP training checkpoints) and strips the
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device=str(device))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    elif _is_torchscript(path):
        # loading TorchScript deserialises code, which weights_only exists to forbid
        raise CheckpointError(f"{path}: is a TorchScript archive (like OpenAI's original release); clipkit does not "
                              f"load TorchScript. Use the 'openai' pretrained tag (the same weights as a state dict) "
                              f"or, once and only for a file you trust: torch.save(torch.jit.load(path).state_dict(), "
                              f"'weights.pt')")
    else:
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:
            raise unreadable(path, exc, "cannot be read with weights_only=True") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or a dict with a 'state_dict' key)")
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def unreadable(path: Union[str, Path], exc: BaseException, what: str) -> CheckpointError:
    """The one-line error for a file ``torch.load(weights_only=True)`` refused.

    torch's own message advises ``weights_only=False``, which clipkit never does: unpickling that way lets
    the file run any code in it.
    """
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"(Unsupported [^\n.]+)", text)
        detail = f"it holds {found.group(1)}" if found else "it holds pickled objects"
        return CheckpointError(f"{path}: {what}: {detail}, and clipkit never unpickles beyond weights_only=True, "
                               f"since a pickle can run any code it names; use a clipkit or OpenCLIP checkpoint "
                               f"(tensors in dicts) or a .safetensors file")
    return CheckpointError(f"{path}: {what} ({type(exc).__name__}: {text.splitlines()[0] if text else ''})")


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _fit_scalars(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Logit scale/bias saved as a scalar load into a ``[1]`` parameter and vice versa."""
    own = model.state_dict()
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in own and state[key].shape != own[key].shape and state[key].numel() == 1:
            state[key] = state[key].reshape(own[key].shape)


def load_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], *, strict: bool = True,
                    source: str = "") -> Dict[str, List[str]]:
    """Load ``state`` into ``model``; any missing or unexpected key or wrong shape is an error naming it.

    For a :class:`~clipkit.model.ClipModel`, text keys may be in either OpenCLIP layout (flat
    ``CLIP`` or ``text.``-prefixed ``CustomTextCLIP``), whatever layout the model saves in.
    """
    state = {k: v for k, v in state.items() if k not in _DROPPED_KEYS}
    _fit_scalars(model, state)
    canon = _canonical if hasattr(model, "flat_text") else (lambda key: key)
    if hasattr(model, "flat_text"):
        _resize_position_embeddings(model, state)
    own = {canon(k): v for k, v in model.state_dict().items()}
    given = {canon(k): v for k, v in state.items()}
    file_key = {canon(k): k for k in state}  # report unexpected keys as the file spells them
    missing = sorted(set(own) - set(given))
    unexpected = sorted(file_key[k] for k in set(given) - set(own))
    wrong = sorted(k for k in set(own) & set(given) if own[k].shape != given[k].shape)
    params = {canon(k) for k, _ in model.named_parameters()}
    check_values(own, given, params, source)
    problems = []
    if strict and missing:
        problems.append(f"missing keys {_few(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if wrong:
        problems.append("shape mismatch " + ", ".join(f"{k} {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
                                                       for k in wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
    if problems:
        raise CheckpointError((f"{source}: " if source else "") + "checkpoint does not fit the model: "
                              + "; ".join(problems))
    if not strict:
        state = {k: v for k, v in state.items() if canon(k) in own}
        if missing or unexpected:
            logger.warning("%sloaded with strict=False: %d missing, %d unexpected keys", where(source),
                           len(missing), len(unexpected))
    model.load_state_dict(state, strict=strict)
    return {"missing_keys": missing, "unexpected_keys": unexpected}


def check_values(own: Dict[str, torch.Tensor], given: Dict[str, torch.Tensor], params: Set[str], source: str) -> None:
    """Refuse weights that would load silently and wrongly: integer or boolean tensors for floating-point
    entries of the model (``copy_`` would convert them), and non-finite values in parameters."""
    kinds = sorted(k for k in set(own) & set(given) if own[k].is_floating_point() and not given[k].is_floating_point())
    if kinds:
        raise CheckpointError(f"{where(source)}" + ", ".join(f"{k} is {str(given[k].dtype)[6:]}" for k in kinds[:5])
                              + (" ..." if len(kinds) > 5 else "") + f", not floating point like the model's "
                              f"{str(own[kinds[0]].dtype)[6:]}: not weights this model can use")
    bad = sorted(k for k in params & set(given) if given[k].is_floating_point() and not torch.isfinite(given[k]).all())
    if bad:
        raise CheckpointError(f"{where(source)}non-finite values (NaN or inf) in {_few(bad)}: the weights are broken")


def where(source: str) -> str:
    return f"{source}: " if source else ""


def _resize_position_embeddings(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Weights trained at another resolution or context length: interpolate their position tables.

    Image positions (one class token, then a square grid) are resized bicubically with antialiasing,
    text positions linearly, as OpenCLIP does, so its resized checkpoints give the same features.
    """
    import torch.nn.functional as F

    own = {_canonical(k): v for k, v in model.state_dict().items()}
    for key in [k for k in state if _canonical(k) == "visual.positional_embedding"]:
        grid = getattr(model.visual, "grid_size", None)
        old, new = state[key], own.get(_canonical(key))
        if grid is None or new is None or old.shape == new.shape or old.ndim != 2:
            continue
        side = int(round((old.shape[0] - 1) ** 0.5))
        if side * side != old.shape[0] - 1:
            raise CheckpointError(f"{key}: {old.shape[0] - 1} image positions are not a square grid; cannot resize")
        table = old[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        table = F.interpolate(table, size=tuple(grid), mode="bicubic", antialias=True, align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(old.dtype)
        state[key] = torch.cat([old[:1], table])
        logger.info("resized %s from a %dx%d grid to %s", key, side, side, tuple(grid))
    for key in [k for k in state if _canonical(k) == "text.positional_embedding"]:
        old, new = state[key], own.get(_canonical(key))
        if new is None or old.shape == new.shape or old.ndim != 2 or old.shape[1] != new.shape[1]:
            continue
        table = F.interpolate(old.T[None].float(), size=new.shape[0], mode="linear", align_corners=False)
        state[key] = table[0].T.to(old.dtype)
        logger.info("resized %s from %d to %d positions", key, old.shape[0], new.shape[0])


def _canonical(key: str) -> str:
    """A key with a ``text.`` prefix for text-tower keys written in OpenCLIP's flat layout."""
    if key.startswith(("visual.", "text.")) or key in ("logit_scale", "logit_bias"):
        return key
    return "text." + key


def _few(keys: List[str]) -> str:
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


@names_missing_parts("checkpoint_path")  # weights that do not fit: a part's plugin may be missing
def load_checkpoint(model: nn.Module, checkpoint_path: Union[str, Path], strict: bool = True,
                    weights_only: bool = True, device: Union[str, torch.device] = "cpu") -> Dict[str, List[str]]:
    """Load a checkpoint file into ``model`` (OpenCLIP-compatible signature).

    Returns ``{"missing_keys": [...], "unexpected_keys": [...]}``; both are empty unless ``strict=False``.
    """
    if not weights_only:
        raise CheckpointError("weights_only=False is refused: clipkit reads checkpoints with weights_only=True only")
    return load_state_dict(model, read_state_dict(checkpoint_path, device), strict=strict, source=str(checkpoint_path))


def load_tower_weights(tower: nn.Module, path: Union[str, Path]) -> None:
    """Load a tower-only state dict (``pretrained_image_path`` / ``pretrained_text_path``), strictly."""
    state = read_state_dict(path)
    for prefix in ("visual.", "text."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    load_state_dict(tower, state, strict=True, source=str(path))
