"""Locked computation done once (clipkit.train.lock_cache): cached runs end with the weights of uncached
ones, a resumed run with a warm cache with those of an uninterrupted one; stale entries are never used;
locked parts run in eval mode; the optional stage protocol is held to its contract."""
import json
import logging

import pytest
import torch
from torch import nn

import clipkit
from _train_support import TINY_MODEL, base_args, run_inprocess, start_train, write_dataset, write_model
from clipkit.errors import ContractError
from clipkit.freeze import eval_frozen_parts, locked_prefix
from clipkit.testing import contract_cases
from clipkit.train.lock_cache import Budget, TowerCache, fingerprint, row_keys

TEXT_LOCK = ("--lock-text", "--lock-text-freeze-layer-norm")


def _tiny(tmp_path, cfg=None):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg or TINY_MODEL))
    return clipkit.create_model(str(path))


# -- the cache on a tower --------------------------------------------------------------------------

def _forward_backward(tower, x, cache, keys):
    tower.zero_grad(set_to_none=True)
    cache.keys = keys
    try:
        out = tower(x)
    finally:
        cache.keys = None
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}


def test_a_cached_prefix_gives_the_outputs_and_gradients_of_the_tower(tmp_path):
    torch.manual_seed(0)
    model = _tiny(tmp_path)
    model.lock_text_tower(2, freeze_layer_norm=True)
    model.train()
    tower = model.text
    assert locked_prefix(tower) == 2 and len(tower.layer_groups()) == 4
    cache = TowerCache("text", tower, 2, 4, "fp", Budget(2 ** 30))
    cache.install()
    x = torch.randint(1, 1000, (8, 16), generator=torch.Generator().manual_seed(0))
    x[3], x[6] = x[0], x[1]  # duplicates: through the trainable rest once, their gradients summed
    plain_out, plain_grads = _forward_backward(tower, x, cache, None)
    keys = row_keys(x)
    for expected_hits in (0, 8):  # computed, then read back
        out, grads = _forward_backward(tower, x, cache, keys)
        assert cache.hits == expected_hits
        assert cache.merge and len(cache.entries) == 6
        # merged duplicates make the trainable rest's batch 6 rows, not 8: float32 sums in another order, a few
        # ulps of the largest value apart (measured over 20 initialisations: 4.8e-7 of outputs up to 3.3, and
        # 4.3e-7 of each gradient's largest entry), so the bounds are relative to that scale
        torch.testing.assert_close(out, plain_out, rtol=0, atol=1e-6 * plain_out.abs().max().item())
        assert grads.keys() == plain_grads.keys() and grads
        for name, grad in grads.items():
            expected = plain_grads[name]
            torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5 * expected.abs().max().item(), msg=name)
    cache.uninstall()
    assert "forward" not in tower.__dict__


