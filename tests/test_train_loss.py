"""Losses, metrics and schedules against OpenCLIP 3.3.0's own implementations."""
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from clipkit.train.loss import ClipLoss, SigLipLoss, clip_metrics
from clipkit.train.schedule import learning_rate


def _features(n=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_clip_loss_equals_openclip():
    from open_clip.loss import ClipLoss as Reference

    image, text = _features()
    scale = torch.tensor(20.0)
    assert torch.allclose(ClipLoss()(image, text, scale), Reference()(image, text, scale), atol=1e-6)
    bias = torch.tensor(-1.5)
    assert torch.allclose(ClipLoss()(image, text, scale, bias), Reference()(image, text, scale, bias), atol=1e-6)


def test_siglip_loss_equals_openclip():
    from open_clip.loss import SigLipLoss as Reference

    image, text = _features()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    assert torch.allclose(SigLipLoss()(image, text, scale, bias), Reference()(image, text, scale, bias), atol=1e-5)


def test_clip_metrics_equal_openclip():
    from open_clip_train.train import get_clip_metrics

    image, text = _features(n=40)
    text = F.normalize(text + 0.8 * image, dim=-1)  # some structure, so ranks vary
    ours = clip_metrics(image, text, 30.0)
    theirs = get_clip_metrics(image, text, torch.tensor(30.0))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(float(theirs[key]), abs=1e-6), key


def _args(**kw):
    base = dict(lr=1e-3, warmup=10, lr_scheduler="cosine", epochs_cooldown=None, lr_cooldown_power=1.0,
                lr_cooldown_end=0.0)
    base.update(kw)
    return Namespace(**base)


@pytest.mark.parametrize("kind", ["cosine", "const", "const-cooldown"])
def test_schedules_equal_openclip(kind):
    from open_clip_train import scheduler

    steps_per_epoch, epochs = 7, 6
    total = steps_per_epoch * epochs
    args = _args(lr_scheduler=kind, epochs_cooldown=2, lr_cooldown_power=2.0, lr_cooldown_end=1e-5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = {"cosine": lambda: scheduler.cosine_lr(opt, 1e-3, 10, total),
           "const": lambda: scheduler.const_lr(opt, 1e-3, 10, total),
           "const-cooldown": lambda: scheduler.const_lr_cooldown(opt, 1e-3, 10, total, steps_per_epoch * 2, 2.0, 1e-5),
           }[kind]()
    for step in range(total):
        ref(step)
        assert learning_rate(args, step, total, steps_per_epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
