"""Transformer building blocks shared by the builtin towers (and free for plugins to reuse).

Parameter names follow OpenCLIP's (``attn.in_proj_weight``, ``mlp.c_fc``, ``ls_1.gamma`` ...) so its
state dicts load unchanged; attention runs through ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16/bf16 weights keep a stable norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation, ``x * sigmoid(1.702 x)``; its pretrained weights need it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT), initialised to ``init_value``."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def make_act(quick_gelu: bool, act_kwargs: Optional[Dict[str, Any]]) -> Callable[[], nn.Module]:
    """The activation constructor a config asks for (``act_kwargs`` go to it, e.g. GELU's ``approximate``)."""
    act = QuickGELU if quick_gelu else nn.GELU
    return partial(act, **act_kwargs) if act_kwargs else act


def make_norm(norm_kwargs: Optional[Dict[str, Any]]) -> Callable[[int], nn.Module]:
    return partial(LayerNorm, **norm_kwargs) if norm_kwargs else LayerNorm


class Attention(nn.Module):
    """Multi-head self-attention with OpenCLIP's weight layout and its optional extras.

    ``qk_norm`` normalises queries and keys per head; ``scaled_cosine`` uses cosine similarity times a
    learned per-head temperature (Swin v2), capped at 100; ``scale_heads`` scales each head's output
    (NormFormer); ``inner_norm`` normalises the heads' concatenation before the output projection.
    """

    def __init__(self, dim: int, heads: int, *, qk_norm: bool = False, scaled_cosine: bool = False,
                 scale_heads: bool = False, inner_norm: bool = False,
                 norm_layer: Callable[[int], nn.Module] = LayerNorm):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.ln_q = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.ln_k = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.logit_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(10.0))) if scaled_cosine else None
        self.head_scale = nn.Parameter(torch.ones(heads, 1, 1)) if scale_heads else None
        self.ln_inner = norm_layer(dim) if inner_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if is_causal and (attn_mask is not None or self.logit_scale is not None):
            causal = torch.full((length, length), float("-inf"), dtype=q.dtype, device=x.device).triu(1)
            attn_mask = causal if attn_mask is None else attn_mask + causal
            is_causal = False
        if self.logit_scale is not None:
            # cosine similarity times a per-head temperature, capped at 1/0.01 as in Swin v2
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            scores = scores * self.logit_scale.clamp(max=math.log(100.0)).exp()
            if attn_mask is not None:
                scores = scores + attn_mask
            out = scores.softmax(dim=-1) @ v
        else:
            q, k = self.ln_q(q), self.ln_k(k)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        if self.head_scale is not None:
            out = out * self.head_scale
        out = out.transpose(1, 2).reshape(batch, length, dim)
        projected: torch.Tensor = self.out_proj(self.ln_inner(out))
        return projected


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + ls_1(attn(ln_1 x))``, then ``x + ls_2(mlp(ln_2 x))``.

    ``scale_attn`` adds a norm after attention and ``scale_fc`` one inside the MLP (NormFormer);
    with none of the extras the parameters are exactly OpenCLIP's default block.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, *, ls_init_value: Optional[float] = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable[[int], nn.Module] = LayerNorm,
                 qk_norm: bool = False, scaled_cosine_attn: bool = False, scale_heads: bool = False,
                 scale_attn_inner: bool = False, scale_attn: bool = False, scale_fc: bool = False):
        super().__init__()
        self.ln_1 = norm_layer(width)
        self.attn = Attention(width, heads, qk_norm=qk_norm, scaled_cosine=scaled_cosine_attn,
                              scale_heads=scale_heads, inner_norm=scale_attn_inner, norm_layer=norm_layer)
        self.ln_attn = norm_layer(width) if scale_attn else nn.Identity()
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = norm_layer(width)
        hidden = int(width * mlp_ratio)
        layers = [("c_fc", nn.Linear(width, hidden)), ("gelu", act_layer())]
        if scale_fc:
            layers.append(("ln", norm_layer(hidden)))
        layers.append(("c_proj", nn.Linear(hidden, width)))
        self.mlp = nn.Sequential(OrderedDict(layers))
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.ls_1(self.ln_attn(self.attn(self.ln_1(x), attn_mask, is_causal)))
        mlp: torch.Tensor = self.ls_2(self.mlp(self.ln_2(x)))
        return x + mlp


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` (``resblocks``), batch-first, with checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, **block_kwargs: Any):
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, **block_kwargs) for _ in range(layers))

    @property
    def cast_dtype(self) -> torch.dtype:
        """The dtype activations enter the blocks in: that of the blocks' matmul weights."""
        block: Any = self.resblocks[0]  # a ResidualAttentionBlock (nn.ModuleList indexes as Module)
        dtype: torch.dtype = block.mlp.c_fc.weight.dtype
        return dtype

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Blocks ``start`` to ``stop`` (all by default): towers run a locked prefix apart from the rest."""
        for index, block in enumerate(self.resblocks):
            if index < start or stop is not None and index >= stop:
                continue
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask, is_causal)
        return x


class AttentionalPooler(nn.Module):
    """Cross-attention of ``n_queries`` learned queries over the tokens (the contrastive captioners' pooler)."""

    def __init__(self, d_model: int, context_dim: int, heads: int = 8, n_queries: int = 256,
                 norm_layer: Callable[[int], nn.Module] = LayerNorm):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = norm_layer(d_model)
        self.ln_k = norm_layer(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        pooled: torch.Tensor = self.attn(q, x, x, need_weights=False)[0]
        return pooled