def test_a_tower_that_refuses_its_split_is_run_whole_and_says_why(tmp_path, caplog):
    from clipkit.errors import ClipkitError

    caplog.set_level(logging.INFO, logger="clipkit.train")
    model = _tiny(tmp_path)
    model.lock_text_tower(2, freeze_layer_norm=True)
    tower = model.text

    def refuse(x, n):
        raise ClipkitError("no split here")

    tower.forward_head = refuse
    cache = TowerCache("text", tower, 2, 4, "fp", Budget(2 ** 30))
    cache.install()
    x = torch.randint(1, 1000, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = tower(x)
        cache.keys = row_keys(x)
        cached = tower(x)
    assert torch.equal(plain, cached) and not cache.enabled and not cache.entries
    assert "text tower (TextTransformer): the state after 2 of 4 layer groups not cached: computing it apart " \
           "failed: no split here" in caplog.text


def test_the_budget_stops_insertion_when_full(tmp_path):
    model = _tiny(tmp_path)
    model.lock_text_tower(0, freeze_layer_norm=True)
    tower = model.text
    per_row = 32 * 4  # one pooled feature row of embed_dim 32, fp32
    cache = TowerCache("text", tower, 4, 4, "fp", Budget(3 * per_row))
    cache.install()
    x = torch.randint(1, 1000, (8, 16), generator=torch.Generator().manual_seed(1))
    cache.keys = row_keys(x)
    with torch.no_grad():
        first = tower(x)
        again = tower(x)
    cache.keys = None
    assert len(cache.entries) == 3 and cache.budget.used == 3 * per_row  # the first three, never evicted
    assert torch.equal(first, again) and cache.hits == 3


def _saved_cache(tmp_path, model, prefix):
    tower = model.text
    lock = {"unlocked": 4 - prefix}
    cache = TowerCache("text", tower, prefix, 4, fingerprint(tower, prefix, lock, "fp32", TINY_MODEL["text_cfg"]),
                       Budget(2 ** 30))
    cache.install()
    x = torch.randint(1, 1000, (4, 16), generator=torch.Generator().manual_seed(2))
    cache.keys = row_keys(x)
    with torch.no_grad():
        tower(x)
    cache.keys = None
    cache.save(tmp_path, 0, 1)
    cache.save(tmp_path, 0, 1)  # nothing new: no second file
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["text.rank0.00000.safetensors"]
    cache.uninstall()
    return cache


def _reloaded(tmp_path, model, prefix):
    tower = model.text
    lock = {"unlocked": 4 - prefix}
    cache = TowerCache("text", tower, prefix, 4, fingerprint(tower, prefix, lock, "fp32", TINY_MODEL["text_cfg"]),
                       Budget(2 ** 30))
    cache.load(tmp_path, 0, 1, torch.device("cpu"))
    return cache


def test_persisted_entries_read_back_only_for_the_same_weights_lock_and_world(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="clipkit.train")
    model = _tiny(tmp_path)
    model.lock_text_tower(2, freeze_layer_norm=True)
    saved = _saved_cache(tmp_path, model, 2)
    again = _reloaded(tmp_path, model, 2)
    assert again.loaded == 4 and again.entries.keys() == saved.entries.keys()
    assert all(torch.equal(a, b) for k in saved.entries for a, b in zip(saved.entries[k], again.entries[k]))

    assert again.chunks == 1  # its next save writes file 00001
    x = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(4))
    again.install()
    again.keys = row_keys(x)
    with torch.no_grad():
        model.text(x)
    again.keys = None
    again.uninstall()
    again.save(tmp_path, 0, 1)  # only the two new entries
    assert _reloaded(tmp_path, model, 2).loaded == 6
    (tmp_path / "copy").mkdir()
    for path in tmp_path.glob("*.safetensors"):
        (tmp_path / "copy" / path.name).write_bytes(path.read_bytes())
    other_world = TowerCache("text", model.text, 2, 4, again.fingerprint, Budget(2 ** 30))
    other_world.load(tmp_path / "copy", 0, 2, torch.device("cpu"))
    assert other_world.loaded == 0 and "written by a run of 1 processes" in caplog.text
    assert not list((tmp_path / "copy").glob("*.safetensors"))  # removed: this run rebuilds them

    model.lock_text_tower(1, freeze_layer_norm=True)  # a changed lock: another prefix
    assert _reloaded(tmp_path, model, 3).loaded == 0
    assert not list(tmp_path.glob("*.safetensors"))
    model.lock_text_tower(2, freeze_layer_norm=True)
    _saved_cache(tmp_path, model, 2)
    with torch.no_grad():  # a changed weight file: other values of the locked parameters
        model.text.token_embedding.weight[5] += 1
    stale = _reloaded(tmp_path, model, 2)
    assert stale.loaded == 0 and not stale.entries
    assert "rebuilding it" in caplog.text

    _saved_cache(tmp_path, model, 2)
    path = tmp_path / "text.rank0.00000.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # torn
    assert _reloaded(tmp_path, model, 2).loaded == 0
    assert "ignoring unreadable" in caplog.text and not path.exists()


def test_a_random_image_transform_leaves_a_locked_image_tower_uncached_and_says_what_to_do(tmp_path, caplog):
    from clipkit.train.args import parse_args
    from clipkit.train.lock_cache import build, transform_is_random

    caplog.set_level(logging.INFO, logger="clipkit.train")
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_MODEL))
    model, train, val = clipkit.create_model_and_transforms(str(path))
    assert transform_is_random(train) and not transform_is_random(val)
    model.lock_image_tower(0)
    settings = parse_args(["--model", str(path), "--dataset-type", "synthetic", "--train-num-samples", "8",
                           "--lock-image"])
    assert build(model, settings, None, 0, 1, torch.device("cpu"), True, False) is None
    assert "training transform is random" in caplog.text and "--lock-image-eval-preprocess" in caplog.text
    cache = build(model, settings, None, 0, 1, torch.device("cpu"), False, False)
    assert cache is not None and cache.wants("image") and not cache.wants("text")
    cache.close()
    model.lock_image_tower(1)  # a locked prefix is no more cacheable with random inputs
    assert build(model, settings, None, 0, 1, torch.device("cpu"), True, False) is None
    assert "a wholly locked image tower can use --lock-image-eval-preprocess" in caplog.text


