"""A HuggingFace encoder as a text tower: tokens -> encoder -> pooler -> projection to embed_dim.

Parameter names are OpenCLIP's ``HFTextEncoder`` ones (``transformer.*``, ``proj.*``), so its
state dicts load directly.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..._trust import hf_loading, remote_code_allowed
from ...errors import ClipkitError
from ...freeze import lock_layer_groups
from ...hookspecs import TowerContext
from ...kinds import POOLER
from ...registry import registry
from . import HFTextCfg

#: how messages name the model a config's text tower loads
WHAT = "text_cfg.hf_model_name"


def _load_encoder(cfg: HFTextCfg, pretrained: bool, cache_dir: Any) -> Tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModel

    name = cfg.hf_model_name
    # always explicit: None would make transformers prompt [y/N] on a terminal (and wait) for a
    # repository with its own code; only the caller's opt-in counts, never cfg.trust_remote_code
    trust = remote_code_allowed()
    with hf_loading(WHAT, name, lambda reason: f"{WHAT} {name!r} cannot be loaded ({reason}); offline, point it at "
                                               f"a local folder with the model's config (and weights)", also=(ValueError,)):
        config = AutoConfig.from_pretrained(name, cache_dir=cache_dir, trust_remote_code=trust)
    kwargs = {"trust_remote_code": trust}
    if not getattr(config, "is_encoder_decoder", False):
        model_class = _model_class(config)
        # BERT-like models build their own pooler only when it will be used (OpenCLIP's parameter set)
        if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
            kwargs["add_pooling_layer"] = cfg.hf_pooler_type == "cls_pooler"
    with hf_loading(WHAT, name, lambda reason: f"{WHAT} {name!r}: pretrained weights cannot be loaded ({reason}); "
                                               f"set hf_model_pretrained false or use a local folder"):
        if pretrained:
            model = AutoModel.from_pretrained(name, config=config, cache_dir=cache_dir, **kwargs)
        else:
            model = AutoModel.from_config(config, **kwargs)
    if getattr(config, "is_encoder_decoder", False):
        model = model.get_encoder()  # T5/mT5, NLLB: the text tower is the encoder half
    return model, config


def _model_class(config: Any) -> Any:  # the model class (or None); transformers types its table loosely
    from transformers import AutoModel

    try:
        return AutoModel._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return None


def _find_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of layers: the longest ModuleList of identical blocks."""
    best = None
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 \
                and len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ClipkitError(f"{type(encoder).__name__}: no list of transformer layers found; this encoder "
                           f"cannot be locked by layers")
    return best


