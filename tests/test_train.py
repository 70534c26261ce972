"""clipkit-train end to end on tiny shards: learning, outputs, locks, evaluation, failures."""
import json
import math

import pytest
import torch

import clipkit
from _train_support import (
    base_args,
    read_scalars,
    run_inprocess,
    synthetic_samples,
    weights,
    write_dataset,
    write_model,
    write_tar,
)
from clipkit.train.build import seed_everything
from clipkit.train.shards import write_shards

# nearly every test here trains a model end to end
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_dataset(root / "data", shards=4, per_shard=32)
    held_out = list(synthetic_samples(24, seed=7))
    from clipkit.train.data import SyntheticSource

    # zero-shot shards: the shape is the class
    shapes = list(SyntheticSource.SHAPES)
    for s in held_out:
        s["cls"] = str(shapes.index(s["txt"].split()[-1]))
    write_shards(held_out, root / "zs", per_shard=24)
    (root / "classnames.txt").write_text("\n".join(shapes))
    (root / "templates.json").write_text(json.dumps(["a red {}", "a blue {c}"]))
    return {"root": root, "data": data, "model": write_model(root), "logs": root / "logs",
            "val": str(root / "zs" / "00000.tar")}


@pytest.fixture(scope="module")
def main_run(env):
    """One 2-epoch run with validation, zero-shot, TensorBoard and mid-epoch saves, shared by the tests."""
    args = base_args(env["model"], env["data"], env["logs"], "main", "--val-data", env["val"],
                     "--zeroshot-data", env["val"], "--zeroshot-classnames", env["root"] / "classnames.txt",
                     "--zeroshot-templates", env["root"] / "templates.json", "--zeroshot-frequency", "1",
                     "--report-to", "tensorboard", "--save-every-n-steps", "5", "--copy-codebase")
    assert run_inprocess(args) == 0
    return env["logs"] / "main"


