"""Data loader workers end with their epoch, however it ends.

They block the stop signals (SIGTERM among them), so multiprocessing cannot stop a leftover one at exit:
it would wait for it forever. So every consumer of ``Loader.epoch`` closes the epoch when it leaves it,
error or not, instead of leaving that to garbage collection (a kept traceback holds the epoch open).
"""
import multiprocessing
import subprocess
import sys
import time

import pytest
import torch

import clipkit
from _train_support import png, write_model
from clipkit.errors import ClipkitError
from clipkit.evaluate import evaluate
from clipkit.train.data import SyntheticSource
from clipkit.train.shards import write_shards

pytestmark = pytest.mark.slow  # a model and data loader workers; a subprocess


def _live_workers(before):
    deadline = time.time() + 20
    while time.time() < deadline:
        alive = [p for p in multiprocessing.active_children() if p not in before]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def test_a_failing_evaluation_stops_its_workers_while_its_traceback_is_kept(tmp_path):
    """``clipkit eval`` (and the trainer's evaluation) fail on a label past the class names, with the
    traceback still held: the loader's workers must be gone all the same."""
    model = write_model(tmp_path, "tiny-workers")
    torch.save(clipkit.create_model(model).state_dict(), tmp_path / "weights.pt")
    source = SyntheticSource(48, seed=1, size=32)
    write_shards([{"__key__": f"s{i:03d}", "png": png(source.sample(i)[0]), "cls": str(i % 6)} for i in range(48)],
                 tmp_path / "shards", per_shard=12)
    (tmp_path / "classnames.txt").write_text("red\ngreen\nblue\n")
    before = set(multiprocessing.active_children())
    with pytest.raises(ClipkitError, match="3 classes") as raised:
        evaluate(model, "zeroshot", str(tmp_path / "shards" / "{00000..00003}.tar"),
                 pretrained=str(tmp_path / "weights.pt"), classnames=str(tmp_path / "classnames.txt"),
                 batch_size=4, workers=2, device="cpu", progress=False)
    assert raised.traceback  # held until the test ends
    assert _live_workers(before) == []


def test_a_worker_left_alive_does_not_keep_the_process_from_exiting(tmp_path):
    """The safety net: a daemonic child forked during a run (so blocking SIGTERM) and never stopped."""
    script = tmp_path / "leftover.py"
    script.write_text(
        "import multiprocessing, time\n"
        "from clipkit.train.distributed import StopSignals\n"
        "StopSignals(lambda s: None, lambda s: None).install()\n"
        "worker = multiprocessing.get_context('fork').Process(target=time.sleep, args=(600,), daemon=True)\n"
        "worker.start()\n"
        "print(worker.pid, flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
