"""Two processes on the CPU (gloo, through torchrun): per-process batch b on 2 ranks trains exactly like
batch 2b on one, with the full-matrix loss, with --local-loss --gather-with-grad, and with SigLIP."""
import socket
import subprocess
import sys

import pytest
import torch

from _train_support import base_args, read_scalars, run_inprocess, subprocess_env, weights, write_model

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(root, name, batch, *extra):
    args = base_args(write_model(root), "", root / "logs", name, "--report-to", "tensorboard", "--epochs", "1",
                     "--dataset-type", "synthetic", "--train-num-samples", "64", "--opt", "timm/momentum",
                     "--momentum", "0", "--lr", "0.5", *extra)
    args = [a for a in args if a not in ("--train-data", "")]
    args[args.index("--batch-size") + 1] = str(batch)
    return args


def _torchrun(args):
    args = ["--logs-dir" if a == "--logs" else a for a in args]  # torchrun takes --logs for its --logs-specs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "clipkit.train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())


@pytest.mark.parametrize("extra", [[], ["--local-loss", "--gather-with-grad"], ["--siglip"]],
                         ids=["full-matrix", "local-loss", "siglip"])
def test_two_ranks_match_one_rank_with_the_global_batch(tmp_path, extra):
    assert run_inprocess(_args(tmp_path, "one", 8, *extra)) == 0
    proc = _torchrun(_args(tmp_path, "two", 4, *extra))
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = [v for _, v in read_scalars(tmp_path / "logs" / "one", "train/loss")]
    two = [v for _, v in read_scalars(tmp_path / "logs" / "two", "train/loss")]
    assert len(one) == len(two) == 8
    assert one == pytest.approx(two, rel=1e-5, abs=1e-5)  # the logged loss is the global one
    a = weights(tmp_path / "logs" / "one" / "checkpoints" / "epoch_1.pt")
    b = weights(tmp_path / "logs" / "two" / "checkpoints" / "epoch_1.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    log = (tmp_path / "logs" / "two" / "out.log").read_text()
    assert "batch 4 x 2 processes" in log
