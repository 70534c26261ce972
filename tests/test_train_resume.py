"""Exact resume: a run killed with SIGKILL and resumed with --resume latest ends bit-identical to one
that was never interrupted; a kill during a checkpoint write leaves the previous checkpoint in use."""
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from _train_support import base_args, start_train, weights, write_dataset, write_model
from clipkit.train import checkpointer as ckpt

# trainers killed and resumed
pytestmark = pytest.mark.slow

# two data workers, 2 epochs of 16 steps, mid-epoch saves every 3 steps: an odd interval, so that
# resumes start on either worker
EXTRA = ("--workers", "2", "--save-every-n-steps", "3")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_dataset(root / "data", shards=4, per_shard=32)
    model = write_model(root)
    logs = root / "logs"
    proc = start_train(base_args(model, data, logs, "straight", *EXTRA))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return root, data, model, logs


def _finish(args):
    proc = start_train(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err


def _assert_same_final_state(logs: Path, name: str):
    ref = torch.load(logs / "straight" / "checkpoints" / "epoch_2.pt", weights_only=True)
    got = torch.load(logs / name / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    for index, state in ref["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, got["optimizer"]["state"][index][k]), (index, k)
    assert ref["clipkit"]["step"] == got["clipkit"]["step"] == 32


def _wait_for_step(path: Path, step: int, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        if path.exists():
            try:
                if ckpt.progress_of(ckpt.read(path, mmap=True))[0] >= step:
                    return
            except Exception:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


@pytest.mark.parametrize("kill_after_step", [3, 20], ids=["epoch1", "epoch2"])
def test_sigkill_mid_epoch_then_resume_latest_is_bit_identical(setup, kill_after_step):
    root, data, model, logs = setup
    name = f"killed{kill_after_step}"
    args = base_args(model, data, logs, name, *EXTRA)
    proc = start_train(args)
    _wait_for_step(logs / name / "checkpoints" / ckpt.LATEST, kill_after_step, proc)
    time.sleep(random.Random(kill_after_step).uniform(0.0, 0.3))  # anywhere between two saves
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    err = _finish(args + ["--resume", "latest"])
    assert "resumed from" in err
    _assert_same_final_state(logs, name)


KILL_IN_THIRD_SAVE = """
import io, os, signal, torch
_real, _calls = torch.save, [0]
def _save(obj, f, *a, **k):
    _calls[0] += 1
    if _calls[0] == 3:  # write half of the third checkpoint, then die
        buf = io.BytesIO(); _real(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(obj, f, *a, **k)
torch.save = _save
"""


def test_kill_during_checkpoint_write_resumes_from_previous_complete_one(setup):
    root, data, model, logs = setup
    args = base_args(model, data, logs, "torn", *EXTRA)
    proc = start_train(args, wrapper=KILL_IN_THIRD_SAVE)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    folder = logs / "torn" / "checkpoints"
    assert any(p.name.startswith(ckpt.TMP_PREFIX) for p in folder.iterdir())  # the torn write is there...
    latest = ckpt.find_latest(folder)
    assert latest == folder / ckpt.LATEST
    assert ckpt.progress_of(ckpt.read(latest))[0] == 6  # ...and the second save (step 6) is what resume uses
    err = _finish(args + ["--resume", "latest"])
    assert "resumed from" in err and "step 6" in err
    assert not any(p.name.startswith(ckpt.TMP_PREFIX) for p in folder.iterdir())
    _assert_same_final_state(logs, "torn")


def test_resumed_checkpoint_loads_with_create_model(setup):
    import clipkit

    root, data, model, logs = setup
    path = logs / "straight" / "checkpoints" / "epoch_2.pt"
    trained, _, preprocess = clipkit.create_model_and_transforms(model, pretrained=str(path))
    state = weights(path)
    for key, value in trained.state_dict().items():
        assert torch.equal(value, state[key]), key
