"""The trainer as parts: a constructor that sets every attribute, names that say what things are, the strategies."""
import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from clipkit import errors
from clipkit.train import trainer
from clipkit.train.distributed import Env
from clipkit.train.parallel import DataParallel, FullySharded, SingleProcess, parallelism_for


def _assigned(function: ast.FunctionDef) -> set:
    return {node.attr for node in ast.walk(function) if isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self"}


@pytest.mark.parametrize("module, name", [("clipkit.train.trainer", "Trainer"),
                                          ("clipkit.train.checkpointer", "Checkpointer"),
                                          ("clipkit.train.session", "Session")])
def test_every_attribute_is_set_in_the_constructor(module, name):
    cls = getattr(importlib.import_module(module), name)
    tree = ast.parse(inspect.getsource(cls))
    methods = [node for node in tree.body[0].body if isinstance(node, ast.FunctionDef)]
    [init] = [m for m in methods if m.name == "__init__"]
    later = set().union(*(_assigned(m) for m in methods if m.name != "__init__"))
    assert later <= _assigned(init), f"{name}: set outside __init__: {sorted(later - _assigned(init))}"


def test_the_trainer_is_a_shell_over_parts():
    source = inspect.getsource(trainer)
    assert "fsdp" not in source.replace("s.distributed.fsdp", "")  # the strategy decides, not the flag
    assert "torch.save" not in source and "dcp." not in source  # checkpoint I/O is the checkpointer's


def test_errors_live_in_clipkit_errors_and_the_old_paths_still_work():
    from clipkit.train.args import ArgsError
    from clipkit.train.data import DataError
    from clipkit.train.loop import STOPPED_EXIT_CODE, TrainingError

    assert (ArgsError, DataError, TrainingError) == (errors.ArgsError, errors.DataError, errors.TrainingError)
    assert all(issubclass(e, errors.ClipkitError) for e in (ArgsError, DataError, TrainingError))
    assert STOPPED_EXIT_CODE == 75


def test_weights_loading_and_training_checkpoints_are_named_apart():
    root = Path(trainer.__file__).parent
    assert (root / "checkpointer.py").is_file() and not (root / "checkpoints.py").exists()
    from clipkit.train.data import DataSource, ShardSource

    assert issubclass(ShardSource, DataSource)


def test_the_strategy_comes_from_the_settings_and_clips_as_torch_does():
    env = Env()
    assert type(parallelism_for(False, False, env)) is SingleProcess
    assert type(parallelism_for(True, False, env)) is FullySharded  # FSDP in one process too
    assert type(parallelism_for(False, True, Env(world=2))) is DataParallel
    torch.manual_seed(0)
    ours, ref = nn.Linear(4, 3), nn.Linear(4, 3)
    ref.load_state_dict(ours.state_dict())
    batch = torch.randn(5, 4) * 10
    for model in (ours, ref):
        model(batch).sum().backward()
    strategy = SingleProcess(env)
    assert strategy.wrap(ours) is ours  # one process: nothing around it
    strategy.clip_grad_norm(ours, 0.5)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours.parameters(), ref.parameters()))
    with torch.no_grad():
        ours.weight[0, 0] = float("nan")
    assert strategy.any_nonfinite(ours) == ["weight"]


@pytest.mark.parametrize("where", ["in a step", "while saving"])
def test_a_failure_does_not_keep_the_run_alive_in_a_reference_cycle(where):
    """A run that fails is freed as soon as its error is handled: the data loader workers its frames hold
    shut down then, instead of at exit, where multiprocessing would wait for them forever (they block
    SIGTERM)."""
    import gc
    import weakref

    from clipkit.train.session import Session
    from clipkit.train.settings import DistributedSettings

    class Loader:
        pass

    held = []

    def fails():
        loader = Loader()
        held.append(weakref.ref(loader))
        raise OSError(28, "No space left on device")

    gc.disable()
    try:
        try:
            with Session(DistributedSettings(device="cpu"), None, True, None) as session:
                if where == "in a step":
                    fails()
                else:
                    session.agree(fails, 0, "saving a checkpoint")
        except errors.ClipkitError as exc:
            message = str(exc)
        assert "No space left on device" in message
        assert held[0]() is None
    finally:
        gc.enable()