def test_the_log_says_when_trainable_norms_end_the_locked_prefix(tmp_path, caplog):
    from clipkit.train.args import parse_args
    from clipkit.train.lock_cache import build

    caplog.set_level(logging.INFO, logger="clipkit.train")
    model = _tiny(tmp_path)
    model.lock_text_tower(1, freeze_layer_norm=False)  # OpenCLIP's CLI default: locked layers' norms train
    settings = parse_args(["--model", str(tmp_path / "tiny.json"), "--dataset-type", "synthetic",
                           "--train-num-samples", "8", "--lock-text", "--lock-text-unlocked-layers", "1"])
    cache = build(model, settings, None, 0, 1, torch.device("cpu"), False, False)
    assert cache is not None and cache.towers["text"].prefix == 1  # the embeddings only
    assert "the locked prefix ends at 1 of 4 layer groups because --lock-text leaves the norms of locked layers " \
           "trainable; --lock-text-freeze-layer-norm freezes them" in caplog.text
    cache.close()


def test_frozen_parts_run_in_eval_mode(tmp_path):
    model = _tiny(tmp_path)
    model.lock_text_tower(1, freeze_layer_norm=True)
    model.train()
    names = eval_frozen_parts(model.text)
    assert names == ["token_embedding", "transformer", "ln_final"]  # the largest frozen parts
    assert not model.text.transformer.resblocks[0].training and model.text.training
    model.lock_text_tower(2, freeze_layer_norm=True)
    model.train()
    assert eval_frozen_parts(model.text) == ["token_embedding", "transformer.resblocks.0"]
    assert model.text.transformer.resblocks[1].training
    model.lock_text_tower(0, freeze_layer_norm=True)
    model.train()
    assert eval_frozen_parts(model.text) == [""] and not any(m.training for m in model.text.modules())


# -- the stage protocol's contract -----------------------------------------------------------------

class _Staged(nn.Module):
    def __init__(self, cfg, ctx):
        super().__init__()
        self.image_size, self.output_dim = 16, ctx.embed_dim
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, ctx.embed_dim)

    def forward(self, image):
        return self.proj(self.conv(image).mean(dim=(2, 3)))

    def forward_head(self, image, n):
        return self.conv(image).mean(dim=(2, 3)) if n == 1 else image if n == 0 else self(image)

    def forward_tail(self, state, n):
        return self.proj(state * 1.5) if n == 1 else self(state) if n == 0 else state  # 1.5: the bug

    def layer_groups(self):
        return [[self.conv], [self.proj]]

    def set_grad_checkpointing(self, enable=True):
        pass


@clipkit.hookimpl
def register_vision_towers(register):
    register("badstages", _Staged, example={})


def test_the_contract_catches_a_tail_that_does_not_continue_the_head(clipkit_plugins):
    clipkit_plugins.module("badstageparts", register_vision_towers=register_vision_towers)
    cases = {str(case): case for case in contract_cases("badstageparts")}
    (name,) = [n for n in cases if n.endswith(":stages")]
    with pytest.raises(ContractError, match=r"'badstages' .* breaks the contract 'stages': "
                                            r"forward_tail\(forward_head\(x, 1\), 1\) differs from forward\(x\)"):
        cases[name].run()


# -- whole runs --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lockcache")
    return {"root": root, "data": write_dataset(root / "data", shards=2, per_shard=8),
            "model": write_model(root), "logs": root / "logs"}


def _run(env, name, *flags, expect=0):
    args = base_args(env["model"], env["data"], env["logs"], name, "--workers", "0", *flags)
    assert run_inprocess(args) == expect
    return torch.load(env["logs"] / name / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]


def _log(env, name):
    return (env["logs"] / name / "out.log").read_text()


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("lock", ["text", "image"])
def test_a_wholly_locked_tower_cached_ends_bit_identical(env, lock):
    # text with accumulation: the GradCache path runs the towers twice per micro-batch, both through the cache
    flags = (*TEXT_LOCK, "--accum-freq", "2") if lock == "text" else ("--lock-image", "--lock-image-eval-preprocess")
    cached = _run(env, f"full-{lock}", *flags)
    plain = _run(env, f"full-{lock}-plain", *flags, "--no-lock-cache")
    _assert_equal(cached, plain)
    log = _log(env, f"full-{lock}")
    assert f"lock cache: {lock} tower" in log and "whole tower cached per sample" in log
    # the second epoch sees the same inputs: every one is read back
    # (with accumulation each sample is looked up twice)
    lookups = 32 if lock == "text" else 16
    assert f"epoch 2 lock cache: {lock} tower hit rate 100.0% ({lookups} of {lookups} lookups)" in log
    assert (env["logs"] / f"full-{lock}" / "lock_cache" / f"{lock}.rank0.00000.safetensors").is_file()


