"""An objective's state in training checkpoints is kept per process: under torchrun every process resumes with
its own (``.pt`` files and ``--fsdp`` folders alike), and a resume with another number of processes gives every
process process 0's, which is also what the checkpoint's top-level ``objective`` holds."""
import logging
import os
import textwrap
from types import SimpleNamespace

import pytest
import torch

from _train_support import base_args, torchrun, write_model
from clipkit.train import checkpointer as ckpt
from clipkit.train.distributed import Env
from clipkit.train.objectives import BaseObjective
from clipkit.train.parallel import SingleProcess

# a third-party distribution, installed by putting its folder on PYTHONPATH: an objective whose state differs
# between processes (its rank, its own calls and a sum over its own samples), and which keeps what it was
# given back on resume under "restored"
PLUGIN = '''
import clipkit
import torch

from clipkit.plugin import BaseObjective
from clipkit.train.loss import ClipLoss


class Ranked(BaseObjective):
    name = "ranked"

    def __init__(self, options, ctx):
        self.rank, self.calls, self.seen, self.restored = ctx.rank, 0, torch.zeros(()), {}
        self.clip = ClipLoss(rank=ctx.rank, world=ctx.world)

    def __call__(self, outputs):
        image, text, scale = self.inputs(outputs)
        self.calls += 1
        self.seen = self.seen + image.detach().abs().sum()
        return {"contrastive_loss": self.clip(image, text, scale)}

    def state_dict(self):
        return {"rank": self.rank, "calls": self.calls, "seen": self.seen, "restored": self.restored}

    def load_state_dict(self, state):
        self.restored = {key: value for key, value in state.items() if key != "restored"}
        self.calls, self.seen = state["calls"], state["seen"]


@clipkit.hookimpl
def register_objectives(register):
    register("ranked", "clipkit_ranked_objective:Ranked")
'''


@pytest.fixture
def ranked_plugin(tmp_path, monkeypatch):
    """The plugin's folder on PYTHONPATH of the processes torchrun starts (not in this process)."""
    site = tmp_path / "site"
    (site / "clipkit_ranked_objective-0.1.dist-info").mkdir(parents=True)
    (site / "clipkit_ranked_objective.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "clipkit_ranked_objective-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clipkit-ranked-objective\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[clipkit]\nranked = clipkit_ranked_objective\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))


def _args(root, name, epochs, *extra):
    args = base_args(write_model(root), "", root / "logs", name, "--dataset-type", "synthetic",
                     "--train-num-samples", "32", "--objective", "ranked", *extra)
    args = [a for a in args if a not in ("--train-data", "")]
    args[args.index("--batch-size") + 1] = "4"  # 32 samples, 2 processes: 4 steps an epoch
    args[args.index("--epochs") + 1] = str(epochs)
    return args


def _torchrun(args, processes=2):
    proc = torchrun(args, processes)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _extras(path):
    """The checkpoint dict of a .pt file, or the clipkit part of a --fsdp folder (weights_only, as clipkit reads)."""
    return torch.load(path / ckpt.EXTRAS if path.is_dir() else path, map_location="cpu", weights_only=True)


def _without_restored(state):
    return {key: value for key, value in state.items() if key != "restored"}


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("fsdp", [False, True], ids=["pt", "fsdp"])
def test_every_process_resumes_with_its_own_objective_state(ranked_plugin, tmp_path, fsdp):
    flags = ["--fsdp"] if fsdp else []
    saved = tmp_path / "logs" / "first" / "checkpoints" / ("epoch_1" if fsdp else "epoch_1.pt")
    _torchrun(_args(tmp_path, "first", 1, *flags))
    first = _extras(saved)
    ranks = [entry["objective"] for entry in first["clipkit"]["ranks"]]
    assert [(s["rank"], s["calls"], s["restored"]) for s in ranks] == [(0, 4, {}), (1, 4, {})]
    assert ranks[0]["seen"] != ranks[1]["seen"]  # each process summed its own samples
    _same(first["objective"], ranks[0])  # the top level keeps process 0's

    # the same number of processes: each process gets its own back and continues from it
    _torchrun(_args(tmp_path, "again", 2, *flags, "--resume", saved))
    again = _extras(saved.parent.parent.parent / "again" / "checkpoints" / ("epoch_2" if fsdp else "epoch_2.pt"))
    resumed = [entry["objective"] for entry in again["clipkit"]["ranks"]]
    for rank in (0, 1):
        _same(resumed[rank]["restored"], _without_restored(ranks[rank]))
        assert (resumed[rank]["rank"], resumed[rank]["calls"]) == (rank, 8)
        assert resumed[rank]["seen"] > ranks[rank]["seen"]

    # one process: process 0's
    _torchrun(_args(tmp_path, "alone", 2, *flags, "--resume", saved), processes=1)
    alone = _extras(saved.parent.parent.parent / "alone" / "checkpoints" / ("epoch_2" if fsdp else "epoch_2.pt"))
    [state] = [entry["objective"] for entry in alone["clipkit"]["ranks"]]
    _same(state["restored"], _without_restored(ranks[0]))


