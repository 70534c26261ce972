"""Two processes on the CPU (gloo, through torchrun): per-process batch b on 2 ranks trains exactly like
batch 2b on one, with the full-matrix loss, with --local-loss --gather-with-grad, and with SigLIP."""
import signal
import time

import pytest
import torch

from _helpers import free_port
from _train_support import (
    base_args,
    read_scalars,
    run_inprocess,
    start_train,
    subprocess_env,
    torchrun,
    weights,
    write_dataset,
    write_model,
)
from clipkit.train import checkpointer as ckpt

# every test here starts torchrun with two processes
pytestmark = [pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")]


def _args(root, name, batch, *extra):
    args = base_args(write_model(root), "", root / "logs", name, "--report-to", "tensorboard", "--epochs", "1",
                     "--dataset-type", "synthetic", "--train-num-samples", "64", "--opt", "timm/momentum",
                     "--momentum", "0", "--lr", "0.5", *extra)
    args = [a for a in args if a not in ("--train-data", "")]
    args[args.index("--batch-size") + 1] = str(batch)
    return args


@pytest.mark.parametrize("extra", [[], ["--local-loss", "--gather-with-grad"], ["--siglip"],
                                   ["--siglip", "--loss-dist-impl", "gather"],
                                   ["--torchcompile", "--torchcompile-backend", "aot_eager", "--grad-checkpointing",
                                    "--accum-freq", "2"]],
                         ids=["full-matrix", "local-loss", "siglip-ring", "siglip-gather", "compile-ckpt-accum"])
def test_two_ranks_match_one_rank_with_the_global_batch(tmp_path, extra):
    assert run_inprocess(_args(tmp_path, "one", 8, *extra)) == 0
    proc = torchrun(_args(tmp_path, "two", 4, *extra))
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = [v for _, v in read_scalars(tmp_path / "logs" / "one", "train/loss")]
    two = [v for _, v in read_scalars(tmp_path / "logs" / "two", "train/loss")]
    assert len(one) == len(two) == (4 if "--accum-freq" in extra else 8)
    assert one == pytest.approx(two, rel=1e-5, abs=1e-5)  # the logged loss is the global one
    a = weights(tmp_path / "logs" / "one" / "checkpoints" / "epoch_1.pt")
    b = weights(tmp_path / "logs" / "two" / "checkpoints" / "epoch_1.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    log = (tmp_path / "logs" / "two" / "out.log").read_text()
    assert "batch 4 x 2 processes" in log


def _launch(args, port, **env):
    """Two processes started on their own (as SLURM's srun does), without torchrun's agent."""
    procs = []
    for rank in (0, 1):
        procs.append(start_train(args, env=subprocess_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2,
                                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)))
    return procs


def _wait(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], [err for _, err in outs]


def test_a_dead_rank_stops_the_other_with_a_clear_error_and_resume_is_exact(tmp_path):
    data = write_dataset(tmp_path / "data", shards=4, per_shard=32)
    model = write_model(tmp_path)

    def args(name):
        return base_args(model, data, tmp_path / "logs", name, "--save-every-n-steps", "3", "--workers", "1")

    codes, errs = _wait(_launch(args("whole"), free_port()))
    assert codes == [0, 0], errs[0][-3000:]

    procs = _launch(args("broken"), free_port(), CLIPKIT_DIST_TIMEOUT=60)
    latest = tmp_path / "logs" / "broken" / "checkpoints" / ckpt.LATEST
    deadline = time.time() + 240
    while not (latest.exists() and ckpt.progress_of(ckpt.read(latest, mmap=True))[0] >= 6):
        assert time.time() < deadline and procs[0].poll() is None
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    _, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 1 and time.time() - killed < 90
    assert "process 0 lost contact with the others (one failed or was killed)" in err
    assert "Traceback" not in err
    procs[1].wait()

    codes, errs = _wait(_launch(args("broken") + ["--resume", "latest"], free_port()))
    assert codes == [0, 0], errs[0][-3000:]
    a = weights(tmp_path / "logs" / "whole" / "checkpoints" / "epoch_2.pt")
    b = weights(tmp_path / "logs" / "broken" / "checkpoints" / "epoch_2.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_process_layout_from_torchrun_or_slurm(monkeypatch):
    import os

    from clipkit.train.distributed import _from_environment

    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "MASTER_ADDR")
    # a private copy: the function writes RANK/WORLD_SIZE for the rendezvous, which must not leak
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in names})
    assert _from_environment() == (0, 0, 1)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert _from_environment() == (0, 0, 1)  # srun without MASTER_ADDR: independent single-process runs
    monkeypatch.setenv("MASTER_ADDR", "node001")
    assert _from_environment() == (5, 1, 8)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _from_environment() == (1, 0, 2)  # torchrun's variables win


def test_per_step_agreements_are_decided_on_the_cpu_beside_a_gpu_backend(monkeypatch):
    # a stop signal and the end of the data are agreed every step: beside NCCL they must not make the
    # device copy, reduce and be waited for (no GPU here: the process group calls are recorded instead)
    from dataclasses import replace
    from types import SimpleNamespace

    from clipkit.train import distributed as d

    monkeypatch.setattr(d, "_control", None)  # restored after the test
    calls = []
    monkeypatch.setattr(d, "_from_environment", lambda: (0, 0, 2))
    monkeypatch.setattr(d.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(d.dist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"])))
    monkeypatch.setattr(d.dist, "new_group", lambda **kw: calls.append(("group", kw["backend"])) or "control")
    settings = SimpleNamespace(device="cpu", dist_backend="nccl", dist_url=None, no_set_device_rank=False,
                               fsdp=False)
    env = d.init(settings)
    assert calls == [("init", "nccl"), ("group", "gloo")]

    reduced = []

    def all_reduce(tensor, op, group):
        reduced.append((tensor.device.type, group))
        tensor.fill_(3)

    monkeypatch.setattr(d.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(d.dist, "get_backend", lambda: "nccl")
    env = replace(env, device=torch.device("meta"))  # a tensor made on the run's device could not be read
    assert d.all_max(1, env) == 3 and d.all_agree(False, env) is True
    assert reduced == [("cpu", "control")] * 2

    # the run's own group is gloo: no second group, the same CPU reduction on it
    monkeypatch.setattr(d, "_control", None)
    calls.clear()
    reduced.clear()
    d.init(SimpleNamespace(device="cpu", dist_backend=None, dist_url=None, no_set_device_rank=False, fsdp=False))
    monkeypatch.setattr(d.dist, "get_backend", lambda: "gloo")
    assert calls == [("init", "gloo")]
    assert d.all_max(2, env) == 3 and reduced == [("cpu", None)]
