"""Checkpoints are data: no pickled payload runs on any route that reads one (a Distributed Checkpoint
folder's .metadata or its shards, planted, named, fetched or consolidated); damaged checkpoints are detected
and skipped; one trainer per run folder; weights that would load silently and wrongly are refused."""
import fcntl
import os
import pickle
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import clipkit
from _train_support import base_args, run_inprocess, subprocess_env, write_model
from clipkit.errors import CheckpointError
from clipkit.train import _dcp
from clipkit.train import checkpointer as ckpt
from clipkit.train._runlock import LOCK_FILE
from clipkit.train.consolidate import main as consolidate_main

# most tests here share a trained run folder and resume from it
pytestmark = pytest.mark.slow


class Payload:
    """What a crafted checkpoint carries: unpickling it creates ``marker`` (any code could run instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _args(model, logs, name, epochs, *extra):
    args = base_args(model, "", logs, name, "--dataset-type", "synthetic", "--train-num-samples", "16", *extra)
    args = [a for a in args if a not in ("--train-data", "")]
    args[args.index("--epochs") + 1] = str(epochs)
    return args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run (epoch_1.pt and epoch_latest.pt, 2 steps), copied by the tests that change it."""
    root = tmp_path_factory.mktemp("trust_ckpt")
    model = write_model(root)
    assert run_inprocess(_args(model, root / "logs", "done", 1)) == 0
    return root, model


def _copy_run(trained, name):
    root, model = trained
    shutil.copytree(root / "logs" / "done", root / "logs" / name)
    return root / "logs" / name, model


def _evil_dcp(folder: Path, marker: Path, step: int = 10 ** 6) -> Path:
    """A checkpoint folder with a clean clipkit.pt that claims to be far ahead, and a payload as .metadata."""
    folder.mkdir(parents=True)
    torch.save({"epoch": 1, "name": "x", "clipkit": {"step": step}}, folder / ckpt.EXTRAS)
    (folder / "__0_0.distcp").write_bytes(b"\0" * 64)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return folder


