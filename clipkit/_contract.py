"""The checks behind ``clipkit.testing``'s contract cases: build each part small and hold it to the rules
of docs/plugins.md. Every failure is a :class:`ContractError` naming the part, its plugin and the rule.

Towers are built inside a whole model, beside the other side's builtin tower (``vit`` or
``transformer``) at its registered example, so model-level behaviour (locking, saving) is checked too.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from . import kinds
from .config import TOKENIZER_KEYS, get_model_config, infer_tokenizer, validate_model_config
from .errors import ClipkitError, ContractError
from .kinds import FREEZER, MODEL_CONFIG, MODEL_FAMILY, TEXT_TOWER, VISION_TOWER, spec
from .registry import Entry, import_target, registry

EMBED_DIM = 24
BATCH = 2
CONTEXT = 12
TEXTS = ["a photo of a cat", "", "a diagram of a bicycle " * 40, "Übergrößenträger, 日本語の文, 😀"]
HEAVY = ("torch", "timm", "transformers")
# A model or tower under test, duck-typed on purpose: the contract cases are where its attributes
# (image_size, layer_groups, forward_head, ...) are checked, so nothing may assume them statically.
Built = Any


def _fail(where: str, contract: str, detail: str) -> ContractError:
    return ContractError(f"{where} breaks the contract '{contract}': {detail}")


def _names(names: List[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- towers ---------------------------------------------------------------------------------------

def _tower_keys(kind: kinds.KindSpec) -> Tuple[str, str, str]:
    """``(section, select key, default part)`` of a tower kind, which declares all three."""
    if kind.section is None or kind.select_key is None or kind.default is None:
        raise ValueError(f"kind {kind.name!r} is not a tower kind")
    return kind.section, kind.select_key, kind.default


class _Tower:
    """A tower under test: its entry, the section it is built from, and builders for models around it."""

    def __init__(self, entry: Entry, section: Optional[Mapping[str, Any]]):
        self.entry = entry
        if section is None:
            section = entry.meta.get("example")
        if section is None:
            raise _fail(entry.where, "builds", "it registered no example= section to build it from; pass "
                                               "example={...} (a small section that builds fast) to register()")
        self.section = dict(section)

    def config(self, **overrides: Any) -> Dict[str, Any]:
        kind = spec(self.entry.kind)
        partner_kind = next(other for other in kinds.towers() if other.name != kind.name)  # the builtin default
        (section, key, _), (partner_section, partner_key, default) = _tower_keys(kind), _tower_keys(partner_kind)
        partner = registry.get(partner_kind.name, default)
        return {"embed_dim": EMBED_DIM,
                section: {key: self.entry.name, **self.section, **overrides},
                partner_section: {partner_key: partner.name, **partner.meta["example"]}}

    def model(self, **overrides: Any) -> Built:
        from .factory import build_model

        try:
            config = validate_model_config(self.config(**overrides), source="its example")
            torch.manual_seed(0)
            return build_model(config)
        except ClipkitError as exc:
            raise _fail(self.entry.where, "builds", str(exc)) from exc
        except Exception as exc:
            raise _fail(self.entry.where, "builds", f"building raised {exc!r}") from exc

    def tower(self, model: Built) -> Built:
        return model.visual if self.entry.kind == VISION_TOWER else model.text

    def inputs(self, model: Built, batch: int = BATCH) -> Tuple[torch.Tensor, torch.Tensor]:
        """An image batch and a text batch the model's towers accept."""
        size = model.visual.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        vocab, length = int(model.text.vocab_size), int(model.text.context_length)
        low = 3 if vocab > 3 else 0  # above the usual special ids, so no text is all padding
        # one generator each, so the first sample of any batch size is the same sample
        return (torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1)),
                torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(2)))

    def forward(self, model: Built, batch: int = BATCH) -> Any:
        image, text = self.inputs(model, batch)
        return self.tower(model)(image if self.entry.kind == VISION_TOWER else text)


