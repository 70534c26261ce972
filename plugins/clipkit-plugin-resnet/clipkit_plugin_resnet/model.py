"""OpenAI's ModifiedResNet: a 3-convolution stem, four stages of bottleneck blocks, attention pooling.

Parameter names and shapes are those of OpenCLIP's ``ModifiedResNet`` (OpenAI CLIP's layout), so
OpenAI and OpenCLIP RN checkpoints load unchanged. Unlike a torchvision ResNet it has three stem
convolutions and an average pool instead of one convolution and a max pool; every stride-2 step is
an average pool followed by a stride-1 convolution (anti-aliasing); and the head is QKV attention
over the final feature map, queried by its mean, instead of global average pooling.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from functools import partial
from typing import Iterator, List, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from clipkit.hookspecs import TowerContext

from . import ResNetCfg


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> (avgpool if strided) -> 1x1 expand by 4, plus a shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # the shortcut downsamples the same way; "-1" keeps OpenAI's parameter names 0 and 1
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        out += x if self.downsample is None else self.downsample(x)
        return self.act3(out)


class AttentionPool2d(nn.Module):
    """Multi-head attention over the ``grid x grid`` feature map, prefixed by its mean as the query token."""

    def __init__(self, grid: int, width: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) / width ** 0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)
        self.num_heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, width = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, width] -> [B, heads, L, width // heads]
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        # only the mean token's output is kept, so it is the only query (OpenCLIP computes all, keeps it)
        out = F.scaled_dot_product_attention(heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.c_proj(out.transpose(1, 2).reshape(batch, width))


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A residual stage: its first block changes width (and resolution when strided)."""
    return nn.Sequential(Bottleneck(inplanes, planes, stride),
                         *[Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)])


def _batch_norms(module: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    return (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@contextlib.contextmanager
def _restore_bn_stats(block: nn.Module):
    """Recomputing a checkpointed block in backward runs its BatchNorms a second time; put their
    running statistics back afterwards, so a step updates them once, as without checkpointing."""
    saved = [(buf, buf.clone()) for bn in _batch_norms(block) if bn.training
             for buf in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _recompute_contexts(block: nn.Module):
    return contextlib.nullcontext(), _restore_bn_stats(block)


class ModifiedResNet(nn.Module):
    """The image tower: ``forward(images [B, 3, S, S]) -> [B, output_dim]``."""

    def __init__(self, cfg: ResNetCfg, output_dim: int):
        super().__init__()
        self.output_dim = output_dim
        self.image_size = cfg.image_size
        self.grad_checkpointing = False
        width = cfg.width

        # the stem halves the resolution twice: stride-2 conv1, then the average pool
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        # stage i: width * 2**i bottleneck channels, 4x that out; stages 2-4 halve the resolution
        self.layer1 = _stage(width, width, cfg.layers[0], stride=1)
        self.layer2 = _stage(width * 4, width * 2, cfg.layers[1], stride=2)
        self.layer3 = _stage(width * 8, width * 4, cfg.layers[2], stride=2)
        self.layer4 = _stage(width * 16, width * 8, cfg.layers[3], stride=2)

        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads(), output_dim)
        self._init_parameters()

    def _init_parameters(self) -> None:
        std = self.attnpool.c_proj.in_features ** -0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        # each residual branch starts as zero, so every block starts as its shortcut
        for stage in self.stages():
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def stages(self) -> List[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def layer_groups(self) -> List[Sequence[Union[nn.Module, nn.Parameter]]]:
        """stem, layer1, layer2, layer3, layer4, attnpool: ``unlocked=N`` trains the last N."""
        stem = [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]
        return [stem, *[[stage] for stage in self.stages()], [self.attnpool]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each bottleneck block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(image.to(self.conv1.weight.dtype))
        for stage in self.stages():
            for block in stage:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False, context_fn=partial(_recompute_contexts, block))
                else:
                    x = block(x)
        return self.attnpool(x)


def build_resnet(cfg: ResNetCfg, ctx: TowerContext) -> ModifiedResNet:
    """Factory registered as vision tower ``resnet``.

    ``ctx.quick_gelu`` does not apply: the tower uses ReLU only, as OpenCLIP's does (the flag still
    selects the text tower's activation).
    """
    return ModifiedResNet(cfg, ctx.embed_dim)
