"""The training step leaves the device alone: no host-device synchronisation outside log steps, and a
non-finite loss found later still stops the run before anything is saved; the optimizer's kernels; the
time spent waiting for data, logged and warned about."""
import logging
import re
import sys
import time
from pathlib import Path

import pytest
import torch

import clipkit
from _train_support import base_args, read_scalars, run_inprocess, write_dataset, write_model
from clipkit.train.build import adamw_kernel, build_optimizer
from clipkit.train.data import SyntheticSource
from clipkit.train.step_log import DataWait, LoggedValues, NonFiniteWatch
from clipkit.train.trainer import Trainer

pytestmark = [pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")]

CLIPKIT = str(Path(clipkit.__file__).parent)
# what copies a tensor's value to the host (on an accelerator: waits for every queued kernel)
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")


def _count_reads(monkeypatch, events):
    """Record every host read of a tensor made by clipkit's own code, and every training step's start."""
    def counting(name, real):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(CLIPKIT):
                events.append(f"{name} at {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return real(self, *args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counting("synchronize", lambda *a, **k: None))
    real_step = Trainer._step

    def step(self, *args, **kwargs):
        events.append("STEP")
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "_step", step)


def _per_step(events):
    """The reads from each step's start to the next step's start (a log step's reads follow its step)."""
    out, current = [], None
    for event in events:
        if event == "STEP":
            current = []
            out.append(current)
        elif current is not None:
            current.append(event)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    return {"model": write_model(root), "shards": write_dataset(root / "data", shards=2, per_shard=32)}


@pytest.mark.slow
def test_no_host_reads_outside_log_steps(data, tmp_path, monkeypatch):
    events = []
    _count_reads(monkeypatch, events)
    # 7 steps of 8 samples, a log line every 3 steps (3, 6) and at the epoch's last (7)
    args = base_args(data["model"], data["shards"], tmp_path, "sync", "--epochs", "1", "--train-num-samples", "56",
                     "--log-every-n-steps", "3")
    assert run_inprocess(args) == 0
    steps = _per_step(events)
    assert len(steps) == 7
    for i in (0, 1, 3, 4):  # steps 1, 2, 4, 5
        assert steps[i] == [], f"step {i + 1} (not a log step) read device values: {steps[i]}"
    for i in (2, 5):  # log steps read what the line needs at once
        assert 1 <= len(steps[i]) <= 3, steps[i]
    log = (tmp_path / "sync" / "out.log").read_text()
    assert log.count("epoch 1 [") == 3 and "data wait" in log


def _poison_step(monkeypatch, bad_step):
    from clipkit.train import loss as loss_module

    real = loss_module.ClipLoss.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        out = real(self, *args, **kwargs)
        return out * float("nan") if len(calls) == bad_step else out
    monkeypatch.setattr(loss_module.ClipLoss, "forward", poisoned)


@pytest.mark.slow
def test_nonfinite_loss_found_before_the_next_save(data, tmp_path, monkeypatch):
    # the loss of step 3 is NaN; no log line until step 100, but the save at step 4 checks first
    _poison_step(monkeypatch, 3)
    args = base_args(data["model"], data["shards"], tmp_path, "nan", "--epochs", "1", "--log-every-n-steps", "100",
                     "--save-every-n-steps", "2")
    assert run_inprocess(args) == 1
    log = (tmp_path / "nan" / "out.log").read_text()
    assert "epoch 1, step 3: the loss is nan; stopping without saving." in log
    latest = torch.load(tmp_path / "nan" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert latest["clipkit"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in latest["state_dict"].values())


@pytest.mark.slow
def test_nonfinite_loss_found_at_the_epoch_end(data, tmp_path, monkeypatch):
    # a NaN at step 2 of 4, no log line and no save inside the epoch: its checkpoint is never written
    _poison_step(monkeypatch, 2)
    args = base_args(data["model"], data["shards"], tmp_path, "nan-end", "--epochs", "2", "--log-every-n-steps",
                     "100", "--train-num-samples", "32")
    assert run_inprocess(args) == 1
    log = (tmp_path / "nan-end" / "out.log").read_text()
    assert "epoch 1, step 2: the loss is nan; stopping without saving. Last complete checkpoint: none." in log
    assert not list((tmp_path / "nan-end" / "checkpoints").glob("*.pt"))


# -- the pieces, without a run ----------------------------------------------------------------------
def test_logged_values_read_at_once():
    logged = LoggedValues(window=3)
    for i in range(5):
        logged.add(torch.tensor(float(i)), {"a": torch.tensor(10.0 + i), "b": torch.tensor(-i * 1.0)})
    loss, mean, terms, extra = logged.read(torch.tensor(7.0))
    assert (loss, mean, terms, extra) == (4.0, 3.0, {"a": 14.0, "b": -4.0}, [7.0])


def test_nonfinite_watch_keeps_the_first_bad_step():
    watch = NonFiniteWatch()
    assert watch.first() is None
    for step, value in [(1, 2.0), (2, 1.5), (3, float("inf")), (4, float("nan"))]:
        watch.observe(torch.tensor(value), step)
    assert watch.first() == (3, float("inf"))


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _SlowItems:
    """An iterable whose next() advances the fake clock by ``delay``."""

    def __init__(self, clock, delay):
        self.clock, self.delay = clock, delay

    def __iter__(self):
        self.clock.now += self.delay
        yield "batch"


@pytest.mark.parametrize("fractions, warned", [
    ([0.9, 0.5, 0.6, 0.7, 0.8, 0.9], True),  # the first interval (workers starting) is not judged
    ([0.9, 0.9, 0.9, 0.1, 0.9, 0.9], False),  # three in a row, not three in all
    ([0.9, 0.2, 0.29, 0.3, 0.1], False),
])
def test_data_wait_warns_once_after_three_slow_intervals(fractions, warned, caplog):
    clock = _Clock()
    wait = DataWait(0.3, workers=2, train_data="/data/{0..9}.tar", image_size=224, clock=clock)
    wait.start_epoch()
    seen = []
    for fraction in fractions:
        clock.now += 10 * (1 - fraction)
        for _ in wait.batches(_SlowItems(clock, 10 * fraction)):
            wait.step()
        seen.append(wait.interval())
    assert [round(i.wait_fraction, 6) for i in seen] == fractions
    assert [(i.wall, i.steps) for i in seen] == [(pytest.approx(10.0), 1)] * len(fractions)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == (1 if warned else 0)
    if warned:
        assert messages[0].startswith("the training step waited for data 50%, 60%, 70% of the time over the last 3 "
                                      "log intervals (above --data-wait-warn 0.3)")
        assert "--workers 2 on " in messages[0] and "224 px input" in messages[0]


def test_data_wait_zero_disables_the_warning(caplog):
    clock = _Clock()
    wait = DataWait(0.0, workers=1, train_data=None, image_size=None, clock=clock)
    for _ in range(6):
        for _ in wait.batches(_SlowItems(clock, 5.0)):
            wait.step()
        assert wait.interval().wait_fraction == 1.0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_adamw_kernel_choice():
    assert adamw_kernel({"cuda"}, True, True) == "fused"
    assert adamw_kernel({"xpu"}, True, True) == "fused"
    assert adamw_kernel({"cuda"}, False, True) == "foreach"  # fused kernels take floating point only
    assert adamw_kernel({"mps"}, True, True) == "foreach"
    assert adamw_kernel({"cuda"}, True, False) == "default"  # FSDP's DTensors: torch's own choice
    assert adamw_kernel({"cpu"}, True, True) == "default"
    assert adamw_kernel({"cpu", "cuda"}, True, True) == "default"


def test_pinned_memory_is_passed_to_the_loader():
    from clipkit.train.data import train_loader
    from clipkit.train.settings import DataSettings

    data = DataSettings(dataset_type="synthetic", train_num_samples=16, batch_size=4, workers=0)
    common = (0, lambda image: image, None, 0, 1, 32)
    assert train_loader(data, *common, pin_memory=True).pin_memory is True
    assert train_loader(data, *common).pin_memory is False


def test_cpu_optimizer_keeps_torchs_default(caplog):
    from types import SimpleNamespace

    model = torch.nn.Linear(3, 2)
    settings = SimpleNamespace(opt="adamw", lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-6, wd=0.1, momentum=None)
    with caplog.at_level(logging.INFO, logger="clipkit.train"):
        optimizer, _ = build_optimizer(settings, model)
    assert optimizer.defaults["fused"] is None and optimizer.defaults["foreach"] is None
    assert "optimizer: AdamW, torch's default implementation" in caplog.text


# -- waiting for data, end to end -------------------------------------------------------------------
def _synthetic_args(model, logs, name, *extra):
    return ["--model", model, "--dataset-type", "synthetic", "--train-num-samples", "24", "--batch-size", "4",
            "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--device", "cpu",
            "--logs", str(logs), "--name", name, "--log-every-n-steps", "1", "--seed", "0", *extra]


@pytest.mark.slow
def test_slow_data_is_reported_and_warned_about_once(data, tmp_path, monkeypatch):
    real = SyntheticSource.sample

    def slow(self, index):
        time.sleep(0.2)  # 0.8 s a batch of 4, read in the training process (--workers 0)
        return real(self, index)
    monkeypatch.setattr(SyntheticSource, "sample", slow)
    # a low threshold: the bound holds however slow a busy machine makes the step itself
    args = _synthetic_args(data["model"], tmp_path, "slow", "--workers", "0", "--report-to", "tensorboard",
                           "--data-wait-warn", "0.1", "--train-num-samples", "20")
    assert run_inprocess(args) == 0
    log = (tmp_path / "slow" / "out.log").read_text()
    waits = [int(w) for w in re.findall(r"data wait (\d+)%", log)]
    assert len(waits) == 5 and min(waits[1:]) > 10, waits
    warnings = re.findall(r"WARNING \| the training step waited for data (\d+)%, (\d+)%, (\d+)% of the time over "
                          r"the last 3 log intervals", log)
    assert len(warnings) == 1 and [int(w) for w in warnings[0]] == waits[1:4]
    assert "(above --data-wait-warn 0.1)" in log and "--workers 0 on " in log and "clipkit data bench" in log
    fractions = [v for _, v in read_scalars(tmp_path / "slow", "train/data_wait_fraction")]
    assert [round(100 * f) for f in fractions] == waits


@pytest.mark.slow
def test_fast_data_is_not_warned_about(data, tmp_path, monkeypatch):
    real = Trainer._step

    def slow_step(self, *args, **kwargs):
        time.sleep(0.3)  # the step, not the data, is what takes the time
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "_step", slow_step)
    args = _synthetic_args(data["model"], tmp_path, "fast", "--workers", "1")
    assert run_inprocess(args) == 0
    log = (tmp_path / "fast" / "out.log").read_text()
    waits = [int(w) for w in re.findall(r"data wait (\d+)%", log)]
    assert len(waits) == 6 and max(waits[1:]) < 30, waits
    assert "waited for data" not in log