# -- the checkpointer alone, in this process ------------------------------------------------------------------
class Kept(BaseObjective):
    """An objective whose state is whatever it was last given."""

    name = "kept"

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = dict(state)


def _checkpointer(folder, objective, env=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    settings = SimpleNamespace(save_frequency=1, delete_previous_checkpoint=False)
    env = env or Env()
    return ckpt.Checkpointer(settings, folder, env=env, parallel=SingleProcess(env),
                             parts=ckpt.SavedParts(model, optimizer, names, objective=objective),
                             run_name="run", model_name="linear", epochs=1)


def _written_by_two(tmp_path):
    """A checkpoint as two processes write it: each one's objective state in ``ranks``, process 0's on top."""
    _checkpointer(tmp_path, Kept({"rank": 0, "queue": torch.zeros(2)})).save(1, 4, None, epoch_end=True)
    path = tmp_path / ckpt.LATEST
    data = torch.load(path, weights_only=True)
    assert data["objective"]["rank"] == 0 and data["clipkit"]["ranks"][0]["objective"]["rank"] == 0
    one = dict(data["clipkit"]["ranks"][0], objective={"rank": 1, "queue": torch.ones(2)})
    data["clipkit"]["ranks"].append(one)
    ckpt.atomic_save(data, path)
    return path


@pytest.mark.parametrize("rank, world, expected", [(1, 2, 1), (0, 2, 0), (0, 1, 0), (2, 3, 0)])
def test_a_process_restores_its_own_objective_state_only_with_the_same_number_of_processes(
        tmp_path, monkeypatch, caplog, rank, world, expected):
    from clipkit.train import distributed

    monkeypatch.setattr(distributed, "all_max", lambda value, env: value)  # no process group in this test
    path = _written_by_two(tmp_path)
    objective = Kept({})
    with caplog.at_level(logging.WARNING, "clipkit.train"):
        _checkpointer(tmp_path / "resumed", objective, Env(rank=rank, world=world)).restore(path, 4)
    assert objective.state["rank"] == expected
    assert torch.equal(objective.state["queue"], torch.full((2,), float(expected)))
    warned = [r.getMessage() for r in caplog.records if "processes and this run has" in r.getMessage()]
    assert warned == (["the checkpoint was written by 2 processes and this run has 3: every process resumes from "
                       "process 0's data position, generators and objective state"] if world == 3 else [])


def test_a_checkpoint_from_before_per_process_objective_state_gives_every_process_process_0s(tmp_path, monkeypatch):
    from clipkit.train import distributed

    monkeypatch.setattr(distributed, "all_max", lambda value, env: value)
    path = _written_by_two(tmp_path)
    data = torch.load(path, weights_only=True)
    for entry in data["clipkit"]["ranks"]:
        del entry["objective"]
    ckpt.atomic_save(data, path)
    objective = Kept({})
    _checkpointer(tmp_path / "resumed", objective, Env(rank=1, world=2)).restore(path, 4)
    assert objective.state["rank"] == 0


def test_objective_state_is_saved_on_the_cpu():
    state = {"queue": torch.ones(2, requires_grad=True) * 2, "nested": [(torch.zeros(1), 3)], "n": 1}
    moved = ckpt.on_cpu(state)
    assert moved["queue"].device.type == "cpu" and not moved["queue"].requires_grad
    assert isinstance(moved["nested"], list) and isinstance(moved["nested"][0], tuple) and moved["n"] == 1
