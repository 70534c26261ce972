"""Contract tests over every registered part: a plugin is tested the moment it registers.

Towers are built from the ``example`` their registration gives, beside the other kind's builtin
example; tokenizers from their ``example`` text_cfg (the 'hf' one needs a tokenizer folder, so its
tests live in test_tokenizers.py).
"""
import pytest
import torch

from clipkit.config import validate_model_config
from clipkit.factory import build_model
from clipkit.registry import registry

EMBED = 24


def _towers(kind):
    return [e.name for e in registry.entries(kind) if e.meta.get("example")]


def _model(vision=None, text=None):
    v = registry.get("vision_tower", vision or "vit")
    t = registry.get("text_tower", text or "transformer")
    cfg = {"embed_dim": EMBED, "vision_cfg": {"type": v.name, **v.meta["example"]},
           "text_cfg": {"type": t.name, **t.meta["example"]}}
    torch.manual_seed(0)
    return build_model(validate_model_config(cfg, source="contract"))


def _batch(model):
    size = model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    text = torch.randint(1, 1000, (2, model.text.context_length))
    text[:, -1] = model.text.vocab_size - 1
    return torch.randn(2, 3, h, w), text


@pytest.fixture(params=[("vision", n) for n in _towers("vision_tower")] + [("text", n) for n in _towers("text_tower")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    side, name = request.param
    model = _model(vision=name) if side == "vision" else _model(text=name)
    return model, (model.visual if side == "vision" else model.text), side


def test_forward_shape_and_protocol(case):
    model, tower, side = case
    image, text = _batch(model)
    out = model.encode_image(image) if side == "vision" else model.encode_text(text)
    assert out.shape == (2, EMBED) and torch.isfinite(out).all()
    assert tower.output_dim == EMBED


def test_layer_groups_cover_every_parameter_once(case):
    _, tower, _ = case
    grouped = []
    for group in tower.layer_groups():
        for item in group:
            grouped += [item] if isinstance(item, torch.nn.Parameter) else list(item.parameters())
    assert sorted(map(id, grouped)) == sorted(map(id, tower.parameters()))


def test_backward_and_grad_checkpointing_agree(case):
    model, tower, side = case
    image, text = _batch(model)

    def grads():
        model.zero_grad()
        out = model.encode_image(image) if side == "vision" else model.encode_text(text)
        out.square().sum().backward()
        return [p.grad.clone() for p in tower.parameters() if p.grad is not None]

    plain = grads()
    assert plain, "no parameter received a gradient"
    tower.set_grad_checkpointing(True)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unlocked", [0, 1, 2, 100])
def test_freezer_leaves_frozen_parameters_untouched_by_a_step(case, unlocked):
    model, tower, side = case
    lock = model.lock_image_tower if side == "vision" else model.lock_text_tower
    lock(unlocked)
    frozen = {n: p.detach().clone() for n, p in tower.named_parameters() if not p.requires_grad}
    groups = len(tower.layer_groups())
    assert (len(frozen) == 0) == (unlocked >= groups)
    image, text = _batch(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    img, txt, scale = model(image, text)
    (scale * img @ txt.T).logsumexp(dim=1).mean().backward()
    optimizer.step()
    for name, param in tower.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.parametrize("name", [e.name for e in registry.entries("tokenizer") if "example" in e.meta])
def test_tokenizers_return_long_ids_of_the_context_length(name):
    entry = registry.get("tokenizer", name)
    tokenizer = entry.load()(entry.meta["example"], 12)
    ids = tokenizer(["a photo of a cat", ""])
    assert ids.dtype == torch.long and ids.shape == (2, 12)
