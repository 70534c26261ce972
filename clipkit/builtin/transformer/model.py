"""The builtin text transformer: tokens + positions -> transformer -> final norm -> pool -> project."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from ...hookspecs import TowerContext
from ...layers import Transformer, make_act, make_norm
from . import TextTransformerCfg


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextTransformerCfg, output_dim: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.pad_id = cfg.pad_id
        self.eos_id = cfg.eos_id
        self.pool_type = cfg.pool_type
        self.output_tokens = cfg.output_tokens
        self.causal = not cfg.no_causal_mask
        width = cfg.width
        norm = make_norm(cfg.norm_kwargs)

        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        # the class token, when used, is appended after the text and gets the last position
        self.cls_emb = nn.Parameter(torch.empty(width)) if cfg.embed_cls else None
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length + int(cfg.embed_cls), width))
        self.transformer = Transformer(
            width, cfg.layers, cfg.heads, cfg.mlp_ratio, act_layer=make_act(quick_gelu, cfg.act_kwargs),
            norm_layer=norm, **cfg.block_kwargs())
        self.ln_final = norm(width)
        if cfg.proj_type == "none":
            self.text_projection: Union[nn.Parameter, nn.Linear, None] = None
            self.output_dim = width
        elif cfg.proj_bias:
            self.text_projection = nn.Linear(width, output_dim)
            self.output_dim = output_dim
        else:
            self.text_projection = nn.Parameter(torch.empty(width, output_dim))
            self.output_dim = output_dim
        self._init_weights()

    def _init_weights(self) -> None:
        # OpenAI CLIP's text init: small embeddings, residual projections scaled down with depth
        width, depth = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        proj_std = width ** -0.5 * (2 * depth) ** -0.5
        block: Any  # a ResidualAttentionBlock (nn.ModuleList iterates as Module)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=width ** -0.5)
            nn.init.zeros_(self.text_projection.bias)
        elif self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=width ** -0.5)

    def layer_groups(self) -> List[Sequence[Union[nn.Module, nn.Parameter]]]:
        """OpenCLIP's lock groups: embeddings, each block but the last, last block + ln_final, projection."""
        blocks = list(self.transformer.resblocks)
        stem: List[Union[nn.Module, nn.Parameter]] = [self.token_embedding, self.positional_embedding]
        stem += [self.cls_emb] if self.cls_emb is not None else []
        groups: List[Sequence[Union[nn.Module, nn.Parameter]]] = [stem, *[[b] for b in blocks[:-1]],
                                                                  [blocks[-1], self.ln_final]]
        if self.text_projection is not None:
            groups.append([self.text_projection])
        return groups

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> Set[str]:
        return {"positional_embedding"} | ({"cls_emb"} if self.cls_emb is not None else set())

    def _pool(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "first":
            return x[:, 0]
        if self.pool_type == "last":
            return x[:, -1]
        if self.pool_type == "argmax":  # CLIP's end token has the highest id in its vocabulary
            index = text.argmax(dim=-1)
        elif self.pool_type == "eos":
            index = (text == self.eos_id).int().argmax(dim=-1)
        else:
            return x
        return x[torch.arange(x.shape[0], device=x.device), index]

    def forward(self, text: torch.Tensor) -> Any:
        """``[B, output_dim]``, or ``(pooled, tokens)`` with ``output_tokens``."""
        return self._groups(text, 0, self._group_count())

    def forward_head(self, text: torch.Tensor, n: int) -> Any:
        """The state after the first ``n`` layer groups (the optional stage protocol, docs/plugins.md)."""
        return self._groups(text, 0, n)

    def forward_tail(self, state: Any, n: int) -> Any:
        """The output from the state after ``n`` layer groups: ``forward_tail(forward_head(x, n), n) == forward(x)``."""
        return self._groups(state, n, self._group_count())

    def _groups(self, x: Any, start: int, stop: int) -> Any:
        # group 0: the embeddings; 1..L-1: one block each; L: the last block and ln_final; L+1: the projection.
        # Between the groups the state carries the token ids, which the mask and the pooling need
        layers = len(self.transformer.resblocks)
        dtype = self.transformer.cast_dtype
        if start == 0 < stop:
            text = x
            x = self.token_embedding(text).to(dtype)
            if self.cls_emb is not None:
                x = torch.cat([x, self.cls_emb.to(dtype).expand(x.shape[0], 1, -1)], dim=1)
            x = (x + self.positional_embedding[: x.shape[1]].to(dtype), text)
        first, last = max(start, 1) - 1, min(stop, layers + 1) - 1
        if first < last:
            hidden, text = x
            x = (self.transformer(hidden, attn_mask=self._mask(text, dtype), is_causal=self.causal, start=first,
                                  stop=last), text)
        if start <= layers < stop:
            x = self._final(*x)
        if stop == layers + 2 and start <= layers + 1:
            pooled, tokens = x
            if isinstance(self.text_projection, nn.Linear):
                pooled = self.text_projection(pooled)
            elif self.text_projection is not None:
                pooled = pooled @ self.text_projection.to(pooled.dtype)
            x = (pooled, tokens)
        if stop == self._group_count() and start < stop:
            pooled, tokens = x
            return (pooled, tokens) if self.output_tokens else pooled
        return x

    def _group_count(self) -> int:
        return len(self.transformer.resblocks) + 1 + (self.text_projection is not None)

    def _mask(self, text: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
        if self.cls_emb is None:
            return None
        # OpenCLIP masks padding keys with the class token's entry placed first, although the token
        # sits last (OpenCLIP's captioner weights were trained so): key j is hidden when token j-1 is padding
        keep = torch.cat([text.new_ones(text.shape[0], 1, dtype=torch.bool), text != self.pad_id], dim=1)
        mask = torch.zeros(keep.shape, dtype=dtype, device=text.device).masked_fill(~keep, float("-inf"))
        return mask[:, None, None, :]  # [B, 1, 1, L]: broadcast over heads and queries

    def _final(self, x: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.cls_emb is not None:
            return self.ln_final(x[:, -1]), x[:, : text.shape[1]]
        if self.cfg.final_ln_after_pool:
            return self.ln_final(self._pool(x, text)), x
        x = self.ln_final(x)
        return self._pool(x, text), x


def build_text_transformer(cfg: TextTransformerCfg, ctx: TowerContext) -> TextTransformer:
    """Factory registered as text tower ``transformer``."""
    return TextTransformer(cfg, ctx.embed_dim, quick_gelu=ctx.quick_gelu)