def _pooled(where: str, contract: str, out: Any, batch: int = BATCH) -> torch.Tensor:
    """The pooled features of a tower's output, checked to be finite ``[batch, embed_dim]``."""
    pooled = out[0] if isinstance(out, tuple) else out
    if not isinstance(pooled, torch.Tensor):
        raise _fail(where, contract, f"forward returned {type(pooled).__name__}, not a tensor [B, embed_dim]")
    if tuple(pooled.shape) != (batch, EMBED_DIM):
        raise _fail(where, contract, f"forward returned shape {list(pooled.shape)} for a batch of {batch} with "
                                     f"embed_dim {EMBED_DIM}; expected [{batch}, {EMBED_DIM}]")
    if not torch.isfinite(pooled).all():
        raise _fail(where, contract, "forward returned non-finite values")
    return pooled


def _builds(t: _Tower, model: Built) -> None:
    pass  # t.model() raised already if the tower does not build or breaks the protocol checked at build


def _output_shape(t: _Tower, model: Built) -> None:
    where = t.entry.where
    model.eval()
    with torch.no_grad():
        pooled = _pooled(where, "output-shape", t.forward(model))
        one = _pooled(where, "output-shape", t.forward(model, batch=1), batch=1)
        encoded = (model.encode_image if t.entry.kind == VISION_TOWER else model.encode_text)(
            t.inputs(model)[0 if t.entry.kind == VISION_TOWER else 1])
    if not torch.allclose(one[0], pooled[0], rtol=1e-4, atol=1e-4):
        raise _fail(where, "output-shape", "in eval mode a sample's features depend on the rest of the batch")
    if tuple(encoded.shape) != (BATCH, EMBED_DIM):
        raise _fail(where, "output-shape", f"the model's encode method returned shape {list(encoded.shape)}")


def _output_tokens(t: _Tower, model: Built) -> None:
    where = t.entry.where
    model = t.model(output_tokens=True).eval()
    with torch.no_grad():
        out = t.forward(model)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise _fail(where, "output-tokens", f"with output_tokens true, forward must return (pooled, tokens), "
                                            f"got {type(out).__name__}")
    pooled, tokens = out
    _pooled(where, "output-tokens", pooled)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[0] != BATCH:
        shape = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise _fail(where, "output-tokens", f"tokens must be a tensor [B, tokens, width], got {shape}")


def _layer_groups(t: _Tower, model: Built) -> None:
    where = t.entry.where
    tower = t.tower(model)
    names = {id(p): n for n, p in tower.named_parameters()}
    seen: Dict[int, int] = {}
    groups = list(tower.layer_groups())
    if not groups:
        raise _fail(where, "layer-groups", "layer_groups() returned no groups")
    for index, group in enumerate(groups):
        for item in group:
            if not isinstance(item, (nn.Module, nn.Parameter)):
                raise _fail(where, "layer-groups", f"group {index} holds a {type(item).__name__}; groups hold "
                                                   f"modules and nn.Parameters")
            for param in [item] if isinstance(item, nn.Parameter) else item.parameters():
                if id(param) in seen and seen[id(param)] != index:
                    raise _fail(where, "layer-groups", f"parameter {names.get(id(param), '?')} is in groups "
                                                       f"{seen[id(param)]} and {index}")
                seen[id(param)] = index
    outside = [n for i, n in names.items() if i not in seen]
    if outside:
        raise _fail(where, "layer-groups", f"parameters in no layer group (they could never be unlocked): "
                                           f"{_names(outside)}")


def _gradients(where: str, contract: str, tower: Built) -> Dict[str, torch.Tensor]:
    grads, missing = {}, []
    for name, param in tower.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            missing.append(name)
        elif not torch.isfinite(param.grad).all():
            raise _fail(where, contract, f"the gradient of {name} is not finite")
        else:
            grads[name] = param.grad.detach().clone()
    if missing:  # DDP also fails on parameters that take no part in the loss
        raise _fail(where, contract, f"no gradient reached {_names(missing)}")
    if grads and not any(g.abs().sum() > 0 for g in grads.values()):
        raise _fail(where, contract, "every gradient is zero")
    return grads


