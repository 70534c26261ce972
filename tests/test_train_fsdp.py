"""--fsdp on the CPU (gloo, 2 processes through torchrun): FSDP2 trains like one process with the global
batch, its Distributed Checkpoint folders consolidate into one file that create_model_and_transforms
loads, and they resume in 2 processes (exactly) and in 1."""
import pickle
import shutil

import pytest
import torch

import clipkit
from _train_support import base_args, run_inprocess, torchrun, weights, write_dataset, write_model
from clipkit.train import checkpointer as ckpt
from clipkit.train.consolidate import main as consolidate_main

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _args(model, logs, name, batch, epochs, *extra):
    args = base_args(model, "", logs, name, "--epochs", str(epochs), "--dataset-type", "synthetic",
                     "--train-num-samples", "32", "--opt", "timm/momentum",
                     "--momentum", "0.9", "--lr", "0.1", "--lr-scheduler", "const", "--grad-clip-norm", "1.0",
                     *extra)
    # SGD (float noise is not amplified as by Adam); a constant rate, so --epochs 1 then 2 is one schedule
    args = [a for a in args if a not in ("--train-data", "")]
    args[args.index("--batch-size") + 1] = str(batch)
    args[args.index("--epochs") + 1] = str(epochs)  # base_args has its own --epochs first
    return args


def _torchrun(args):
    proc = torchrun(args)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _consolidated(folder, out):
    assert ckpt.is_dcp(folder), sorted(p.name for p in folder.parent.iterdir())
    assert consolidate_main([str(folder), str(out)]) == 0
    return weights(out)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_checkpoints_consolidate_and_resume_in_two_processes_and_in_one(tmp_path):
    model = write_model(tmp_path)
    logs = tmp_path / "logs"
    # evaluation under FSDP: every process runs the forward passes over the sharded weights, process 0 reports
    val = write_dataset(tmp_path / "val", shards=1, per_shard=16)
    _torchrun(_args(model, logs, "whole", 4, 2, "--fsdp", "--val-data", val))
    assert "eval epoch 1: " in (logs / "whole" / "out.log").read_text()
    whole_ckpts = logs / "whole" / "checkpoints"
    assert sorted(p.name for p in whole_ckpts.glob("epoch_*")) == ["epoch_1", "epoch_2", "epoch_latest"]
    assert ckpt.find_latest(whole_ckpts) == whole_ckpts / "epoch_latest"
    # a run stopped after epoch 1 (with a constant learning rate, the same as this one at that point)
    for name in ("part", "part-one", "part-plain"):
        shutil.copytree(logs / "whole", logs / name, ignore=shutil.ignore_patterns("epoch_2", "epoch_latest"))

    # one process loads what two wrote: consolidated, through create_model_and_transforms
    first = _consolidated(whole_ckpts / "epoch_1", tmp_path / "epoch_1.pt")
    loaded, _, _ = clipkit.create_model_and_transforms(model, pretrained=str(tmp_path / "epoch_1.pt"))
    assert list(loaded.state_dict()) == list(first)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, first[key]), key
    # ... and they are the weights the run had: FSDP over 2 x 4 trains like one process with batch 8
    assert run_inprocess(_args(model, logs, "single", 8, 1)) == 0
    single = weights(logs / "single" / "checkpoints" / "epoch_1.pt")
    assert list(single) == list(first)
    for key in single:
        torch.testing.assert_close(first[key], single[key], rtol=1e-4, atol=1e-5, msg=key)

    # --resume latest finds the folder and continues in 2 processes: exactly the uninterrupted run
    _torchrun(_args(model, logs, "part", 4, 2, "--fsdp", "--resume", "latest"))
    whole = _consolidated(whole_ckpts / "epoch_2", tmp_path / "whole.pt")
    resumed = _consolidated(logs / "part" / "checkpoints" / "epoch_2", tmp_path / "resumed.pt")
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert ckpt.is_dcp(logs / "part" / "checkpoints" / "epoch_latest")
    assert not [p for p in (logs / "part" / "checkpoints").iterdir() if p.name.startswith(".")]

    # and in 1 process (DCP reshards), with --fsdp and without it (which reads a folder only when named)
    for name, extra in (("part-one", ["--fsdp", "--resume", "latest"]),
                        ("part-plain", ["--resume", str(logs / "part-plain" / "checkpoints" / "epoch_1")])):
        assert run_inprocess(_args(model, logs, name, 8, 2, *extra)) == 0
        assert f"resumed from {logs / name / 'checkpoints' / 'epoch_1'} (after epoch 1)" in \
            (logs / name / "out.log").read_text()
        final = (_consolidated(logs / name / "checkpoints" / "epoch_2", tmp_path / f"{name}.pt") if "--fsdp" in extra
                 else weights(logs / name / "checkpoints" / "epoch_2.pt"))
        for key in whole:
            torch.testing.assert_close(final[key], whole[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def _fake_dcp(folder, step):
    from torch.distributed.checkpoint.metadata import Metadata

    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata={}, storage_data={})))
    torch.save({"epoch": 1, "name": "x", "clipkit": {"step": step}}, folder / ckpt.EXTRAS)


def test_a_folder_swap_cut_short_leaves_a_complete_latest_checkpoint(tmp_path):
    # the old epoch_latest moved aside, the new one not yet in place: the old one comes back
    _fake_dcp(tmp_path / ".old-epoch_latest", 5)
    _fake_dcp(tmp_path / ".tmp-epoch_latest", 6)
    (tmp_path / ".tmp-epoch_latest" / ".metadata").unlink()  # a write cut short
    ckpt.remove_torn(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_latest"]
    assert ckpt.find_latest(tmp_path) == tmp_path / "epoch_latest"
    # a folder without DCP's .metadata is never a checkpoint
    _fake_dcp(tmp_path / "epoch_2", 9)
    (tmp_path / "epoch_2" / ".metadata").unlink()
    assert ckpt.find_latest(tmp_path) == tmp_path / "epoch_latest"
    assert consolidate_main([str(tmp_path / "epoch_2"), str(tmp_path / "out.pt")]) == 1
    assert consolidate_main([]) == 2