def _one_line_error(capsys) -> str:
    """The one error line on stderr (the trainer's log lines around it aside), and no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "| ERROR |" in line or ": error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


# -- 1. Distributed Checkpoint folders are read as data ---------------------------------------------
def test_metadata_payload_does_not_run_on_resume_dir_url_or_consolidate(trained, tmp_path, capsys):
    root, model = trained
    marker = tmp_path / "ran"
    evil = _evil_dcp(tmp_path / "evil", marker)
    # --resume DIR without --fsdp
    assert run_inprocess(_args(model, tmp_path / "logs", "named", 1, "--resume", evil)) == 1
    err = _one_line_error(capsys)
    assert f"{evil / '.metadata'}: refused, not Distributed Checkpoint metadata" in err and "io.open" in err
    # --resume URL: fetched into the run folder, then refused the same way
    assert run_inprocess(_args(model, tmp_path / "logs", "fetched", 1, "--resume", f"file://{evil}")) == 1
    assert "fetched/evil/.metadata: refused" in _one_line_error(capsys)
    # python -m clipkit.train.consolidate
    assert consolidate_main([str(evil), str(tmp_path / "out.pt")]) == 1
    assert ".metadata: refused" in _one_line_error(capsys)
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_planted_folder_never_wins_resume_latest(trained, tmp_path, caplog, capsys):
    run, model = _copy_run(trained, "planted")
    marker = tmp_path / "ran"
    _evil_dcp(run / "checkpoints" / "epoch_9", marker)
    # without --fsdp a folder nobody named is not looked at
    assert run_inprocess(_args(model, run.parent, "planted", 2, "--resume", "latest")) == 0
    assert f"resumed from {run / 'checkpoints' / ckpt.LATEST} (after epoch 1)" in (run / "out.log").read_text()
    # an --fsdp run reads folders, checks them as data, and skips what is not one, with a warning naming it
    caplog.clear()
    assert ckpt.find_latest(run / "checkpoints", fsdp=True) == run / "checkpoints" / ckpt.LATEST
    assert f"{run / 'checkpoints' / 'epoch_9' / '.metadata'}: refused" in caplog.text
    # folders only, without --fsdp: a one-line error that says how to use them
    only = _evil_dcp(tmp_path / "logs" / "folders" / "checkpoints" / "epoch_latest", marker)
    assert run_inprocess(_args(model, tmp_path / "logs", "folders", 2, "--resume", "latest")) == 1
    assert f"holds --fsdp checkpoint folders only; add --fsdp, or name one: --resume {only}" in _one_line_error(capsys)
    assert not marker.exists()


def test_remote_sync_pull_leaves_folders_to_fsdp_runs(trained, tmp_path):
    from clipkit.train.remote import pull

    marker = tmp_path / "ran"
    bucket = tmp_path / "bucket" / "r" / "checkpoints"
    bucket.mkdir(parents=True)
    shutil.copy(trained[0] / "logs" / "done" / "checkpoints" / "epoch_1.pt", bucket / "epoch_1.pt")
    _evil_dcp(bucket / "epoch_7", marker)
    pull(f"file://{tmp_path / 'bucket'}", "r", tmp_path / "plain", folders=False)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["epoch_1.pt"]
    pull(f"file://{tmp_path / 'bucket'}", "r", tmp_path / "fsdp", folders=True)
    assert ckpt.find_latest(tmp_path / "fsdp", fsdp=True) == tmp_path / "fsdp" / "epoch_1.pt"
    assert not marker.exists()


def test_pickled_entries_inside_shards_are_refused(tmp_path, capsys):
    """A genuine metadata whose non-tensor entry (as the optimizer's hyper-parameters are stored) is a payload:
    torch's planners would unpickle it with weights_only=False."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    folder = tmp_path / "ck"
    with pytest.warns(UserWarning):  # no process group: DCP saves in this one process
        dcp.save({"model": {"w": torch.ones(3)}, "optim": {"lr": Payload(marker)}}, checkpoint_id=str(folder))
    torch.save({"epoch": 1, "name": "x", "clipkit": {"step": 1}}, folder / ckpt.EXTRAS)
    assert not marker.exists()
    assert consolidate_main([str(folder), str(tmp_path / "out.pt")]) == 1
    assert "entry optim.lr: refused, it holds pickled objects beyond weights_only=True" in _one_line_error(capsys)
    assert not marker.exists()


def test_genuine_metadata_reads_and_crafted_extents_are_refused(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch import nn

    layer = nn.Linear(3, 4)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    folder = tmp_path / "ck"
    with pytest.warns(UserWarning):
        dcp.save({"model": layer.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(folder))
    state = {}
    _dcp.load(state, folder)
    assert torch.equal(state["model"]["weight"], layer.weight.detach())
    assert state["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)
    metadata = _dcp.read_metadata(folder / ".metadata")
    # an entry pointing outside the folder, or a tensor larger than the shards could hold
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = type(info)("../../etc/passwd", 0, 10)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="an entry points outside the folder"):
        _dcp.read_metadata(folder / ".metadata")
    metadata.storage_data[index] = info
    entry = metadata.state_dict_metadata["model.weight"]
    entry.size = torch.Size([10 ** 6, 10 ** 6])
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="declares 4000000000[0-9]+ bytes of tensors, more than its shard"):
        _dcp.read_metadata(folder / ".metadata")


# -- 7. damage is detected --------------------------------------------------------------------------
def _damage_tensor_bytes(path: Path, fill: bytes) -> None:
    """Overwrite 64 bytes in the middle of the largest tensor's data, leaving the archive's structure intact."""
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(member.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(member.header_offset + 30 + name_len + extra_len + member.file_size // 2)
        f.write(fill * 64)


@pytest.mark.parametrize("fill", [b"\0", b"\xff"], ids=["zeros", "ones"])
def test_damaged_latest_is_skipped_for_the_newest_intact_checkpoint(trained, fill, caplog):
    run, model = _copy_run(trained, f"damaged-{fill.hex()}")
    folder = run / "checkpoints"
    latest, numbered = folder / ckpt.LATEST, folder / "epoch_1.pt"
    assert os.stat(latest).st_ino != os.stat(numbered).st_ino and os.stat(latest).st_nlink == 1  # a copy, not a link
    before = numbered.read_bytes()
    _damage_tensor_bytes(latest, fill)
    assert numbered.read_bytes() == before
    with pytest.raises(CheckpointError, match="damaged \\(the CRC of .*data/.* does not match its bytes\\)"):
        ckpt.verify(latest)
    ckpt.verify(numbered)
    caplog.clear()
    assert run_inprocess(_args(model, run.parent, run.name, 2, "--resume", "latest")) == 0
    assert f"skipping a damaged checkpoint: {latest}: damaged" in caplog.text
    assert f"resumed from {numbered} (after epoch 1)" in (run / "out.log").read_text()


def test_a_numbered_copy_cut_short_is_made_on_resume(trained):
    """epoch_latest.pt is written first, then copied to epoch_N.pt: a run stopped in between gets its copy."""
    run, model = _copy_run(trained, "uncopied")
    (run / "checkpoints" / "epoch_1.pt").unlink()
    assert run_inprocess(_args(model, run.parent, run.name, 2, "--resume", "latest")) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*.pt")) == ["epoch_1.pt", "epoch_2.pt",
                                                                                  "epoch_latest.pt"]
    assert torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)["epoch"] == 1


def test_resuming_a_named_damaged_file_is_one_line(trained, tmp_path, capsys):
    root, model = trained
    damaged = tmp_path / "copy.pt"
    shutil.copy(root / "logs" / "done" / "checkpoints" / "epoch_1.pt", damaged)
    _damage_tensor_bytes(damaged, b"\0")
    assert run_inprocess(_args(model, tmp_path / "logs", "x", 2, "--resume", damaged)) == 1
    assert f"{damaged}: damaged (the CRC of" in _one_line_error(capsys)


# -- 6. one trainer per run folder ------------------------------------------------------------------
HOLD = """
import sys, time, argparse
from clipkit.train._runlock import lock_run_folder
flags = argparse.Namespace()
lock_run_folder(sys.argv[1], flags)
print("locked", flush=True)
time.sleep(600)
"""


def _can_lock(path: Path) -> bool:
    """Whether another process could take the run folder now (the trainer's kind of lock, tried in this one)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_a_second_trainer_on_a_held_run_folder_exits_naming_the_holder(trained, capsys):
    run, model = _copy_run(trained, "held")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=subprocess_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        in_flight = run / "checkpoints" / f"{ckpt.TMP_PREFIX}{ckpt.LATEST}.{holder.pid}"
        in_flight.write_bytes(b"half a checkpoint")
        assert run_inprocess(_args(model, run.parent, "held", 2, "--resume", "latest")) == 1
        err = _one_line_error(capsys)
        assert f"run folder {run.resolve()} is in use by another trainer (pid {holder.pid} on host " in err
        assert "since " in err and " UTC: " in err
        assert in_flight.read_bytes() == b"half a checkpoint"  # the live run's write is left alone
        assert not _can_lock(run / LOCK_FILE)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _can_lock(run / LOCK_FILE)  # the OS dropped the lock of the killed process: nothing stale
    assert run_inprocess(_args(model, run.parent, "held", 2, "--resume", "latest")) == 0
    assert not in_flight.exists()  # its writer is dead now: removed as torn


def test_remote_sync_never_opens_the_lock_file(trained, tmp_path):
    """Closing any descriptor of a POSIX-locked file drops the lock: the syncing trainer must not copy it."""
    root, model = trained
    remote = tmp_path / "bucket"
    assert run_inprocess(_args(model, tmp_path / "logs", "synced", 1, "--remote-sync", f"file://{remote}",
                               "--remote-sync-protocol", "fsspec")) == 0
    assert (tmp_path / "logs" / "synced" / LOCK_FILE).is_file()
    assert sorted(p.name for p in (remote / "synced").iterdir()) == ["checkpoints", "out.log", "params.txt",
                                                                     "settings.json"]


# -- 11. weights that would load silently and wrongly -----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_integer_or_boolean_weights_are_refused(tiny_model_path, tmp_path, dtype):
    state = clipkit.create_model(tiny_model_path).state_dict()
    state["visual.proj"] = state["visual.proj"].to(dtype)
    torch.save(state, tmp_path / "w.pt")
    name = str(dtype)[len("torch."):]
    with pytest.raises(CheckpointError, match=f"visual.proj is {name}, not floating point like the model's float32"):
        clipkit.create_model(tiny_model_path, pretrained=str(tmp_path / "w.pt"))


def test_non_finite_weights_are_refused(tiny_model_path, tmp_path):
    model = clipkit.create_model(tiny_model_path)
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="non-finite values \\(NaN or inf\\) in .*logit_scale"):
        clipkit.load_checkpoint(model, tmp_path / "nan.pt")
    state = model.state_dict()
    state["ln_final.bias"][0] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    with pytest.raises(CheckpointError, match="non-finite values \\(NaN or inf\\) in text.ln_final.bias: "):
        clipkit.create_model(tiny_model_path, pretrained=str(tmp_path / "inf.pt"))


def test_a_pickle_is_refused_with_the_reason_not_torch_advice(trained, tiny_model_path, tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        clipkit.create_model(tiny_model_path, pretrained=str(tmp_path / "evil.pt"))
    for message in (str(info.value), None):
        if message is None:  # --resume
            assert run_inprocess(_args(trained[1], tmp_path / "logs", "p", 1, "--resume", tmp_path / "evil.pt")) == 1
            message = _one_line_error(capsys)
        assert "it holds io.open, and clipkit never unpickles beyond weights_only=True, since a pickle can run " \
               "any code it names; use a clipkit or OpenCLIP checkpoint (tensors in dicts) or a .safetensors " \
               "file" in message
        assert "weights_only=False" not in message and "\n" not in message
    assert not marker.exists()