def _step(t: _Tower, model: Built, seed: int = 0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Forward and backward in train mode; dropout draws the same masks for the same seed."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    pooled = _pooled(t.entry.where, "backward", t.forward(model))
    pooled.float().square().mean().backward()
    return pooled.detach(), _gradients(t.entry.where, "backward", t.tower(model))


def _backward(t: _Tower, model: Built) -> None:
    _step(t, model)


def _grad_checkpointing(t: _Tower, model: Built) -> None:
    where, tower = t.entry.where, t.tower(model)
    plain_out, plain = _step(t, model)
    try:
        tower.set_grad_checkpointing(True)
    except ClipkitError:
        return  # refusing clearly is allowed: a tower that cannot checkpoint says so
    except Exception as exc:
        raise _fail(where, "grad-checkpointing", f"set_grad_checkpointing(True) raised {exc!r}; raise a "
                                                 f"ClipkitError if the tower cannot checkpoint") from exc
    try:
        out, grads = _step(t, model)
    except ContractError:
        raise
    except Exception as exc:
        raise _fail(where, "grad-checkpointing", f"forward/backward with checkpointing raised {exc!r}") from exc
    tower.set_grad_checkpointing(False)
    if not torch.allclose(out, plain_out, rtol=1e-4, atol=1e-5):
        raise _fail(where, "grad-checkpointing", "checkpointing changes the output")
    differ = [n for n, g in plain.items() if not torch.allclose(grads[n], g, rtol=1e-3, atol=1e-5)]
    if differ:
        raise _fail(where, "grad-checkpointing", f"checkpointing changes the gradients of {_names(differ)}")


def _autocast(t: _Tower, model: Built) -> None:
    where = t.entry.where
    model.train()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled = _pooled(where, "autocast", t.forward(model))
        pooled.float().square().mean().backward()
    except ContractError:
        raise
    except Exception as exc:
        raise _fail(where, "autocast", f"forward/backward under torch.autocast('cpu', bfloat16) raised {exc!r}") from exc
    _gradients(where, "autocast", t.tower(model))


def _save_load(t: _Tower, model: Built) -> None:
    from .export import save_pretrained
    from .factory import create_model

    where = t.entry.where
    model.eval()
    image, text = t.inputs(model)
    with tempfile.TemporaryDirectory() as folder:
        try:
            save_pretrained(model, folder)
            again = create_model(f"local-dir:{folder}").eval()
        except Exception as exc:
            raise _fail(where, "save-load", f"save_pretrained + create_model('local-dir:...') raised {exc!r}") from exc
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            before = getattr(model, encode)(image if encode == "encode_image" else text)
            after = getattr(again, encode)(image if encode == "encode_image" else text)
            if not torch.allclose(before, after, rtol=1e-5, atol=1e-6):
                raise _fail(where, "save-load", f"{encode} differs after save_pretrained and loading the folder "
                                                f"(state the tower keeps outside its state_dict?)")


def _freezer_where(t: _Tower) -> str:
    if registry.has(FREEZER, t.entry.name):
        return registry.get(FREEZER, t.entry.name).where
    return f"{t.entry.where}, locked by clipkit's default freezer (lock_layer_groups over its layer_groups())"


def _freezer(t: _Tower, model: Built) -> None:
    where = _freezer_where(t)
    tower = t.tower(model)
    vision = t.entry.kind == VISION_TOWER
    lock = model.lock_image_tower if vision else model.lock_text_tower
    names = {id(p): n for n, p in tower.named_parameters()}
    groups = list(tower.layer_groups())
    last = {id(p) for item in groups[-1] for p in ([item] if isinstance(item, nn.Parameter) else item.parameters())}

    def trainable(unlocked: int) -> Set[str]:
        try:
            lock(unlocked)
        except Exception as exc:
            raise _fail(where, "freezer", f"locking with {unlocked} unlocked groups raised {exc!r}") from exc
        return {n for n, p in tower.named_parameters() if p.requires_grad}

    everything = set(names.values())
    locked = trainable(0)
    leaked = sorted(n for i, n in names.items() if n in locked and i not in last)
    if leaked:
        raise _fail(where, "freezer", f"with 0 unlocked groups {len(leaked)} parameter(s) outside the last layer "
                                      f"group stay trainable: {_names(leaked)}")
    sets = [locked, trainable(1), trainable(2)]
    for fewer, more in zip(sets, sets[1:]):
        if not fewer <= more:
            raise _fail(where, "freezer", f"unlocking more groups froze {_names(sorted(fewer - more))}")
    frozen = sorted(everything - trainable(len(groups) + 100))
    if frozen:
        raise _fail(where, "freezer", f"with every group unlocked {_names(frozen)} stay frozen")
    if trainable(0) != locked:
        raise _fail(where, "freezer", "locking again after unlocking does not give the same trainable set "
                                      "(each lock must start from scratch, so resumed runs can change it)")
    if vision:
        _bn_stats_frozen(t, model, where, last)


def _bn_stats_frozen(t: _Tower, model: Built, where: str, last: Set[int]) -> None:
    """freeze_bn_stats keeps the running statistics of locked BatchNorms, across model.train() too."""
    tower = t.tower(model)
    norms = [(n, m) for n, m in tower.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and not any(id(p) in last for p in m.parameters())]
    if not norms:
        return
    model.lock_image_tower(0, freeze_bn_stats=True)
    model.train()
    # track_running_stats (checked above) means the buffers exist
    before = {n: torch.as_tensor(m.running_mean).clone() for n, m in norms}
    with torch.no_grad():
        t.forward(model)
    moved = [n for n, m in norms if not torch.equal(torch.as_tensor(m.running_mean), before[n])]
    if moved:
        raise _fail(where, "freezer", f"with freeze_bn_stats the running statistics of locked BatchNorms "
                                      f"{_names(moved)} still change in train mode")


def _stages(t: _Tower, model: Built) -> None:
    """The optional stage protocol: ``forward_tail(forward_head(x, n), n)`` is ``forward(x)`` for every ``n``,
    and each state is a tensor or a tuple of tensors with the batch first (the trainer caches it per sample)."""
    where, tower = t.entry.where, t.tower(model)
    if not (callable(getattr(tower, "forward_head", None)) and callable(getattr(tower, "forward_tail", None))):
        return  # towers without it are cached only when fully locked
    model.eval()
    image, text = t.inputs(model)
    x = image if t.entry.kind == VISION_TOWER else text
    with torch.no_grad():
        whole = tower(x)
        for n in range(len(list(tower.layer_groups())) + 1):
            try:
                state = tower.forward_head(x, n)
                out = tower.forward_tail(state, n)
            except ClipkitError:
                continue  # refusing a split clearly is allowed: that prefix is then not cached
            except Exception as exc:
                raise _fail(where, "stages", f"forward_head/forward_tail with n={n} raised {exc!r}") from exc
            parts = state if isinstance(state, tuple) else (state,)
            if not parts or not all(isinstance(p, torch.Tensor) and p.ndim >= 1 and p.shape[0] == BATCH
                                    for p in parts):
                raise _fail(where, "stages", f"forward_head(x, {n}) must return a tensor or a tuple of tensors "
                                             f"with the batch ({BATCH}) first")
            got, ref = (out, whole) if isinstance(whole, tuple) else ((out,), (whole,))
            if not isinstance(got, tuple) or len(got) != len(ref) or not all(
                    isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                    for a, b in zip(got, ref)):
                raise _fail(where, "stages", f"forward_tail(forward_head(x, {n}), {n}) differs from forward(x) "
                                             f"in eval mode")


def _on_tower(check: Callable[[_Tower, Built], None]) -> Callable[[Entry, Any], None]:
    """A tower check as a contract check: build the tower (in a model) from ``section``, then check it."""
    def run(entry: Entry, section: Optional[Mapping[str, Any]]) -> None:
        tower = _Tower(entry, section)
        check(tower, tower.model())
    return run


#: The checks of ``vision_tower`` and ``text_tower`` parts (clipkit.kinds names them by this attribute).
TOWER_CHECKS: Dict[str, Callable[[Entry, Any], None]] = {name: _on_tower(check) for name, check in {
    "builds": _builds, "output-shape": _output_shape, "output-tokens": _output_tokens,
    "layer-groups": _layer_groups, "backward": _backward, "grad-checkpointing": _grad_checkpointing,
    "autocast": _autocast, "save-load": _save_load, "freezer": _freezer, "stages": _stages,
}.items()}


# -- tokenizers, poolers, model configs, freezers alone, plugins --------------------------------------

def _tokenizer(entry: Entry, text_cfg: Optional[Mapping[str, Any]], contract: str
               ) -> Tuple[Callable[..., torch.Tensor], Mapping[str, Any]]:
    text_cfg = entry.meta.get("example") if text_cfg is None else text_cfg
    if text_cfg is None:
        raise _fail(entry.where, contract, "it registered no example= text_cfg to build it from; pass "
                                           "example={} (or the keys it needs) to register()")
    try:
        return entry.load()(dict(text_cfg), CONTEXT, **dict(text_cfg.get("tokenizer_kwargs") or {})), text_cfg
    except Exception as exc:
        raise _fail(entry.where, contract, f"building it from {dict(text_cfg)} raised {exc!r}") from exc


def _token_ids(entry: Entry, section: Optional[Mapping[str, Any]]) -> None:
    tokenizer, _ = _tokenizer(entry, section, "token-ids")
    where = entry.where
    try:
        ids, single, again = tokenizer(TEXTS), tokenizer(TEXTS[0]), tokenizer(TEXTS)
    except Exception as exc:
        raise _fail(where, "token-ids", f"tokenizing raised {exc!r}") from exc
    for got, rows in ((ids, len(TEXTS)), (single, 1)):
        if not isinstance(got, torch.Tensor) or got.dtype != torch.long or tuple(got.shape) != (rows, CONTEXT):
            shape = f"{got.dtype} {list(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise _fail(where, "token-ids", f"{rows} text(s) at context_length {CONTEXT} gave {shape}; expected "
                                            f"LongTensor [{rows}, {CONTEXT}]")
    if not torch.equal(ids, again) or not torch.equal(single[0], ids[0]):
        raise _fail(where, "token-ids", "the same text gives different ids (between calls, or alone and in a batch)")
    if (ids < 0).any() or torch.equal(ids[0], ids[2]):
        raise _fail(where, "token-ids", "ids are negative, or different texts give the same ids")