class HFTextTower(nn.Module):
    # a transformers model: get_input_embeddings, gradient checkpointing and its config are transformers' API,
    # which torch's nn.Module typing (unknown attributes are Tensor | Module) cannot describe
    transformer: Any

    def __init__(self, cfg: HFTextCfg, output_dim: int, pretrained: bool, cache_dir: Any = None):
        super().__init__()
        self.cfg = cfg
        self.transformer, self.config = _load_encoder(cfg, pretrained, cache_dir)
        self.pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        self.vocab_size = self.config.vocab_size
        self.context_length = cfg.context_length
        limit = getattr(self.config, "max_position_embeddings", None)
        embeddings: Any = getattr(self.transformer, "embeddings", None)
        if limit and isinstance(getattr(embeddings, "padding_idx", None), int):
            limit -= embeddings.padding_idx + 1  # RoBERTa-style positions start after the padding index
        if limit and cfg.context_length > limit:
            raise ClipkitError(f"text_cfg.context_length {cfg.context_length} exceeds the {limit} positions of "
                               f"{cfg.hf_model_name}")
        hidden = getattr(self.config, "hidden_size", getattr(self.config, "d_model", None))
        if cfg.width is not None and cfg.width != hidden:
            raise ClipkitError(f"text_cfg.width is {cfg.width} but {cfg.hf_model_name} is {hidden} wide")
        self.output_dim = output_dim
        self.output_tokens = cfg.output_tokens
        self._returns_tuple: Optional[bool] = None
        self._stages_refused = False
        self.pooler = registry.get(POOLER, cfg.hf_pooler_type, where="text_cfg.hf_pooler_type").load()(cfg)
        width = self.transformer.get_input_embeddings().embedding_dim
        if cfg.hf_proj_type in (None, "none"):
            if width != output_dim:
                raise ClipkitError(f"text_cfg.hf_proj_type is none but {cfg.hf_model_name} is {width} wide and "
                                   f"embed_dim is {output_dim}; use linear or mlp")
            self.proj: nn.Module = nn.Identity()
        elif cfg.hf_proj_type == "linear":
            self.proj = nn.Linear(width, output_dim, bias=False)
        else:
            hidden = (width + output_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                                      nn.Linear(hidden, output_dim, bias=False))

    def layer_groups(self) -> List[Sequence[Union[nn.Module, nn.Parameter]]]:
        """Embeddings (everything before the layers), each layer, what follows them, the projection."""
        layers = _find_layers(self.transformer)
        in_layers = {id(p) for p in layers.parameters()}
        before: List[nn.Parameter] = []
        after: List[nn.Parameter] = []
        seen_layers = False
        for param in self.transformer.parameters():
            if id(param) in in_layers:
                seen_layers = True
            else:
                (after if seen_layers else before).append(param)
        return [before, *[[layer] for layer in layers], after, [self.proj, self.pooler]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not getattr(self.transformer, "supports_gradient_checkpointing", False):
            raise ClipkitError(f"{self.cfg.hf_model_name}: this encoder does not support gradient checkpointing")
        model = self.transformer
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names
            if enable:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.activation_checkpointing_disable()
        elif enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()

    def forward(self, text: torch.Tensor) -> Any:
        """``[B, output_dim]``, or ``(pooled, tokens)`` with ``output_tokens``."""
        mask = (text != self.pad_id).long()
        out = self.transformer(input_ids=text, attention_mask=mask)
        return self._head(text, out.last_hidden_state, getattr(out, "pooler_output", None))

    def _head(self, text: torch.Tensor, hidden: torch.Tensor, pooler_output: Optional[torch.Tensor]) -> Any:
        mask = (text != self.pad_id).long()
        pooled = self.proj(self.pooler(hidden, mask, pooler_output))
        if not self.output_tokens:
            return pooled
        position = getattr(self.pooler, "cls_token_position", None)
        tokens = hidden if position is None else torch.cat([hidden[:, :position], hidden[:, position + 1:]], dim=1)
        return pooled, tokens

    # the optional stage protocol (docs/plugins.md). Groups: [embeddings, *layers, after the layers, head].
    # The state after n groups, token ids last: n = 1..k, the hidden states entering layer n-1; n = k+1, those
    # leaving the last layer; n = k+2, the encoder's output (and its pooler output when it has one)
    def forward_head(self, text: torch.Tensor, n: int) -> Any:
        """The state after the first ``n`` layer groups."""
        layers = _find_layers(self.transformer)
        if n == 0:
            return text
        if n >= len(layers) + 2:
            mask = (text != self.pad_id).long()
            out = self.transformer(input_ids=text, attention_mask=mask)
            pooler_output = getattr(out, "pooler_output", None)
            if n == len(layers) + 3:
                return self._head(text, out.last_hidden_state, pooler_output)
            return (out.last_hidden_state, text) + ((pooler_output,) if pooler_output is not None else ())
        self._layer_returns_tuple(layers, text)  # refuses encoders whose layers pass more than hidden states
        captured: List[torch.Tensor] = []

        def stop_before(_module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        def stop_after(_module: nn.Module, _args: Tuple[Any, ...], output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = (layers[n - 1].register_forward_pre_hook(stop_before, with_kwargs=True) if n <= len(layers)
                  else layers[-1].register_forward_hook(stop_after))
        try:
            self.transformer(input_ids=text, attention_mask=(text != self.pad_id).long())
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0], text

    def forward_tail(self, state: Any, n: int) -> Any:
        """The output from the state after ``n`` layer groups: ``forward_tail(forward_head(x, n), n) == forward(x)``."""
        layers = _find_layers(self.transformer)
        if n == 0:
            return self.forward(state)
        if n == len(layers) + 3:
            return state
        if n == len(layers) + 2:
            return self._head(state[1], state[0], state[2] if len(state) > 2 else None)
        hidden, text = state
        as_tuple = self._layer_returns_tuple(layers, text)
        # the layers before the state are skipped (they return their input untouched) and the state
        # replaces the hidden states where it was taken; the embeddings still run (a lookup, cheap)
        skipped = list(layers[: n - 1])

        def passthrough(hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> Any:
            return (hidden_states,) if as_tuple else hidden_states

        def put_before(_module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
                       ) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        def put_after(_module: nn.Module, _args: Tuple[Any, ...], output: Any) -> Any:
            return ((hidden,) + tuple(output[1:])) if isinstance(output, tuple) else hidden

        handle = (layers[n - 1].register_forward_pre_hook(put_before, with_kwargs=True) if n <= len(layers)
                  else layers[-1].register_forward_hook(put_after))
        for layer in skipped:
            layer.forward = passthrough
        try:
            mask = (text != self.pad_id).long()
            out = self.transformer(input_ids=text, attention_mask=mask)
        finally:
            handle.remove()
            for layer in skipped:
                del layer.forward
        return self._head(text, out.last_hidden_state, getattr(out, "pooler_output", None))

    def _layer_returns_tuple(self, layers: nn.ModuleList, text: torch.Tensor) -> bool:
        """Whether the encoder's layers return a 1-tuple (older transformers) or the hidden states alone;
        found once by running the first layer on one sample. Layers that hand more to the next one (T5's
        position bias) cannot be resumed from hidden states: the stages are refused."""
        if self._returns_tuple is None:
            seen: List[Any] = []

            def probe(_module: nn.Module, _args: Tuple[Any, ...], output: Any) -> None:
                seen.append(output)
                raise _Stop

            handle = layers[0].register_forward_hook(probe)
            # the probe draws no random numbers that training would see (dropout in train mode)
            devices = [text.device] if text.device.type == "cuda" else []
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=devices):
                    self.transformer(input_ids=text[:1], attention_mask=(text[:1] != self.pad_id).long())
            except _Stop:
                pass
            finally:
                handle.remove()
            output = seen[0]
            if isinstance(output, tuple) and len(output) > 1:
                self._returns_tuple = False
                self._stages_refused = True
            else:
                self._returns_tuple = isinstance(output, tuple)
        if self._stages_refused:
            raise ClipkitError(f"{self.cfg.hf_model_name}: its layers pass more than hidden states to the next "
                               f"one, so a locked prefix cannot be computed apart (no forward_head/forward_tail)")
        return self._returns_tuple


class _Stop(Exception):
    """Ends an encoder's forward once the hidden states a stage needs are taken."""


def build_hf_text(cfg: HFTextCfg, ctx: TowerContext) -> HFTextTower:
    """Factory registered as text tower ``hf``."""
    return HFTextTower(cfg, ctx.embed_dim, pretrained=cfg.hf_model_pretrained and ctx.pretrained,
                       cache_dir=ctx.cache_dir)


def lock_hf_text(tower: HFTextTower, unlocked: int = 0, *, freeze_layer_norm: bool = True,
                 freeze_bn_stats: bool = False) -> None:
    """Lock all but the last ``unlocked`` encoder layers; the projection (added by clipkit) stays trainable.

    With ``unlocked >= 1`` whatever follows the layers (a final norm, BERT's pooler) is trainable too.
    """
    if not isinstance(unlocked, int) or unlocked < 0:
        raise ClipkitError(f"unlocked layers must be an int >= 0, got {unlocked!r}")
    # groups: [embeddings, *layers, after, head]; the head always, after-layers with any layer
    groups = unlocked + 2 if unlocked else 1
    lock_layer_groups(tower, groups, freeze_layer_norm=freeze_layer_norm, freeze_bn_stats=freeze_bn_stats)
