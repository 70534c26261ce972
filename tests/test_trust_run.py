"""A run's lifecycle when things go wrong: evaluation flags checked before training, the epoch saved
before evaluating, stop signals (alone and under torchrun), failed writes, and flag mistakes."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _helpers import free_port
from _train_support import base_args, run_inprocess, subprocess_env, synthetic_samples, write_dataset, write_model
from clipkit.train import checkpointer as ckpt
from clipkit.train import distributed, trainer
from clipkit.train import session as run_session
from clipkit.train.args import ArgsError, parse_args
from clipkit.train.data import SyntheticSource
from clipkit.train.evaluate import Evaluator
from clipkit.train.shards import write_shards

# trainers started, signalled and resumed
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")]


@pytest.fixture(autouse=True)
def _interruptible():
    """Ctrl-C reaches these tests as a terminal would send it, however pytest was started: a shell runs
    background jobs (a CI script's) with SIGINT ignored, and children inherit that."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    shapes = list(SyntheticSource.SHAPES)
    labelled = list(synthetic_samples(16, seed=7))
    for s in labelled:
        s["cls"] = str(shapes.index(s["txt"].split()[-1]))
    labelled[11]["cls"] = "9"  # one label past the class names: found only when evaluating
    write_shards(labelled, root / "zs", per_shard=16)
    (root / "classnames.txt").write_text("\n".join(shapes))
    return {"root": root, "data": write_dataset(root / "data", shards=2, per_shard=32), "model": write_model(root),
            "zs": str(root / "zs" / "00000.tar"), "classnames": str(root / "classnames.txt"), "shapes": shapes}


def _error_lines(text: str):
    return [line for line in text.splitlines() if "| ERROR |" in line or line.startswith("clipkit-train: error")]


# -- item 12: a guess at synthetic data -----------------------------------------------------------
def test_train_data_synthetic_points_to_the_dataset_type_flag():
    with pytest.raises(ArgsError, match="--train-data synthetic: no such data; generated data is --dataset-type "
                                        "synthetic --train-num-samples N"):
        parse_args(["--model", "RN50", "--train-data", "synthetic"])


# -- item 8: evaluation set-up --------------------------------------------------------------------
def _eval_case(env, tmp_path, case):
    if case == "val-data":
        missing = f"{tmp_path}/val/{{00000..00001}}.tar"
        return ["--val-data", missing], f"--val-data: '{missing}': 2 shard(s) not found, e.g. {tmp_path}/val/00000.tar"
    if case == "classnames":
        path = tmp_path / "class_names.txt"
        return (["--zeroshot-data", env["zs"], "--zeroshot-classnames", path],
                f"--zeroshot-classnames: {path}: cannot read class names: No such file or directory")
    folder = tmp_path / "folders"  # three class folders, two class names: label 2 has no name
    for name in ("a", "b", "c"):
        (folder / name).mkdir(parents=True)
    (tmp_path / "two.txt").write_text("a\nb\n")
    return (["--zeroshot-data", folder, "--zeroshot-classnames", tmp_path / "two.txt"],
            f"--zeroshot-data {folder}: 3 class folders, but --zeroshot-classnames {tmp_path / 'two.txt'} has 2 "
            f"class names")


@pytest.mark.parametrize("case", ["val-data", "classnames", "label-range"])
def test_evaluation_set_up_errors_fail_before_training(env, tmp_path, capsys, case):
    extra, message = _eval_case(env, tmp_path, case)
    args = base_args(env["model"], env["data"], tmp_path / "logs", "eval", "--epochs", "1", *extra)
    assert run_inprocess(args) == 1
    err = capsys.readouterr().err
    assert [line.split(" | ERROR | ")[-1] for line in _error_lines(err)] == [message]
    assert "Traceback" not in err
    log = (tmp_path / "logs" / "eval" / "out.log").read_text()
    assert "epoch 1 [" not in log and "training 2 epochs" not in log  # not a single step
    assert not (tmp_path / "logs" / "eval" / "checkpoints").exists()


def test_a_failing_evaluation_keeps_the_epochs_checkpoint(env, tmp_path, capsys):
    args = base_args(env["model"], env["data"], tmp_path / "logs", "evalfail", "--epochs", "1",
                     "--zeroshot-data", env["zs"], "--zeroshot-classnames", env["classnames"],
                     "--train-num-samples", "16")
    assert run_inprocess(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = _error_lines(err)
    assert line.endswith(f"--zeroshot-data {env['zs']}: sample {env['zs']}:s000011 has label 9, but there are "
                         f"{len(env['shapes'])} classes (labels 0 to {len(env['shapes']) - 1})")
    saved = torch.load(tmp_path / "logs" / "evalfail" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["clipkit"]["step"] == 2


# -- item 11: failed writes ----------------------------------------------------------------------
def test_a_run_folder_that_cannot_be_made_is_one_line(env, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = base_args(env["model"], env["data"], blocker / "logs", "x", "--epochs", "1")
    assert run_inprocess(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = _error_lines(err)
    assert "setting up the run folder failed: Not a directory" in line and str(blocker) in line


def test_a_full_disk_while_saving_is_one_line_with_the_resume_hint(env, tmp_path, capsys, monkeypatch):
    real, calls = torch.save, []

    def full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            name = getattr(f, "name", f)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    run_dir = tmp_path / "logs" / "full"
    args = base_args(env["model"], env["data"], tmp_path / "logs", "full", "--epochs", "1",
                     "--save-every-n-steps", "3")
    assert run_inprocess(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = _error_lines(err)
    assert "saving a checkpoint failed: No space left on device (" in line
    assert line.endswith(f"after fixing it, --resume latest continues from the last complete checkpoint, "
                         f"{run_dir / 'checkpoints' / ckpt.LATEST}")
    assert line in (run_dir / "out.log").read_text()
    assert ckpt.progress_of(ckpt.read(run_dir / "checkpoints" / ckpt.LATEST))[0] == 3


def test_a_log_file_that_cannot_be_written_is_one_line_and_the_run_goes_on(env, tmp_path, capsys, monkeypatch):
    import logging

    calls = []

    def full_disk(self, record):  # the standard library's own shape: errors go to handleError
        calls.append(1)
        try:
            if len(calls) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            logging.StreamHandler.emit(self, record)
        except OSError:
            self.handleError(record)

    monkeypatch.setattr(logging.FileHandler, "emit", full_disk)
    args = base_args(env["model"], env["data"], tmp_path / "logs", "nolog", "--epochs", "1",
                     "--train-num-samples", "16")
    assert run_inprocess(args) == 0
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    [line] = _error_lines(err)
    assert line.endswith(f"cannot write {tmp_path / 'logs' / 'nolog' / 'out.log'}: No space left on device; the "
                         f"log goes to the terminal only from here on")
    assert "| INFO | done: 1 epochs" in err.split(line, 1)[1]


# -- item 10: signals -----------------------------------------------------------------------------
def _final_state(path: Path):
    data = torch.load(path, weights_only=True)
    return data["state_dict"], data["optimizer"]["state"], data["clipkit"]["step"]


def test_sigterm_mid_epoch_saves_stops_with_one_line_and_resumes_bit_identically(env, tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    assert run_inprocess(base_args(env["model"], env["data"], logs, "straight", "--epochs", "1")) == 0

    real = trainer.learning_rate

    def terminate_at_step_5(args, step, *rest):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as docker stop, Kubernetes or SLURM would
        return real(args, step, *rest)

    monkeypatch.setattr(trainer, "learning_rate", terminate_at_step_5)
    args = base_args(env["model"], env["data"], logs, "stopped", "--epochs", "1")
    assert run_inprocess(args) == run_session.STOPPED_EXIT_CODE == 75
    log = (logs / "stopped" / "out.log").read_text()
    latest = logs / "stopped" / "checkpoints" / ckpt.LATEST
    expected = (f"stopped by SIGTERM at epoch 1 step 6 (global step 6); checkpoint saved to {latest}; continue "
                f"with: clipkit-train {' '.join(map(str, args))} --resume latest").replace(
                    env["data"], f"'{env['data']}'")  # the brace pattern, quoted for the shell
    assert [line.split(" | WARNING | ")[-1] for line in log.splitlines() if "stopped by" in line] == [expected]
    assert "Traceback" not in log and "| ERROR |" not in log
    assert ckpt.progress_of(ckpt.read(latest))[0] == 6
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back

    monkeypatch.setattr(trainer, "learning_rate", real)
    assert run_inprocess(args + ["--resume", "latest"]) == 0
    ref_w, ref_opt, ref_step = _final_state(logs / "straight" / "checkpoints" / "epoch_1.pt")
    got_w, got_opt, got_step = _final_state(logs / "stopped" / "checkpoints" / "epoch_1.pt")
    assert ref_step == got_step == 8
    for key in ref_w:
        assert torch.equal(ref_w[key], got_w[key]), key
    for index, state in ref_opt.items():
        for k, v in state.items():
            assert torch.equal(v, got_opt[index][k]), (index, k)


def test_a_signal_in_an_epochs_last_step_stops_after_its_checkpoint_before_evaluating(env, tmp_path, monkeypatch):
    real = trainer.learning_rate

    def terminate_in_last_step(args, step, *rest):
        if step == 1:  # the 2nd and last step of epoch 1
            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's --signal=USR1@90
        return real(args, step, *rest)

    monkeypatch.setattr(trainer, "learning_rate", terminate_in_last_step)
    run_dir = tmp_path / "logs" / "edge"
    args = base_args(env["model"], env["data"], tmp_path / "logs", "edge", "--val-data", env["zs"],
                     "--train-num-samples", "16")
    assert run_inprocess(args) == 75
    log = (run_dir / "out.log").read_text()
    assert "stopped by SIGUSR1 at epoch 1 step 2 (global step 2); checkpoint saved to " in log
    assert "eval epoch" not in log and not (run_dir / "checkpoints" / "results.jsonl").exists()
    assert torch.load(run_dir / "checkpoints" / "epoch_1.pt", weights_only=True)["clipkit"]["step"] == 2


def test_a_signal_while_evaluating_the_saved_epoch_stops_at_once(env, tmp_path, monkeypatch):
    real = Evaluator.run

    def interrupted(evaluator, context, completed, final):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        return real(evaluator, context, completed, final)

    monkeypatch.setattr(Evaluator, "run", interrupted)
    run_dir = tmp_path / "logs" / "ctrl-c"
    args = base_args(env["model"], env["data"], tmp_path / "logs", "ctrl-c", "--val-data", env["zs"],
                     "--train-num-samples", "16")
    assert run_inprocess(args) == 75
    log = (run_dir / "out.log").read_text()
    [line] = [line for line in log.splitlines() if "stopped by" in line]
    assert line.split(" | WARNING | ")[-1].startswith(
        f"stopped by SIGINT while evaluating epoch 1; the last checkpoint is {run_dir / 'checkpoints'}")
    assert "continue with: clipkit-train " in line and "Traceback" not in log
    assert torch.load(run_dir / "checkpoints" / "epoch_1.pt", weights_only=True)["clipkit"]["step"] == 2


def _ignores_sigterm_when_forked() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.2)


def test_stop_signals_second_signal_acts_from_the_thread_and_forked_children_ignore_them():
    import multiprocessing
    import threading

    outside_steps = distributed.StopSignals(print, print)
    assert outside_steps.install()
    try:
        with pytest.raises(distributed.Interrupted) as raised:  # not deferred: raised in the main thread
            os.kill(os.getpid(), signal.SIGTERM)
        assert raised.value.signum == signal.SIGTERM
    finally:
        outside_steps.uninstall()

    first, second = [], []
    # the second signal is acted on from a thread of its own: the main thread may be stuck in a collective
    stop = distributed.StopSignals(first.append, lambda sig: second.append((sig, threading.current_thread().name)))
    assert stop.install()
    stop.defer = True
    try:
        child = multiprocessing.get_context("fork").Process(target=_ignores_sigterm_when_forked)
        child.start()
        child.join(30)
        assert child.exitcode == 0  # a data loader worker survives the signals meant for its process
        time.sleep(0.2)
        assert stop.received is None and first == []  # and its signals are not taken for the parent's
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # a repeated SIGUSR1 is no reason to stop at once
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.time() + 10
        while not second and time.time() < deadline:
            time.sleep(0.01)
        assert stop.received == signal.SIGUSR1 and first == [signal.SIGUSR1]
        assert second == [(signal.SIGINT, "clipkit-stop-signals")]
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- item 10 under torchrun -----------------------------------------------------------------------
def _torchrun(root: Path, name: str, *extra: str) -> subprocess.Popen:
    args = base_args(write_model(root), "", root / "logs", name, "--dataset-type", "synthetic",
                     "--train-num-samples", "128", "--save-every-n-steps", "2", *extra)
    args = [a for a in args if a not in ("--train-data", "")]
    args[args.index("--batch-size") + 1] = "4"
    args = ["--logs-dir" if a == "--logs" else a for a in args]  # torchrun takes --logs for its --logs-specs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "clipkit.train", *map(str, args)]
    return subprocess.Popen(cmd, env=subprocess_env(CLIPKIT_DIST_TIMEOUT=60), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_save(latest: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        try:
            if latest.exists() and ckpt.progress_of(ckpt.read(latest, mmap=True))[0] >= step:
                return
        except Exception:  # being replaced at this moment
            pass
        time.sleep(0.05)


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process ``rank`` (its child whose environment says so)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under pid {launcher}")


def _log_after_last_resume(run_dir: Path) -> str:
    return (run_dir / "out.log").read_text().rsplit("resumed from", 1)[1]


@pytest.mark.distributed
def test_torchrun_a_killed_rank_and_a_preemption_each_end_with_one_line_and_resume_continues(tmp_path):
    run_dir = tmp_path / "logs" / "run"
    latest = run_dir / "checkpoints" / ckpt.LATEST

    # rank 1 SIGKILLed: torchrun SIGTERMs rank 0, which names the cause and the resume command
    proc = _torchrun(tmp_path, "run")
    _wait_for_save(latest, 2, proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if "lost contact" in line]
    assert len(lines) == 1, err[-3000:]
    assert "process 0 lost contact with the others (one failed or was killed" in lines[0]
    assert lines[0].endswith("Fix the cause and rerun the same command with --resume latest")
    assert "clipkit/train" not in err  # torchrun's own report, but no traceback from the trainer
    log = (run_dir / "out.log").read_text()
    assert lines[0].split(" | ERROR | ")[-1] in log and "Traceback" not in log

    # preemption: SIGTERM to torchrun, which passes it on; every process finishes its step and stops
    proc = _torchrun(tmp_path, "run", "--resume", "latest")
    resumed_at = ckpt.progress_of(ckpt.read(latest))[0]
    _wait_for_save(latest, resumed_at + 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    [line] = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    stopped_at = ckpt.progress_of(ckpt.read(latest))[0]
    assert stopped_at > resumed_at + 1
    assert f"(global step {stopped_at}); checkpoint saved to {ckpt.find_latest(latest.parent)}; " in line
    assert line.endswith("; rerun the same command with --resume latest")
    log = _log_after_last_resume(run_dir)
    assert line.split(" | WARNING | ")[-1] in log and "Traceback" not in log
    steps = [line for line in log.splitlines() if "] loss " in line]
    per_epoch = 128 // (4 * 2)
    epoch, step = divmod(stopped_at - 1, per_epoch)
    assert f"epoch {epoch + 1} [{step + 1}/{per_epoch} " in steps[-1]  # the last step taken is the one saved

    proc = _torchrun(tmp_path, "run", "--resume", "latest")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    total = 2 * per_epoch
    assert torch.load(run_dir / "checkpoints" / "epoch_2.pt", weights_only=True)["clipkit"]["step"] == total
    log = _log_after_last_resume(run_dir)
    where = (f"after epoch {epoch + 1}" if step + 1 == per_epoch  # stopped at an epoch's end
             else f"epoch {epoch + 1}, step {stopped_at}")
    assert log.startswith(f" {ckpt.find_latest(latest.parent)} ({where})")
    assert sum("] loss " in line for line in log.splitlines()) == total - stopped_at  # the steps add up