def _special_ids(entry: Entry, section: Optional[Mapping[str, Any]]) -> None:
    from .tokenizer import _check_special_ids, get_tokenizer

    tokenizer, text_cfg = _tokenizer(entry, section, "special-ids")
    (vision, _, vit_name), (text_section, _, text_name) = _tower_keys(spec(VISION_TOWER)), _tower_keys(spec(TEXT_TOWER))
    vit, transformer = registry.get(VISION_TOWER, vit_name), registry.get(TEXT_TOWER, text_name)
    default: Dict[str, Any] = {
        "embed_dim": EMBED_DIM, vision: {"type": vit.name, **vit.meta["example"]},
        text_section: {"type": transformer.name, **transformer.meta["example"],
                            **{k: v for k, v in text_cfg.items() if k in TOKENIZER_KEYS}, "tokenizer": entry.name}}
    checks: List[Tuple[str, Dict[str, Any], Any]] = [("a builtin text transformer", default, tokenizer)]
    for model in registry.entries(MODEL_CONFIG):  # the plugin's own configs that use this tokenizer
        data = get_model_config(model.name) if model.plugin is entry.plugin else None
        own = data.get("text_cfg") if isinstance(data, dict) else None
        if data is not None and isinstance(own, dict) and infer_tokenizer(own) == entry.name:
            try:
                checks.append((f"model config {model.name!r}", data, get_tokenizer(model.name)))
            except ClipkitError as exc:
                raise _fail(entry.where, "special-ids", str(exc)) from exc
    for label, cfg, tok in checks:
        try:
            config = validate_model_config(cfg, source=label)
            _check_special_ids(label, config, tok)
        except ClipkitError as exc:
            raise _fail(entry.where, "special-ids", str(exc)) from exc
        vocab = getattr(config.text, "vocab_size", None)
        highest = int(tok(TEXTS).max())
        if vocab is not None and highest >= vocab:
            raise _fail(entry.where, "special-ids", f"id {highest} is outside the vocabulary of {label} "
                                                    f"(vocab_size {vocab})")