def test_loss_decreases_on_learnable_data(main_run):
    losses = [v for _, v in read_scalars(main_run, "train/loss")]
    assert len(losses) == 32
    assert losses[0] == pytest.approx(math.log(8), abs=0.15)  # chance for a batch of 8
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8
    rows = [json.loads(line) for line in (main_run / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert rows[1]["clip_val_loss"] < rows[0]["clip_val_loss"] < math.log(24)  # held-out pairs too


def test_run_folder_layout(main_run):
    ckpts = main_run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_1.pt", "epoch_2.pt", "epoch_latest.pt", "results.jsonl"]
    assert (main_run / "code" / "clipkit" / "train" / "trainer.py").is_file()  # --copy-codebase
    params = (main_run / "params.txt").read_text().splitlines()
    assert "batch_size: 8" in params and params == sorted(params)
    log = (main_run / "out.log").read_text()
    assert "epoch 2 data: 128 samples in 16 batches; skipped: none" in log
    checkpoint = torch.load(ckpts / "epoch_2.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["name"] == "main"
    assert {"state_dict", "optimizer", "clipkit"} <= checkpoint.keys()
    assert checkpoint["clipkit"]["step"] == 32 and checkpoint["clipkit"]["data"] is None
    assert checkpoint["clipkit_parts"]["vision_tower"]["type"] == "vit"
    assert checkpoint["clipkit_parts"]["text_tower"]["distribution"] == "clipkit-torch"
    latest = torch.load(ckpts / "epoch_latest.pt", weights_only=True)
    assert all(torch.equal(v, latest["state_dict"][k]) for k, v in checkpoint["state_dict"].items())


def test_results_and_tensorboard_scalars(main_run):
    rows = [json.loads(line) for line in (main_run / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "image_to_text_mean_rank",
                "image_to_text_median_rank", "text_to_image_R@1", "text_to_image_mean_rank", "clip_val_loss",
                "zeroshot-top1", "zeroshot-top5"):
        assert key in rows[-1], key
    assert rows[-1]["num_samples"] == 24
    assert rows[-1]["zeroshot-top5"] == 1.0  # three classes
    assert 0 <= rows[-1]["zeroshot-top1"] <= 1
    for tag in ("train/lr", "train/scale", "train/samples_per_second", "train/data_time", "val/clip_val_loss",
                "val/zeroshot-top1", "data/skipped"):
        assert read_scalars(main_run, tag), tag
    lrs = [v for _, v in read_scalars(main_run, "train/lr")]
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(2e-3) and lrs[-1] < 1e-4  # warmup 2, cosine


def test_checkpoint_loads_with_create_model_and_transforms(main_run, env):
    path = main_run / "checkpoints" / "epoch_2.pt"
    model, _, preprocess = clipkit.create_model_and_transforms(env["model"], pretrained=str(path))
    state = weights(path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _initial(model_path):
    seed_everything(0)
    return clipkit.create_model(model_path)


LOCKS = {
    "image": ["--lock-image"],
    "image-unlocked-1": ["--lock-image", "--lock-image-unlocked-groups", "1"],
    "text": ["--lock-text"],
    "text-unlocked-1-ln": ["--lock-text", "--lock-text-unlocked-layers", "1", "--lock-text-freeze-layer-norm"],
}


@pytest.mark.parametrize("lock", list(LOCKS))
def test_frozen_parameters_stay_bit_identical(env, lock):
    args = base_args(env["model"], env["data"], env["logs"], f"lock-{lock}", "--train-num-samples", "32",
                     "--epochs", "1", *LOCKS[lock])
    assert run_inprocess(args) == 0
    initial = _initial(env["model"])
    flags = LOCKS[lock]
    if "--lock-image" in flags:
        initial.lock_image_tower(unlocked_groups=int(flags[-1]) if len(flags) > 1 else 0)
    else:
        initial.lock_text_tower(unlocked_layers=int(flags[2]) if len(flags) > 1 else 0,
                                freeze_layer_norm="--lock-text-freeze-layer-norm" in flags)
    final = weights(env["logs"] / f"lock-{lock}" / "checkpoints" / "epoch_1.pt")
    params = dict(initial.named_parameters())
    frozen = [n for n, p in params.items() if not p.requires_grad]
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert frozen and trainable
    state = initial.state_dict()
    for name in frozen:
        key = name if name in final else name.removeprefix("text.")
        assert torch.equal(final[key], state[key]), name
    changed = [n for n in trainable if not torch.equal(final[n if n in final else n.removeprefix("text.")],
                                                       state[n if n in state else n.removeprefix("text.")])]
    assert len(changed) >= len(trainable) - 2  # everything trainable moved


def test_resume_with_different_lock_flags(env):
    first = base_args(env["model"], env["data"], env["logs"], "unfreeze", "--train-num-samples", "32",
                      "--lock-text")
    assert run_inprocess(first[:first.index("--epochs") + 1] + ["1"] + first[first.index("--epochs") + 2:]) == 0
    # epoch 2 with the text tower unlocked, continuing the same run
    assert run_inprocess(base_args(env["model"], env["data"], env["logs"], "unfreeze", "--train-num-samples", "32",
                                   "--resume", "latest")) == 0
    log = (env["logs"] / "unfreeze" / "out.log").read_text()
    assert "optimizer state restored by name for" in log and "start fresh (newly trainable)" in log
    one, two = (weights(env["logs"] / "unfreeze" / "checkpoints" / f"epoch_{n}.pt") for n in (1, 2))
    assert not torch.equal(one["token_embedding.weight"], two["token_embedding.weight"])


def test_existing_run_folder_needs_resume(env, capsys, main_run):
    args = base_args(env["model"], env["data"], env["logs"], "main")
    assert run_inprocess(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"clipkit-train: error: run folder {env['logs'] / 'main'} already exists: pass --resume "
                       f"latest to continue that run, or a new --name")


def test_resume_latest_without_checkpoints_starts_fresh(env):
    args = base_args(env["model"], env["data"], env["logs"], "requeued", "--train-num-samples", "16",
                     "--epochs", "1", "--resume", "latest")
    assert run_inprocess(args) == 0
    assert "--resume latest: no checkpoint in" in (env["logs"] / "requeued" / "out.log").read_text()


def test_corrupt_samples_are_skipped_and_logged_by_kind(env, tmp_path):
    good = list(synthetic_samples(40, seed=3))
    write_shards(good[:20], tmp_path / "d", per_shard=20, prefix="a")
    members = [(s["__key__"], e, s[e]) for s in good[20:] for e in ("png", "txt")]
    members += [("garbage", "png", b"\x89PNG not really"), ("garbage", "txt", "x"),
                ("empty", "jpg", b""), ("empty", "txt", "y"), ("nocap", "png", good[0]["png"])]
    write_tar(tmp_path / "d" / "b00000.tar", members)
    args = base_args(env["model"], f"{tmp_path}/d/a00000.tar::{tmp_path}/d/b00000.tar", tmp_path / "logs", "bad",
                     "--train-num-samples", "40", "--epochs", "1", "--workers", "2")
    assert run_inprocess(args) == 0
    log = (tmp_path / "logs" / "bad" / "out.log").read_text()
    assert "skipped: bad_image 1, empty_image 1, missing_caption 1;" in log


def test_mostly_broken_data_aborts(env, tmp_path):
    good = list(synthetic_samples(8, seed=4))
    members = [(s["__key__"], e, s[e]) for s in good for e in ("png", "txt")]
    members += [(f"junk{i}", e, b"junk") for i in range(20) for e in ("png", "txt")]
    write_tar(tmp_path / "x.tar", members)
    args = base_args(env["model"], str(tmp_path / "x.tar"), tmp_path / "logs", "junk", "--train-num-samples", "8",
                     "--epochs", "1", "--workers", "0")
    assert run_inprocess(args) == 1
    log = (tmp_path / "logs" / "junk" / "out.log").read_text()
    assert "20 of 28 samples were unreadable (bad_image 20), more than --max-bad-sample-fraction 0.5" in log
    assert not (tmp_path / "logs" / "junk" / "checkpoints").exists()


def test_csv_data(env, tmp_path):
    lines = ["path,caption"]
    for i, s in enumerate(synthetic_samples(16, seed=5)):
        (tmp_path / f"{i}.png").write_bytes(s["png"])
        lines.append(f"{i}.png,{s['txt']}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    args = base_args(env["model"], str(tmp_path / "train.csv"), tmp_path / "logs", "csv", "--epochs", "1",
                     "--csv-separator", ",", "--csv-img-key", "path", "--csv-caption-key", "caption")
    assert run_inprocess(args) == 0
    assert "epoch 1 data: 16 samples in 2 batches" in (tmp_path / "logs" / "csv" / "out.log").read_text()


def test_synthetic_data_learns(env, tmp_path):
    args = base_args(env["model"], "", tmp_path / "logs", "synth", "--report-to", "tensorboard")
    args = [a for a in args if a not in ("--train-data", "")] + ["--dataset-type", "synthetic",
                                                                 "--train-num-samples", "96"]
    assert run_inprocess(args) == 0
    losses = [v for _, v in read_scalars(tmp_path / "logs" / "synth", "train/loss")]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


def test_accumulation_matches_one_big_batch(env, tmp_path):
    """--accum-freq 2 with batch 4 takes the same step as batch 8: the loss sees all 8 pairs.

    Plain SGD, so that the weights show the gradients (Adam's first step is lr * sign(g), which
    magnifies float noise in gradients near zero)."""
    fixed = ["--aug-cfg", "scale=(1.0,1.0)", "ratio=(1.0,1.0)", "--epochs", "1", "--train-num-samples", "8",
             "--workers", "0", "--warmup", "0", "--lr-scheduler", "const", "--opt", "timm/momentum", "--momentum", "0"]
    big = base_args(env["model"], env["data"], tmp_path, "big", *fixed)
    small = base_args(env["model"], env["data"], tmp_path, "accum", *fixed, "--accum-freq", "2")
    small[small.index("--batch-size") + 1] = "4"
    assert run_inprocess(big) == 0 and run_inprocess(small) == 0
    a, b = weights(tmp_path / "big" / "checkpoints" / "epoch_1.pt"), weights(tmp_path / "accum" / "checkpoints" / "epoch_1.pt")
    initial = _initial(env["model"]).state_dict()
    moved = 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
        moved += not torch.equal(a[key], initial[key])
    assert moved > 10


def test_siglip_run(env, tmp_path):
    args = base_args(env["model"], env["data"], tmp_path, "siglip", "--siglip", "--epochs", "1",
                     "--train-num-samples", "32")
    assert run_inprocess(args) == 0
    state = weights(tmp_path / "siglip" / "checkpoints" / "epoch_1.pt")
    assert "logit_bias" in state and abs(state["logit_bias"].item() + 10) < 0.1
    assert abs(state["logit_scale"].item() - math.log(10)) < 0.1


def test_torchcompile_checkpoint_has_plain_keys(env, tmp_path):
    args = base_args(env["model"], env["data"], tmp_path, "compiled", "--torchcompile", "--torchcompile-backend",
                     "aot_eager", "--epochs", "1", "--train-num-samples", "16", "--grad-checkpointing")
    assert run_inprocess(args) == 0
    state = weights(tmp_path / "compiled" / "checkpoints" / "epoch_1.pt")
    assert not any("_orig_mod" in k or k.startswith("module.") for k in state)
    assert set(state) == set(_initial(env["model"]).state_dict())


def test_nonfinite_loss_stops_without_saving(env, tmp_path, monkeypatch):
    from clipkit.train import loss as loss_module

    real = loss_module.ClipLoss.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        out = real(self, *args, **kwargs)
        return out * float("nan") if len(calls) == 4 else out

    monkeypatch.setattr(loss_module.ClipLoss, "forward", poisoned)
    args = base_args(env["model"], env["data"], tmp_path, "nan", "--epochs", "1", "--save-every-n-steps", "2")
    assert run_inprocess(args) == 1
    log = (tmp_path / "nan" / "out.log").read_text()
    assert "epoch 1, step 4: the loss is nan; stopping without saving." in log
    latest = torch.load(tmp_path / "nan" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert latest["clipkit"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in latest["state_dict"].values())


def test_eval_only_run(env, tmp_path, main_run):
    args = ["--model", env["model"], "--pretrained", main_run / "checkpoints" / "epoch_2.pt", "--val-data",
            env["val"], "--zeroshot-data", env["val"], "--zeroshot-classnames", env["root"] / "classnames.txt",
            "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--logs", tmp_path, "--name", "eval"]
    assert run_inprocess(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "eval" / "checkpoints" / "results.jsonl").read_text().splitlines()]
    trained = json.loads((main_run / "checkpoints" / "results.jsonl").read_text().splitlines()[-1])
    assert rows[0]["clip_val_loss"] == pytest.approx(trained["clip_val_loss"], rel=1e-5)


def test_wandb_offline(env, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = base_args(env["model"], env["data"], tmp_path, "wb", "--epochs", "1", "--train-num-samples", "16",
                     "--report-to", "wandb", "--wandb-project-name", "clipkit-test")
    assert run_inprocess(args) == 0
    runs = list((tmp_path / "wb").rglob("offline-run-*"))
    assert runs, "no offline wandb run written"
    history = list(runs[0].rglob("*.wandb"))
    assert history and history[0].stat().st_size > 0


def test_model_from_clipkit_model_config_path(env, tmp_path, monkeypatch):
    from clipkit.config import _store

    folder = tmp_path / "configs"
    folder.mkdir()
    write_model(folder, name="from-env")
    monkeypatch.setenv("CLIPKIT_MODEL_CONFIG_PATH", str(folder))
    _store.invalidate()
    args = base_args("from-env", env["data"], tmp_path, "envcfg", "--epochs", "1", "--train-num-samples", "16")
    assert run_inprocess(args) == 0
    assert "model from-env:" in (tmp_path / "envcfg" / "out.log").read_text()


def test_imagenet_val_folder(env, tmp_path, monkeypatch, main_run):
    """--imagenet-val reads a folder per class and reports OpenCLIP's keys (class list shortened here)."""
    from clipkit import zero_shot_metadata

    monkeypatch.setattr(zero_shot_metadata, "IMAGENET_CLASSNAMES", ("square", "circle", "stripe"))
    monkeypatch.setattr(zero_shot_metadata, "OPENAI_IMAGENET_TEMPLATES", (lambda c: f"a red {c}",))
    for i, s in enumerate(synthetic_samples(12, seed=9)):
        folder = tmp_path / "val" / f"n0{['square', 'circle', 'stripe'].index(s['txt'].split()[-1])}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(s["png"])
    args = ["--model", env["model"], "--pretrained", main_run / "checkpoints" / "epoch_2.pt", "--imagenet-val",
            tmp_path / "val", "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--logs", tmp_path,
            "--name", "inet"]
    assert run_inprocess(args) == 0
    row = json.loads((tmp_path / "inet" / "checkpoints" / "results.jsonl").read_text())
    assert set(row) >= {"imagenet-zeroshot-val-top1", "imagenet-zeroshot-val-top5"}
    assert row["imagenet-zeroshot-val-top5"] == 1.0


def test_remote_sync_copies_only_complete_checkpoints(env, tmp_path):
    remote = tmp_path / "bucket"
    args = base_args(env["model"], env["data"], tmp_path / "logs", "synced", "--epochs", "1", "--train-num-samples",
                     "32", "--save-every-n-steps", "2", "--remote-sync", f"file://{remote}",
                     "--remote-sync-protocol", "fsspec", "--remote-sync-frequency", "1")
    assert run_inprocess(args) == 0
    copied = remote / "synced" / "checkpoints"
    assert sorted(p.name for p in copied.iterdir()) == ["epoch_1.pt", "epoch_latest.pt"]
    local = weights(tmp_path / "logs" / "synced" / "checkpoints" / "epoch_1.pt")
    assert all(torch.equal(v, weights(copied / "epoch_1.pt")[k]) for k, v in local.items())
    assert (remote / "synced" / "out.log").is_file()


def test_save_frequency_and_delete_previous(env, tmp_path):
    args = base_args(env["model"], env["data"], tmp_path, "pruned", "--epochs", "3", "--train-num-samples", "16",
                     "--delete-previous-checkpoint")
    assert run_inprocess(args) == 0
    assert sorted(p.name for p in (tmp_path / "pruned" / "checkpoints").iterdir()) == ["epoch_3.pt", "epoch_latest.pt"]
    args = base_args(env["model"], env["data"], tmp_path, "rare", "--epochs", "3", "--train-num-samples", "16",
                     "--save-frequency", "2")
    assert run_inprocess(args) == 0
    # every 2 epochs, and the last one
    assert sorted(p.name for p in (tmp_path / "rare" / "checkpoints").iterdir()) == [
        "epoch_2.pt", "epoch_3.pt", "epoch_latest.pt"]


def test_resume_from_remote_copies(env, tmp_path):
    """A requeued job on a fresh machine: --resume latest pulls the run's --remote-sync copy; --resume
    also takes a URL."""
    import shutil

    remote = tmp_path / "bucket"
    sync = ["--remote-sync", f"file://{remote}", "--remote-sync-protocol", "fsspec", "--train-num-samples", "16"]
    first = base_args(env["model"], env["data"], tmp_path / "logs", "moved", *sync)
    first[first.index("--epochs") + 1] = "1"
    assert run_inprocess(first) == 0
    shutil.rmtree(tmp_path / "logs")  # the new machine has none of it
    assert run_inprocess(base_args(env["model"], env["data"], tmp_path / "logs", "moved", *sync,
                                   "--resume", "latest")) == 0
    log = (tmp_path / "logs" / "moved" / "out.log").read_text()
    assert "copied 2 checkpoint(s) of the run back" in log and "resumed from" in log
    assert (tmp_path / "logs" / "moved" / "checkpoints" / "epoch_2.pt").is_file()
    url = f"file://{remote}/moved/checkpoints/epoch_1.pt"
    assert run_inprocess(base_args(env["model"], env["data"], tmp_path / "logs", "from-url",
                                   "--train-num-samples", "16", "--resume", url)) == 0
    log = (tmp_path / "logs" / "from-url" / "out.log").read_text()
    assert "fetched " + url in log and "resumed from" in log
    assert run_inprocess(base_args(env["model"], env["data"], tmp_path / "logs", "nothing-there",
                                   "--resume", f"file://{remote}/nope.pt")) == 1
