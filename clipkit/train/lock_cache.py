"""Locked computation done once: the outputs of a locked tower, or of the locked prefix of a tower's layer
groups, are kept per sample and reused instead of recomputed.

A locked part's output depends on its input alone (its parameters never change and, with the trainer's
default, it runs in eval mode: no dropout), so an entry is keyed by a hash of the input row, the model's
own input tensor: token ids for text, the transformed image tensor for images. Keys are computed from the
CPU batch before it is copied to the device, so looking them up needs no device synchronisation.

- A wholly frozen tower: its per-sample outputs are cached; a batch whose rows are all cached skips the
  tower.
- A tower whose first ``n`` layer groups are frozen and that has the optional stage protocol
  (``forward_head(x, n)`` / ``forward_tail(state, n)``, docs/plugins.md): the state after the prefix is
  cached, and the trainable rest runs on it. When that rest draws no random numbers, identical inputs of
  a batch go through it once and are expanded back by index (their gradients are summed by autograd).

Exactness: a batch with any uncached row runs the locked part on the whole batch, as an uncached run does
(CPU kernels give last-bit differences between a batch and a sub-batch of it), and only the new rows are
kept. Once full, the cache keeps what it has and computes the rest (no eviction, so what is cached never
depends on the order of the data). Entries persist in the run folder (``lock_cache/``, safetensors: per
tower and process, one file per save that added entries) under a fingerprint of everything the mapping
input -> output depends on: the frozen parameters and buffers, the lock, the mode, the precision, the tower
config and the versions.

The trainer installs the cached forward on the tower as an instance attribute: the model's state dict,
DDP and torch.compile see the same module. It is active only while the trainer sets a batch's keys, inside
the training step; evaluation and saving see the plain tower.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..freeze import _is_norm, _params, eval_frozen_parts, locked_prefix

logger = logging.getLogger("clipkit.train")

FORMAT = "clipkit-lock-cache-1"
_PROBE_ROWS = 4  # samples the start-of-run checks run on

Rows = Tuple[torch.Tensor, ...]


def row_keys(batch: torch.Tensor) -> List[bytes]:
    """A content hash per row of a CPU batch (its dtype and row shape included)."""
    batch = batch.detach().contiguous()
    head = f"{batch.dtype}{tuple(batch.shape[1:])}".encode()
    raw = batch.view(torch.uint8) if batch.dtype != torch.bool else batch.to(torch.uint8)
    flat = raw.reshape(batch.shape[0], -1).numpy()
    return [hashlib.blake2b(head + row.tobytes(), digest_size=16).digest() for row in flat]


def _index(rows: List[int], device: torch.device) -> torch.Tensor:
    """Row numbers on the device without waiting for it: built on the host, copied from pinned memory."""
    index = torch.tensor(rows, dtype=torch.long)
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def _parts(value: Any) -> Rows:
    return value if isinstance(value, tuple) else (value,)


def _same(a: Any, b: Any) -> bool:
    a, b = _parts(a), _parts(b)
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


@contextlib.contextmanager
def _untouched(tower: nn.Module, device: torch.device) -> Iterator[None]:
    """Checks that leave no trace: the random number streams, the buffers (BatchNorm statistics) and the
    modules' train/eval modes are as they were afterwards."""
    buffers = {name: buf.clone() for name, buf in tower.named_buffers()}
    modes = [(m, m.training) for m in tower.modules()]
    state = random.getstate()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        random.setstate(state)
        with torch.no_grad():
            for name, buf in tower.named_buffers():
                buf.copy_(buffers[name])
        for module, training in modes:
            module.training = training