def _pooler(entry: Entry, cfg: Any) -> nn.Module:
    try:
        pooler = entry.load()(cfg)
    except Exception as exc:
        raise _fail(entry.where, "pooled-shape", f"factory({cfg!r}) raised {exc!r}") from exc
    if not isinstance(pooler, nn.Module):
        raise _fail(entry.where, "pooled-shape", f"factory returned {type(pooler).__name__}, not an nn.Module")
    return pooler


def _pool_inputs() -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 7, 16, generator=gen)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, length in enumerate((7, 4, 1)):  # real tokens first, then padding
        mask[row, :length] = 1
    return hidden, mask


def _pool(entry: Entry, pooler: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, contract: str) -> torch.Tensor:
    try:
        with torch.no_grad():
            out = pooler(hidden, mask, None)  # as the hf tower calls it: (hidden, mask, pooler_output)
    except Exception as exc:
        raise _fail(entry.where, contract, f"pooler(hidden [3, 7, 16], mask [3, 7], None) raised {exc!r}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (3, 16) or not torch.isfinite(out).all():
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _fail(entry.where, contract, f"pooling hidden states [3, 7, 16] gave {shape}; expected finite [3, 16]")
    return out


def _pooled_shape(entry: Entry, cfg: Any) -> None:
    hidden, mask = _pool_inputs()
    _pool(entry, _pooler(entry, cfg), hidden, mask, "pooled-shape")


def _attention_mask(entry: Entry, cfg: Any) -> None:
    pooler = _pooler(entry, cfg)
    hidden, mask = _pool_inputs()
    out = _pool(entry, pooler, hidden, mask, "attention-mask")
    padded = hidden.masked_fill(mask.unsqueeze(-1) == 0, 1e4)
    if not torch.allclose(_pool(entry, pooler, padded, mask, "attention-mask"), out):
        raise _fail(entry.where, "attention-mask", "changing the hidden states of masked-out (padding) tokens "
                                                   "changes the pooled output")
    real = hidden + mask.unsqueeze(-1)
    if torch.allclose(_pool(entry, pooler, real, mask, "attention-mask"), out):
        raise _fail(entry.where, "attention-mask", "the pooled output does not depend on the real tokens")


def _validates(entry: Entry, section: Any) -> None:
    data = get_model_config(entry.name)
    if data is None:
        raise _fail(entry.where, "validates", "the config cannot be read (see the warning logged by clipkit)")
    try:
        validate_model_config(data, source=entry.where, name=entry.name)
    except ClipkitError as exc:
        raise _fail(entry.where, "validates", str(exc)) from exc


def _freezer_alone(entry: Entry, section: Optional[Mapping[str, Any]]) -> None:
    for kind in spec(FREEZER).keyed_by:
        if registry.has(kind, entry.name):
            tower = _Tower(registry.get(kind, entry.name), section)
            _freezer(tower, tower.model())
            return
    raise _fail(entry.where, "freezer", f"no tower type {entry.name!r} is installed to lock with it")


def _loads(name: str) -> None:
    plugin = registry.find_plugin(name)
    if plugin is None:
        installed = ", ".join(p.name for p in registry.plugins() if not p.builtin) or "none"
        raise _fail(f"plugin {name!r}", "loads", f"clipkit does not see it (installed plugins: {installed}); install "
                                                 f"it (pip install -e .) and list its module under "
                                                 f"[project.entry-points.clipkit] in pyproject.toml")
    if plugin.status != "active":
        reason = plugin.error or "disabled by CLIPKIT_DISABLE_PLUGINS"
        raise _fail(f"plugin {plugin.label}", "loads", f"it is {plugin.status}: {reason}")
    if not plugin.registered:
        raise _fail(f"plugin {plugin.label}", "loads", "it registers nothing; are its hook functions decorated "
                                                       "with @clipkit.hookimpl?")


_IMPORT_CHECK = """
import sys
from clipkit.kinds import KINDS
from clipkit.registry import registry
entries = [e for kind in KINDS for e in registry.entries(kind) if e.plugin.name == sys.argv[1]]
for entry in entries:
    entry.config_class()
print(",".join(m for m in sys.argv[2:] if m in sys.modules))
"""


def _imports_without_torch(name: str) -> None:
    plugin = registry.find_plugin(name)
    if plugin is None:
        return _loads(name)
    done = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, plugin.name, *HEAVY], capture_output=True, text=True)
    if done.returncode != 0:
        raise _fail(f"plugin {plugin.label}", "imports-without-torch", f"loading it failed: {done.stderr.strip()}")
    heavy = done.stdout.strip()
    if heavy:
        raise _fail(f"plugin {plugin.label}", "imports-without-torch",
                    f"importing the plugin module and its config classes imports {heavy}; clipkit loads plugins "
                    f"in every process (data workers, `clipkit models`), so import those inside factories and "
                    f"register factories as 'package.module:attr' strings")