@pytest.mark.slow
def test_a_partially_locked_text_tower_with_duplicate_captions(env):
    # SGD: under Adam, parameters whose gradient is zero but for rounding (the key bias of attention)
    # move by the learning rate in a direction the rounding picks, so no tolerance could compare them
    flags = (*TEXT_LOCK, "--lock-text-unlocked-layers", "2", "--opt", "timm/sgd", "--momentum", "0.9")
    cached = _run(env, "prefix", *flags)
    plain = _run(env, "prefix-plain", *flags, "--no-lock-cache")
    # merged rows sum their gradients in another order: rounding differences only. Within 1e-6 of the
    # weights' scale over the model; per tensor within 1e-4 (biases that started at zero are small)
    assert cached.keys() == plain.keys()
    scale = max(v.abs().max() for v in plain.values() if v.is_floating_point())
    for key, value in plain.items():
        assert (cached[key] - value).abs().max() <= 1e-6 * scale, key
        assert torch.allclose(cached[key], value, rtol=1e-4, atol=1e-9), key
    assert any(not torch.equal(cached[k], plain[k]) for k in plain)  # merged: not the same sums
    log = _log(env, "prefix")
    assert "the state after 2 of 4 layer groups cached per sample; identical inputs in a batch run the " \
           "trainable rest once" in log
    assert "epoch 2 lock cache: text tower hit rate 100.0%" in log


STOP_AFTER_STEP = """
import os, signal
from clipkit.train import trainer as _trainer
_step = _trainer.Trainer._step
def _stopping_step(self, *args, **kwargs):
    out = _step(self, *args, **kwargs)
    if self.position.step + 1 == 3:  # epoch 2 of 2-step epochs: stop (save, then exit) after its first step
        os.kill(os.getpid(), signal.SIGTERM)
    return out
_trainer.Trainer._step = _stopping_step
"""


def _child(args, wrapper=""):
    proc = start_train(args, wrapper=wrapper)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.slow
def test_stopped_mid_epoch_and_resumed_with_a_warm_cache_is_bit_identical(env):
    # every run in a child process: one thread each, as the comparison needs
    flags = (*TEXT_LOCK, "--lock-text-unlocked-layers", "1", "--save-every-n-steps", "100")
    straight = base_args(env["model"], env["data"], env["logs"], "resume-straight", "--workers", "0", *flags)
    assert _child(straight)[0] == 0
    args = base_args(env["model"], env["data"], env["logs"], "resumed", "--workers", "0", *flags)
    code, err = _child(args, STOP_AFTER_STEP)
    assert code != 0 and "stopped by SIGTERM at epoch 2 step 1" in err, err[-2000:]
    assert list((env["logs"] / "resumed" / "lock_cache").glob("text.rank0.*.safetensors"))
    code, err = _child(args + ["--resume", "latest"])
    assert code == 0, err[-2000:]
    assert "entries read back" in err
    final = "checkpoints/epoch_2.pt"
    _assert_equal(torch.load(env["logs"] / "resumed" / final, weights_only=True)["state_dict"],
                  torch.load(env["logs"] / "resume-straight" / final, weights_only=True)["state_dict"])

    # resumed with a different lock, the entries of the first are not used
    code, err = _child(args + ["--resume", "latest", "--lock-text-unlocked-layers", "2", "--epochs", "3"])
    assert code == 0, err[-2000:]
    assert "is for other weights, lock or settings; rebuilding it" in err
    assert "epoch 3 lock cache: text tower hit rate" in err and "hit rate 100.0%" not in err


@pytest.mark.slow
def test_locked_dropout_is_off_unless_lock_train_mode_and_then_nothing_is_cached(env, tmp_path):
    from test_hf_tower import MINILM

    cfg = {"embed_dim": 32, "vision_cfg": TINY_MODEL["vision_cfg"],
           "text_cfg": {"hf_model_name": str(MINILM), "hf_tokenizer_name": str(MINILM), "context_length": 16}}
    model = write_model(tmp_path, "minilm-tiny", cfg)
    flags = (*TEXT_LOCK, "--lock-text-unlocked-layers", "1", "--epochs", "1")
    final = {}
    for name, extra in (("hf", ()), ("hf-plain", ("--no-lock-cache",)), ("hf-train-mode", ("--lock-train-mode",))):
        args = base_args(model, env["data"], env["logs"], name, "--workers", "0", *flags, *extra)
        assert run_inprocess(args) == 0
        final[name] = torch.load(env["logs"] / name / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    # MiniLM's layers have dropout: off in the locked ones, so their outputs are cached, but on in the
    # trainable last layer, so identical captions of a batch are not merged, and the run is bit-identical
    assert "the state after 6 of 9 layer groups cached per sample; identical inputs in a batch are not merged" \
           in _log(env, "hf")
    _assert_equal(final["hf"], final["hf-plain"])
    assert "not cached: the locked computation gives different results for the same input in training" \
           in _log(env, "hf-train-mode")
    # dropout on in the locked layers draws other masks: the weights differ
    assert any(not torch.equal(final["hf"][k], final["hf-train-mode"][k]) for k in final["hf"])