@dataclass
class TowerCache:
    """The cache of one tower: its entries and the cached forward installed on it."""

    name: str  # "image" or "text"
    tower: Any  # an nn.Module, with forward_head/forward_tail when the prefix is not the whole tower
    prefix: int  # cached: the state after this many layer groups (== groups: the output)
    groups: int
    fingerprint: str
    budget: "Budget"
    compile_safe: bool = False
    entries: Dict[bytes, Rows] = field(default_factory=dict)
    keys: Optional[List[bytes]] = None
    enabled: bool = True
    checked: bool = False
    merge: bool = False  # identical inputs of a batch run through the trainable rest once
    hits: int = 0
    lookups: int = 0
    loaded: int = 0
    held: int = 0  # bytes of this tower's entries
    unsaved: List[bytes] = field(default_factory=list)  # keys added since the last save
    chunks: int = 0  # files written so far

    @property
    def full(self) -> bool:
        return self.prefix >= self.groups

    def describe(self) -> str:
        what = "whole tower" if self.full else f"the state after {self.prefix} of {self.groups} layer groups"
        return f"{self.name} tower ({type(self.tower).__name__}): {what}"

    # the forward the trainer installs --------------------------------------------------------------
    def install(self) -> None:
        original = type(self.tower).forward.__get__(self.tower)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.keys is None or not self.enabled or args or kwargs:
                return original(x, *args, **kwargs)
            return self._cached(original, x)

        if self.compile_safe:  # dict lookups and hashing stay outside a compiled graph
            forward = torch.compiler.disable(forward)
        self.tower.forward = forward

    def uninstall(self) -> None:
        self.tower.__dict__.pop("forward", None)

    def _cached(self, original: Callable[..., Any], x: torch.Tensor) -> Any:
        keys = self.keys
        assert keys is not None
        if len(keys) != x.shape[0]:
            raise RuntimeError(f"lock cache: {len(keys)} keys for a batch of {x.shape[0]} {self.name} rows")
        if not self.checked:
            self._check(original, x)
            if not self.enabled:
                return original(x)
        found = [self.entries.get(k) for k in keys]
        self.lookups += len(keys)
        self.hits += sum(f is not None for f in found)
        hits = [f for f in found if f is not None]
        if len(hits) == len(found):
            value: Any = tuple(torch.stack([f[j] for f in hits]) for j in range(len(hits[0])))
            value = value if len(value) > 1 else value[0]
        else:
            with torch.no_grad():  # the whole batch, as an uncached run computes it (exact to the last bit)
                value = original(x) if self.full else self.tower.forward_head(x, self.prefix)
            self._keep(keys, found, value)
        if self.full:
            return value
        return self._tail(value, keys)

    def _keep(self, keys: List[bytes], found: List[Optional[Rows]], value: Any) -> None:
        new: Dict[bytes, int] = {}
        for row, (key, hit) in enumerate(zip(keys, found)):
            if hit is None and key not in new:
                new[key] = row
        if not new:
            return
        parts = _parts(value)
        per_row = sum(p[0].numel() * p.element_size() for p in parts)
        room = self.budget.room(per_row, len(new))
        if room <= 0:
            return
        kept = list(new.items())[:room]
        index = _index([row for _, row in kept], parts[0].device)
        # one compact copy, so an entry holds its own row and not the whole batch
        rows = [p.detach().index_select(0, index).unbind(0) for p in parts]
        for i, (key, _) in enumerate(kept):
            self.entries[key] = tuple(r[i] for r in rows)
        self.budget.used += per_row * len(kept)
        self.held += per_row * len(kept)
        self.unsaved.extend(key for key, _ in kept)

    def _tail(self, state: Any, keys: List[bytes]) -> Any:
        if self.merge:
            first: Dict[bytes, int] = {}  # key -> the row where it first occurs
            for row, key in enumerate(keys):
                first.setdefault(key, row)
            if len(first) < len(keys):
                position = {key: i for i, key in enumerate(first)}
                inverse = [position[key] for key in keys]
                device = _parts(state)[0].device
                unique = _index(list(first.values()), device)
                back = _index(inverse, device)
                parts = tuple(p.index_select(0, unique) for p in _parts(state))
                out = self.tower.forward_tail(parts if isinstance(state, tuple) else parts[0], self.prefix)
                expanded = tuple(o.index_select(0, back) for o in _parts(out))
                return expanded if isinstance(out, tuple) else expanded[0]
        return self.tower.forward_tail(state, self.prefix)

    # the start-of-run checks, on the first batch's first rows ---------------------------------------
    def _check(self, original: Callable[..., Any], x: torch.Tensor) -> None:
        self.checked = True
        try:
            problem = self._problem(original, x[:_PROBE_ROWS])
        except Exception as exc:  # a tower may refuse a split (the hf tower for T5-like encoders)
            problem = f"computing it apart failed: {exc}"
        if problem is not None:
            return self._off(problem)
        merge = ("" if self.full else "; identical inputs in a batch run the trainable rest once" if self.merge
                 else "; identical inputs in a batch are not merged: the trainable rest is random in training "
                      "(dropout)")
        logger.info("lock cache: %s cached per sample%s", self.describe(), merge)

    def _problem(self, original: Callable[..., Any], probe: torch.Tensor) -> Optional[str]:
        """Why the locked computation cannot be cached, or ``None``; decides ``merge`` on the way."""
        head = original if self.full else (lambda x: self.tower.forward_head(x, self.prefix))
        with _untouched(self.tower, probe.device):
            if not _same(head(probe), head(probe)):
                return ("the locked computation gives different results for the same input in training "
                        "(dropout or other randomness in train mode; see --lock-train-mode)")
        if self.full:
            return None
        with _untouched(self.tower, probe.device):
            self.tower.eval()
            if not _same(self.tower.forward_tail(head(probe), self.prefix), original(probe)):
                return f"forward_tail(forward_head(x, {self.prefix}), {self.prefix}) differs from forward(x)"
        with _untouched(self.tower, probe.device):
            state = head(probe)
            self.merge = _same(self.tower.forward_tail(state, self.prefix), self.tower.forward_tail(state, self.prefix))
        return None

    def _off(self, reason: str) -> None:
        self.enabled = False
        self.budget.used -= self.held
        self.held = 0
        self.entries.clear()
        self.unsaved = []
        logger.warning("lock cache: %s not cached: %s", self.describe(), reason)

    # persistence ------------------------------------------------------------------------------------
    # A tower's entries are files RUN/lock_cache/{name}.rank{R}.{K}.safetensors, one per save that had new
    # entries (only those): a save writes what is new since the last one, never the whole cache again.
    def save(self, folder: Path, rank: int, world: int) -> None:
        """The entries added since the last save, as one more safetensors file (a uint8 key tensor and one
        tensor per output part, the fingerprint in its metadata), written atomically."""
        if not self.enabled or not self.unsaved:
            return
        from safetensors.torch import save_file

        rows = [self.entries[k] for k in self.unsaved]
        tensors = {"keys": torch.tensor([list(k) for k in self.unsaved], dtype=torch.uint8)}
        for j in range(len(rows[0])):
            tensors[f"part{j}"] = torch.stack([r[j] for r in rows]).cpu().contiguous()
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "rank": str(rank), "world": str(world)}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.rank{rank}.{self.chunks:05d}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        self.chunks += 1
        self.unsaved = []

    def load(self, folder: Path, rank: int, world: int, device: torch.device) -> None:
        """Entries of an earlier run with the same fingerprint and world size. Files of another
        fingerprint or world, and unreadable ones (with a warning), are removed: this process rebuilds them."""
        if not self.enabled:
            return
        for path in sorted(folder.glob(f"{self.name}.rank{rank}.*.safetensors")):
            stale = self._load_file(path, world, device)
            if stale:
                if stale != "unreadable":
                    logger.info("lock cache: %s: %s is %s; rebuilding it", self.name, path, stale)
                path.unlink()
        self.chunks = 1 + max((int(p.name.split(".")[-2]) for p in folder.glob(f"{self.name}.rank{rank}.*.safetensors")
                               if p.name.split(".")[-2].isdigit()), default=-1)

    def _load_file(self, path: Path, world: int, device: torch.device) -> Optional[str]:
        """Read one file's entries; why it is of no use (another fingerprint or world, unreadable), else
        ``None``."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
                    return "for other weights, lock or settings"
                if meta.get("world") != str(world):
                    return f"written by a run of {meta.get('world')} processes"
                keys = f.get_tensor("keys")
                parts = [f.get_tensor(f"part{j}") for j in range(len(f.keys()) - 1)]
        except Exception as exc:  # a torn or foreign file costs its entries, never the run
            logger.warning("lock cache: %s: ignoring unreadable %s (%s)", self.name, path, exc)
            return "unreadable"
        if keys.dtype != torch.uint8 or keys.ndim != 2 or not parts or any(p.shape[0] != keys.shape[0] for p in parts):
            logger.warning("lock cache: %s: ignoring %s: its tensors do not line up", self.name, path)
            return None
        per_row = sum(p[0].numel() * p.element_size() for p in parts) if keys.shape[0] else 0
        count = min(keys.shape[0], self.budget.room(per_row, keys.shape[0]))
        rows = [p[:count].to(device).unbind(0) for p in parts]
        for i, key in enumerate(keys[:count].tolist()):
            self.entries[bytes(key)] = tuple(r[i] for r in rows)
        self.budget.used += per_row * count
        self.held += per_row * count
        self.loaded += count
        return None


@dataclass
class Budget:
    """The bytes every tower's entries may hold together."""

    limit: int
    used: int = 0

    def room(self, per_row: int, wanted: int) -> int:
        """How many of ``wanted`` rows of ``per_row`` bytes still fit."""
        if per_row <= 0:
            return wanted
        return max(0, min(wanted, (self.limit - self.used) // per_row))


class LockCache:
    """The caches of a run's locked towers; a no-op when there are none."""

    def __init__(self, towers: List[TowerCache], folder: Optional[Path], rank: int, world: int,
                 device: torch.device):
        self.towers = {t.name: t for t in towers}
        self.folder = folder
        self.rank, self.world = rank, world
        for tower in towers:
            if folder is not None:
                tower.load(folder, rank, world, device)
            tower.install()

    @property
    def active(self) -> bool:
        return any(t.enabled for t in self.towers.values())

    def wants(self, name: str) -> bool:
        """Whether the trainer should compute keys for this side's batches."""
        tower = self.towers.get(name)
        return tower is not None and tower.enabled

    @contextlib.contextmanager
    def batch(self, keys: Optional[Dict[str, List[bytes]]]) -> Iterator[None]:
        """The cached forwards answer for this micro-batch's rows while inside."""
        for name, tower in self.towers.items():
            tower.keys = (keys or {}).get(name)
        try:
            yield
        finally:
            for tower in self.towers.values():
                tower.keys = None

    def keys(self, images: torch.Tensor, texts: torch.Tensor) -> Optional[Dict[str, List[bytes]]]:
        """The keys of a CPU batch, for the towers that are cached."""
        if not self.active:
            return None
        keys = {}
        if self.wants("image"):
            keys["image"] = row_keys(images)
        if self.wants("text"):
            keys["text"] = row_keys(texts)
        return keys

    def save(self) -> None:
        """Each tower's entries into the run folder (this process's own file)."""
        if self.folder is None:
            return
        for tower in self.towers.values():
            tower.save(self.folder, self.rank, self.world)

    def report(self, epoch: int) -> Dict[str, float]:
        """Log each cached tower's hit rate this epoch, entries and bytes; the hit rates by tower."""
        rates = {}
        for tower in self.towers.values():
            if not tower.enabled or not tower.lookups:
                continue
            rate = tower.hits / tower.lookups
            rates[tower.name] = rate
            logger.info("epoch %d lock cache: %s tower hit rate %.1f%% (%d of %d lookups); %d entries, %.1f MiB "
                        "(all towers: %.1f of %.1f MiB)", epoch + 1, tower.name, 100 * rate, tower.hits,
                        tower.lookups, len(tower.entries), tower.held / 2 ** 20, tower.budget.used / 2 ** 20,
                        tower.budget.limit / 2 ** 20)
            tower.hits = tower.lookups = 0
        return rates

    def close(self) -> None:
        for tower in self.towers.values():
            tower.uninstall()


def _only_norms_train(tower: Any, index: int) -> bool:
    """Whether the trainable parameters of layer group ``index`` all belong to norm layers."""
    groups = list(tower.layer_groups())
    if index >= len(groups):
        return False
    group = groups[index]
    trainable = {id(p) for item in group for p in _params(item) if p.requires_grad}
    norms = {id(p) for item in group if isinstance(item, nn.Module) for module in item.modules() if _is_norm(module)
             for p in module.parameters(recurse=False)}
    return bool(trainable) and trainable <= norms


def set_locked_modes(model: nn.Module, sides: Sequence[str]) -> None:
    """After ``model.train()``: the frozen parts of the locked towers back in eval mode."""
    for side in sides:
        eval_frozen_parts(getattr(model, "visual" if side == "image" else "text"))


def fingerprint(tower: nn.Module, prefix: int, lock: Dict[str, Any], precision: str, config: Any) -> str:
    """A hash of everything a locked part's output depends on besides its input."""
    import clipkit

    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps({"prefix": prefix, "lock": lock, "precision": precision, "config": config,
                              "tower": type(tower).__qualname__, "clipkit": clipkit.__version__,
                              "torch": torch.__version__}, sort_keys=True, default=str).encode())
    frozen_modules = [m for m in tower.modules()
                      if not any(p.requires_grad for p in m.parameters())]
    tensors: List[Tuple[str, torch.Tensor]] = [(n, p) for n, p in tower.named_parameters() if not p.requires_grad]
    seen = {id(b) for m in frozen_modules for b in m.buffers()}
    tensors += [(n, b) for n, b in tower.named_buffers() if id(b) in seen]
    for name, tensor in tensors:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build(model: nn.Module, settings: Any, folder: Optional[Path], rank: int, world: int, device: torch.device,
          train_transform_random: bool, sharded: bool) -> Optional[LockCache]:
    """The lock cache a run's settings ask for (``None`` when nothing is cached), with its start-of-run log."""
    m, precision = settings.model, settings.precision
    locks = [side for side, on in (("image", m.lock_image), ("text", m.lock_text)) if on]
    if not locks:
        return None
    if m.no_lock_cache:
        logger.info("lock cache: off (--no-lock-cache)")
        return None
    if sharded:
        logger.info("lock cache: off under --fsdp (sharded parameters)")
        return None
    budget = Budget(m.lock_cache_bytes)
    towers = []
    configs = getattr(getattr(model, "model_config", None), "raw", {}) or {}
    for side in locks:
        tower: Any = model.visual if side == "image" else model.text
        groups = len(list(tower.layer_groups()))
        frozen = not any(p.requires_grad for p in tower.parameters())
        prefix = groups if frozen else locked_prefix(tower)
        label = f"{side} tower ({type(tower).__name__})"
        if prefix == 0:
            hint = (" (--lock-text leaves the norms of locked layers trainable; --lock-text-freeze-layer-norm "
                    "freezes them)" if side == "text" and not m.lock_text_freeze_layer_norm
                    and _only_norms_train(tower, 0) else "")
            logger.info("lock cache: %s not cached: its first layer group has trainable parameters%s", label, hint)
            continue
        if not frozen and not (callable(getattr(tower, "forward_head", None))
                               and callable(getattr(tower, "forward_tail", None))):
            logger.info("lock cache: %s not cached: %d of %d layer groups are locked and the tower has no "
                        "forward_head/forward_tail (docs/plugins.md) to compute them apart", label, prefix, groups)
            continue
        if side == "image" and train_transform_random:
            advice = ("--lock-image-eval-preprocess gives training images the eval preprocessing (LiT) and computes "
                      "the tower once per image" if frozen else "a wholly locked image tower can use "
                      "--lock-image-eval-preprocess")
            logger.info("lock cache: %s not cached: the training transform is random, so the same image never "
                        "gives the same input twice; %s", label, advice)
            continue
        if side == "text" and not m.lock_text_freeze_layer_norm and _only_norms_train(tower, prefix):
            logger.info("lock cache: %s: the locked prefix ends at %d of %d layer groups because --lock-text leaves "
                        "the norms of locked layers trainable; --lock-text-freeze-layer-norm freezes them, so that "
                        "every locked layer is computed once", label, prefix, groups)
        lock = ({"unlocked": m.lock_image_unlocked_groups, "bn": m.lock_image_freeze_bn_stats} if side == "image"
                else {"unlocked": m.lock_text_unlocked_layers, "norm": m.lock_text_freeze_layer_norm})
        lock["train_mode"] = m.lock_train_mode
        config = configs.get("vision_cfg" if side == "image" else "text_cfg")
        towers.append(TowerCache(side, tower, prefix, groups, fingerprint(tower, prefix, lock, precision.precision,
                                                                          config),
                                 budget, compile_safe=precision.torchcompile))
    if not towers:
        return None
    where = folder if folder is not None else "memory only (--logs none)"
    cache = LockCache(towers, folder, rank, world, device)
    for part in towers:
        loaded = f", {part.loaded} entries read back" if part.loaded else ""
        logger.info("lock cache: %s, cached per sample up to %.1f MiB for all towers, kept in %s%s",
                    part.describe(), budget.limit / 2 ** 20, where, loaded)
    return cache


def transform_is_random(transform: Callable[[Any], torch.Tensor]) -> bool:
    """Whether an image transform gives different tensors for the same image (random crops, flips...):
    tried on one synthetic image under two seeds, leaving the random streams as they were."""
    from PIL import Image

    image = Image.fromarray(torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(0)).numpy())
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            outputs = []
            for seed in (1, 2):
                torch.manual_seed(seed)
                random.seed(seed)
                outputs.append(transform(image))
    finally:
        random.setstate(state)
    return not _same(outputs[0], outputs[1])