# -- model families -------------------------------------------------------------------------------------

def _family_model(entry: Entry, section: Optional[Mapping[str, Any]], contract: str) -> nn.Module:
    """The family's example config (or ``section``, a whole model config) built, with dict outputs."""
    from .factory import build_model

    example = section if section is not None else entry.meta.get("example")
    if example is None:
        raise _fail(entry.where, contract, "it registered no example= config to build it from; pass example={...} "
                                           "(a whole small model config of the family) to register()")
    try:
        config = validate_model_config({**example, spec(MODEL_FAMILY).select_key: entry.name}, source="its example")
        torch.manual_seed(0)
        return build_model(config, output_dict=True)
    except ClipkitError as exc:
        raise _fail(entry.where, contract, str(exc)) from exc
    except Exception as exc:
        raise _fail(entry.where, contract, f"building raised {exc!r}") from exc


def _family_outputs(entry: Entry, model: nn.Module, contract: str) -> Dict[str, torch.Tensor]:
    tower = _Tower.__new__(_Tower)  # only its input maker is wanted: the towers are the model's
    image, text = tower.inputs(model)
    model.eval()
    try:
        with torch.no_grad():
            out = model(image, text)
    except Exception as exc:
        raise _fail(entry.where, contract, f"forward(image, text) raised {exc!r}") from exc
    if not isinstance(out, Mapping):
        raise _fail(entry.where, contract, f"with output_dict, forward returned {type(out).__name__}, not a dict")
    return dict(out)


