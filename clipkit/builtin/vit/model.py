"""The builtin Vision Transformer: patches -> class token + positions -> transformer -> pool -> project."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from ...hookspecs import TowerContext
from ...layers import AttentionalPooler, Transformer, make_act, make_norm
from . import ViTCfg, _pair


def sincos_2d_position_embedding(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (MAE), ``[grid*grid + 1, width]`` with a zero row for the class token.

    Half the channels encode the row, half the column; each half is ``[sin(p w), cos(p w)]`` with
    frequencies ``w_i = 10000^(-i / (width/4))``.
    """
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # MAE lays the grid out with x (column) as the first meshgrid axis and encodes it first
    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()


class PatchDropout(nn.Module):
    """Keep a random subset of patch tokens while training (FLIP); the class token always stays."""

    def __init__(self, prob: float):
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        cls, patches = x[:, :1], x[:, 1:]
        keep = max(1, int(patches.shape[1] * (1.0 - self.prob)))
        idx = torch.rand(patches.shape[:2], device=x.device).topk(keep, dim=-1).indices
        patches = torch.gather(patches, 1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([cls, patches], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTCfg, output_dim: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        self.image_size = _pair(cfg.image_size)
        self.patch_size = _pair(cfg.patch_size)
        self.grid_size = cfg.grid()
        self.output_dim = output_dim
        self.output_tokens = cfg.output_tokens
        self.pool_type = cfg.pool_type
        width = cfg.width
        norm = make_norm(cfg.norm_kwargs)
        scale = width ** -0.5

        self.conv1 = nn.Conv2d(3, width, kernel_size=self.patch_size, stride=self.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        num_pos = self.grid_size[0] * self.grid_size[1] + 1
        if cfg.pos_embed_type == "sin_cos_2d":
            self.positional_embedding = nn.Parameter(sincos_2d_position_embedding(width, self.grid_size[0]),
                                                     requires_grad=False)
        else:
            self.positional_embedding = nn.Parameter(scale * torch.randn(num_pos, width))
        self.patch_dropout = PatchDropout(cfg.patch_dropout) if cfg.patch_dropout > 0 else nn.Identity()
        self.ln_pre = nn.Identity() if cfg.no_ln_pre else norm(width)
        self.transformer = Transformer(
            width, cfg.layers, width // cfg.head_width, cfg.mlp_ratio, act_layer=make_act(quick_gelu, cfg.act_kwargs),
            norm_layer=norm, **cfg.block_kwargs())
        if cfg.attentional_pool:
            self.attn_pool: Optional[AttentionalPooler] = AttentionalPooler(
                output_dim, width, heads=cfg.attn_pooler_heads, n_queries=cfg.attn_pooler_queries, norm_layer=norm)
            pool_dim = output_dim
        else:
            self.attn_pool = None
            pool_dim = width
        self.ln_post = norm(pool_dim)
        self.proj = nn.Parameter(scale * torch.randn(pool_dim, output_dim))

    def layer_groups(self) -> List[Sequence[Union[nn.Module, nn.Parameter]]]:
        """OpenCLIP's lock groups: stem, each block but the last, last block + head norm, projection."""
        blocks = list(self.transformer.resblocks)
        head = [blocks[-1]] + ([self.attn_pool] if self.attn_pool is not None else []) + [self.ln_post]
        return [[self.conv1, self.class_embedding, self.positional_embedding, self.ln_pre],
                *[[block] for block in blocks[:-1]], head, [self.proj]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> Set[str]:
        return {"positional_embedding", "class_embedding"}

    def _pool(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1), x[:, 1:]
        if self.pool_type == "tok":
            return x[:, 0], x[:, 1:]
        return x, x

    def forward(self, image: torch.Tensor) -> Any:
        """``[B, output_dim]``, or ``(pooled, tokens)`` with ``output_tokens``."""
        return self._groups(image, 0, len(self.transformer.resblocks) + 2)

    def forward_head(self, image: torch.Tensor, n: int) -> Any:
        """The state after the first ``n`` layer groups (the optional stage protocol, docs/plugins.md)."""
        return self._groups(image, 0, n)

    def forward_tail(self, state: Any, n: int) -> Any:
        """The output from the state after ``n`` layer groups: ``forward_tail(forward_head(x, n), n) == forward(x)``."""
        return self._groups(state, n, len(self.transformer.resblocks) + 2)

    def _groups(self, x: Any, start: int, stop: int) -> Any:
        # group 0: the stem; 1..L-1: one block each; L: the last block, pooling and ln_post; L+1: the projection
        layers = len(self.transformer.resblocks)
        if start == 0 < stop:
            x = self.conv1(x.to(self.conv1.weight.dtype))  # [B, width, grid_h, grid_w]
            x = x.flatten(2).transpose(1, 2)  # [B, grid_h * grid_w, width]
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
            x = self.ln_pre(self.patch_dropout(x)).to(self.transformer.cast_dtype)
        first, last = max(start, 1) - 1, min(stop, layers + 1) - 1
        if first < last:
            x = self.transformer(x, start=first, stop=last)
        if start <= layers < stop:
            x = self._head(x)
        if stop == layers + 2 and start <= layers + 1:
            pooled, tokens = x
            pooled = pooled @ self.proj.to(pooled.dtype)
            x = (pooled, tokens) if self.output_tokens else pooled
        return x

    def _head(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.attn_pool is not None:
            return self._pool(self.ln_post(self.attn_pool(x)))
        if self.cfg.final_ln_after_pool:
            pooled, tokens = self._pool(x)
            return self.ln_post(pooled), tokens
        return self._pool(self.ln_post(x))


def build_vit(cfg: ViTCfg, ctx: TowerContext) -> VisionTransformer:
    """Factory registered as vision tower ``vit``."""
    return VisionTransformer(cfg, ctx.embed_dim, quick_gelu=ctx.quick_gelu)