def _family_builds(entry: Entry, section: Optional[Mapping[str, Any]]) -> None:
    _family_model(entry, section, "builds")  # the model protocol is checked by every build


def _family_forward(entry: Entry, section: Optional[Mapping[str, Any]]) -> None:
    model: Any = _family_model(entry, section, "forward")  # a family's model: its protocol, not nn.Module's
    out = _family_outputs(entry, model, "forward")
    missing = [key for key in ("image_features", "text_features", "logit_scale") if out.get(key) is None]
    if missing:
        raise _fail(entry.where, "forward", f"forward's dict lacks {', '.join(missing)}")
    for key in ("image_features", "text_features"):
        if out[key].shape[0] != BATCH or not torch.isfinite(out[key]).all():
            raise _fail(entry.where, "forward", f"{key} has shape {list(out[key].shape)} for a batch of {BATCH}, "
                                                f"or non-finite values")
    image, text = _Tower.inputs(_Tower.__new__(_Tower), model)
    with torch.no_grad():
        encoded = model.encode_image(image, normalize=True)
    if not torch.allclose(encoded, out["image_features"], rtol=1e-4, atol=1e-5):
        raise _fail(entry.where, "forward", "forward's image_features differ from encode_image(image, normalize=True)")
    model.output_dict = False
    with torch.no_grad():
        first = model(image, text)
    # a family may return its dict always (as OpenCLIP's own model of that family does)
    first = tuple(first.values()) if isinstance(first, Mapping) else first
    if not isinstance(first, tuple) or not torch.equal(first[0], out["image_features"]):
        raise _fail(entry.where, "forward", "without output_dict, forward must return a tuple starting with "
                                            "image_features, text_features, logit_scale (or the dict)")


def _family_save_load(entry: Entry, section: Optional[Mapping[str, Any]]) -> None:
    model = _family_model(entry, section, "save-load")
    again = _family_model(entry, section, "save-load")
    with torch.no_grad():
        for param in again.parameters():
            param.add_(1.0)
    try:
        again.load_state_dict(model.state_dict(), strict=True)
    except Exception as exc:
        raise _fail(entry.where, "save-load", f"its own state dict does not load strictly: {exc}") from exc
    first, second = _family_outputs(entry, model, "save-load"), _family_outputs(entry, again, "save-load")
    for key, value in first.items():
        if isinstance(value, torch.Tensor) and not torch.equal(value, second[key]):
            raise _fail(entry.where, "save-load", f"after loading its state dict, output {key!r} differs")


# the checks of the other kinds, by contract (clipkit.kinds names each mapping as its kind's checks)
TOKENIZER_CHECKS = {"token-ids": _token_ids, "special-ids": _special_ids}
POOLER_CHECKS = {"pooled-shape": _pooled_shape, "attention-mask": _attention_mask}
MODEL_CONFIG_CHECKS = {"validates": _validates}
FREEZER_CHECKS = {"freezer": _freezer_alone}
MODEL_FAMILY_CHECKS = {"builds": _family_builds, "forward": _family_forward, "save-load": _family_save_load}


def run(case: Any, section: Optional[Mapping[str, Any]] = None) -> None:
    """Run one ``clipkit.testing.Case``, on one thread: the parts are built tiny, and for tiny tensors
    intra-op threads cost more than they save (ten times more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(case, section)
    finally:
        torch.set_num_threads(threads)


def _run(case: Any, section: Optional[Mapping[str, Any]]) -> None:
    if case.kind == "plugin":
        return {"loads": _loads, "imports-without-torch": _imports_without_torch}[case.contract](case.name)
    if not registry.has(case.kind, case.name):
        raise ContractError(f"{case}: no {case.kind} {case.name!r} is registered now; "
                            + registry.unknown_message(case.kind, case.name))
    entry = registry.get(case.kind, case.name)
    kind = spec(case.kind)
    checks = import_target(kind.checks, what=f"the contract checks of kind {kind.name!r}") if kind.checks else {}
    if case.contract not in checks:
        raise ContractError(f"{case}: kind {kind.name!r} has no contract {case.contract!r} (it has "
                            f"{', '.join(checks) or 'none'})")
    checks[case.contract](entry, section)
