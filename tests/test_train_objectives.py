"""Objectives against OpenCLIP 3.3.0's losses (values and gradients), the distillation teacher, GradCache
accumulation over any objective, and two processes (gloo on the CPU) against OpenCLIP's distributed losses
and against one process with the global batch."""
import datetime
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import free_port
from clipkit._typed import validate
from clipkit.errors import TrainingError
from clipkit.registry import import_target
from clipkit.train.objectives import (
    BUILTIN_OBJECTIVES,
    BaseObjective,
    ClipOptions,
    DistillOptions,
    ObjectiveContext,
    SigLipOptions,
    build_clip,
    build_distill,
    build_siglip,
    register_builtin_objectives,
)
from clipkit.train.objectives.accumulate import gradcache_outputs
from clipkit.train.objectives.distill import DistillObjective

TEACHER = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 1, "width": 32, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
TOL = dict(rtol=1e-6, atol=1e-6)


def _leaves(n, d=16, seed=0, scale=1 / 0.07):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return image, text, torch.tensor(scale, requires_grad=True)


def _assert_same(ours, theirs, wrt):
    """Equal values, and equal gradients with respect to every tensor in ``wrt``."""
    torch.testing.assert_close(ours, theirs, **TOL)
    for a, b in zip(torch.autograd.grad(ours, wrt, retain_graph=True), torch.autograd.grad(theirs, wrt, retain_graph=True)):
        torch.testing.assert_close(a, b, **TOL)


# -- descriptions and options -------------------------------------------------------------------------------
def test_the_builtins_are_described_without_torch_and_register_like_a_third_partys():
    code = ("import sys, clipkit.train.objectives as o; assert 'torch' not in sys.modules, 'torch imported'; "
            "print([(s.name, s.factory, s.config) for s in o.BUILTIN_OBJECTIVES])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "('clip', 'clipkit.train.objectives:build_clip', 'clipkit.train.objectives:ClipOptions')" in out.stdout
    calls = []
    register_builtin_objectives(lambda name, factory, *, config=None: calls.append((name, factory, config)))
    assert [c[0] for c in calls] == ["clip", "siglip", "distill"]
    for spec, built in zip(BUILTIN_OBJECTIVES, [build_clip, build_siglip, build_distill]):
        assert import_target(spec.factory, what=spec.name) is built
        assert import_target(spec.config, what=spec.name) in (ClipOptions, SigLipOptions, DistillOptions)


def test_options_are_checked_with_key_paths():
    _, problems = validate(DistillOptions, {}, "objective", "objective 'distill'")
    assert [str(p) for p in problems] == ["objective.model: missing required key for objective 'distill'",
                                          "objective.pretrained: missing required key for objective 'distill'"]
    _, problems = validate(DistillOptions, {"model": " ", "pretrained": "w.pt"}, "objective", "objective 'distill'")
    assert [str(p) for p in problems] == ["objective.model: must not be empty"]
    _, problems = validate(SigLipOptions, {"dist_impl": "ring"}, "objective", "objective 'siglip'")
    assert [str(p) for p in problems] == [
        "objective.dist_impl: expected 'bidir' | 'shift' | 'reduce' | 'gather' | null, got \"ring\""]
    options, problems = validate(ClipOptions, {"local_loss": True}, "objective", "objective 'clip'")
    assert problems == [] and options == ClipOptions(local_loss=True, gather_with_grad=False)


# -- one process: OpenCLIP's losses as the oracle -------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("bias", [None, -1.5])
@pytest.mark.parametrize("scale", [1 / 0.07, 100.0])
def test_clip_equals_openclip_clip_loss(n, bias, scale):
    from open_clip.loss import ClipLoss

    image, text, logit_scale = _leaves(n, seed=n, scale=scale)
    outputs = {"image_features": image, "text_features": text, "logit_scale": logit_scale}
    wrt = [image, text, logit_scale]
    if bias is not None:
        outputs["logit_bias"] = torch.tensor(bias, requires_grad=True)
        wrt.append(outputs["logit_bias"])
    objective = build_clip(ClipOptions(), ObjectiveContext())
    terms = objective(outputs)
    assert list(terms) == ["contrastive_loss"] and not objective.per_process
    _assert_same(terms["contrastive_loss"], ClipLoss()(image, text, logit_scale, outputs.get("logit_bias")), wrt)


@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("bias", [None, -10.0])
def test_siglip_equals_openclip_siglip_loss(n, bias):
    from open_clip.loss import SigLipLoss

    image, text, logit_scale = _leaves(n, seed=n, scale=10.0)
    outputs = {"image_features": image, "text_features": text, "logit_scale": logit_scale}
    wrt = [image, text, logit_scale]
    if bias is not None:
        outputs["logit_bias"] = torch.tensor(bias, requires_grad=True)
        wrt.append(outputs["logit_bias"])
    objective = build_siglip(SigLipOptions(), ObjectiveContext())
    terms = objective(outputs)
    assert list(terms) == ["contrastive_loss"] and objective.per_process
    _assert_same(terms["contrastive_loss"], SigLipLoss()(image, text, logit_scale, outputs.get("logit_bias")), wrt)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """A tiny teacher config and its weights (logit scale 30, not the initial 1/0.07) as files."""
    from clipkit.factory import create_model

    folder = tmp_path_factory.mktemp("teacher")
    config = folder / "tiny-teacher.json"
    config.write_text(json.dumps(TEACHER))
    torch.manual_seed(7)
    model = create_model(str(config))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    weights = folder / "teacher.pt"
    torch.save(model.state_dict(), weights)
    return str(config), str(weights)


def _distill(teacher_files, **options):
    config, weights = teacher_files
    return build_distill(DistillOptions(model=config, pretrained=weights, **options), ObjectiveContext())


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, 32, 32, generator=g), "texts": torch.randint(0, 100, (n, 16), generator=g)}


@pytest.mark.parametrize("n", [2, 5, 16])
def test_distill_equals_openclip_distill_clip_loss(teacher_files, n):
    from open_clip.loss import DistillClipLoss

    objective = _distill(teacher_files)
    batch = _batch(n, seed=n)
    extras = objective.extra_forward(batch)
    with torch.no_grad():  # the teacher's own forward, as OpenCLIP's trainer calls it
        reference = objective.teacher(batch["images"], batch["texts"])
    assert reference["logit_scale"].item() == pytest.approx(30.0)
    torch.testing.assert_close(extras["teacher_image_features"], reference["image_features"], rtol=0, atol=0)
    torch.testing.assert_close(extras["teacher_text_features"], reference["text_features"], rtol=0, atol=0)

    image, text, logit_scale = _leaves(n, d=32, seed=n)
    terms = objective({"image_features": image, "text_features": text, "logit_scale": logit_scale, **extras})
    theirs = DistillClipLoss()(image, text, logit_scale, reference["image_features"], reference["text_features"],
                               reference["logit_scale"], output_dict=True)
    assert list(terms) == list(theirs) == ["contrastive_loss", "distill_loss"]
    for key in terms:
        _assert_same(terms[key], theirs[key], [image, text, logit_scale])


def test_the_teacher_is_built_by_the_factory_with_its_weights_and_frozen(teacher_files):
    objective = _distill(teacher_files)
    teacher = objective.teacher
    saved = torch.load(teacher_files[1], weights_only=True)
    assert saved.keys() == teacher.state_dict().keys()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())

    student = _student()
    batch = _batch(6)
    outputs = {**student(batch["images"], batch["texts"]), **objective.extra_forward(batch)}
    sum(objective(outputs).values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_distill_errors_name_the_teacher_and_the_mismatch(teacher_files, tmp_path):
    config, weights = teacher_files
    with pytest.raises(TrainingError, match=r"^distill teacher 'no-such-model' \(pretrained '.*teacher.pt'\): "
                                            r".*no-such-model"):
        build_distill(DistillOptions(model="no-such-model", pretrained=weights), ObjectiveContext())
    objective = _distill(teacher_files)
    batch = _batch(2)
    with pytest.raises(TrainingError, match=r"the teacher '.*tiny-teacher.json' takes 32x32 images and 16-token "
                                            r"texts, but the batch has 64x64 images and 16-token texts"):
        objective.extra_forward({**batch, "images": torch.zeros(2, 3, 64, 64)})
    image, text, scale = _leaves(2, d=32)
    outputs = {"image_features": image, "text_features": text, "logit_scale": scale, **objective.extra_forward(batch)}
    with pytest.raises(TrainingError, match="distill: the model has a logit bias"):
        objective({**outputs, "logit_bias": torch.tensor(-10.0)})
    del outputs["teacher_text_features"]
    with pytest.raises(TrainingError, match="objective 'distill' needs teacher_text_features, which the step's "
                                            "outputs lack"):
        objective(outputs)


def test_the_teacher_is_built_in_the_runs_precision(teacher_files):
    config, weights = teacher_files
    objective = build_distill(DistillOptions(model=config, pretrained=weights), ObjectiveContext(precision="pure_bf16"))
    assert {p.dtype for p in objective.teacher.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("name", ["clip", "distill"])
def test_local_loss_without_gather_with_grad_warns_on_several_processes(teacher_files, caplog, name):
    config, weights = teacher_files
    build = {"clip": lambda o, c: build_clip(ClipOptions(**o), c),
             "distill": lambda o, c: build_distill(DistillOptions(model=config, pretrained=weights, **o), c)}[name]
    for options, world in [({"local_loss": True}, 1), ({"local_loss": True, "gather_with_grad": True}, 2)]:
        build(options, ObjectiveContext(world=world))
    assert caplog.records == []
    objective = build({"local_loss": True}, ObjectiveContext(rank=1, world=2))
    assert objective.per_process
    assert [r.getMessage() for r in caplog.records] == [
        "--local-loss without --gather-with-grad: gradients miss the terms other processes' rows give this "
        "process's features; add --gather-with-grad for the exact gradient"]


def test_a_stateless_objective_refuses_another_objectives_state():
    objective = build_clip(ClipOptions(), ObjectiveContext())
    assert isinstance(objective, BaseObjective) and objective.state_dict() == {} and objective.extra_forward({}) == {}
    objective.load_state_dict({})
    with pytest.raises(TrainingError, match="objective 'clip' keeps no state, but the checkpoint has objective "
                                            "state \\(queue\\)"):
        objective.load_state_dict({"queue": torch.zeros(1)})


# -- GradCache: accumulation through the objective interface ----------------------------------------------
def _student(bias=None, seed=0):
    """A tiny clipkit model to train, with its own random weights (and a logit bias for SigLIP)."""
    from clipkit.factory import create_model

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny-student.json"
        path.write_text(json.dumps({**TEACHER, "embed_dim": 32}))
        return create_model(str(path), output_dict=True, **({} if bias is None else {"init_logit_bias": bias}))


@pytest.mark.parametrize("accum", [2, 3])
@pytest.mark.parametrize("name", ["clip", "siglip", "distill"])
def test_accumulated_passes_give_the_gradient_of_the_whole_batch(teacher_files, name, accum):
    objective = {"clip": lambda: build_clip(ClipOptions(), ObjectiveContext()),
                 "siglip": lambda: build_siglip(SigLipOptions(), ObjectiveContext()),
                 "distill": lambda: _distill(teacher_files)}[name]()
    student = _student(bias=-10.0 if name == "siglip" else None)
    batch = _batch(4 * accum, seed=accum)
    whole = objective({**student(batch["images"], batch["texts"]), **objective.extra_forward(batch)})
    total = sum(whole.values())
    total.backward()
    expected = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)

    micro = [{k: v[4 * i:4 * (i + 1)] for k, v in batch.items()} for i in range(accum)]
    with torch.no_grad():  # as the trainer does: extras once per micro-batch, every output cached first
        extras = [objective.extra_forward(m) for m in micro]
        cached = [{**student(m["images"], m["texts"]), **e} for m, e in zip(micro, extras)]
    for j, m in enumerate(micro):
        live = {**student(m["images"], m["texts"]), **extras[j]}
        terms = objective(gradcache_outputs(cached, live, j))
        assert list(terms) == list(whole)
        for key in terms:  # every pass scores the whole step's batch
            torch.testing.assert_close(terms[key], whole[key], rtol=1e-5, atol=1e-6)
        sum(terms.values()).backward()
    for key, param in student.named_parameters():
        torch.testing.assert_close(param.grad, expected[key], rtol=1e-4, atol=1e-6, msg=key)


# -- two processes ------------------------------------------------------------------------------------------
class _ScaleOnly(nn.Module):
    """All the distill loss reads of its teacher (its features come in ``outputs``): the logit scale."""

    def __init__(self, scale):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))


_PAIRS = [{}, {"local_loss": True}, {"gather_with_grad": True}, {"local_loss": True, "gather_with_grad": True}]
MODES = ([("clip", o) for o in _PAIRS] + [("siglip", {"dist_impl": d}) for d in ("bidir", "shift", "reduce", "gather")]
         + [("distill", o) for o in _PAIRS])


def _ours(name, options, rank, world):
    ctx = ObjectiveContext(rank=rank, world=world)
    if name == "clip":
        return build_clip(ClipOptions(**options), ctx)
    if name == "siglip":
        return build_siglip(SigLipOptions(**options), ctx)
    return DistillObjective(_ScaleOnly(30.0), rank=rank, world=world, **options)


def _openclip(name, options, rank, world):
    from open_clip import loss

    if name == "siglip":
        ref = loss.SigLipLoss(rank=rank, world_size=world, dist_impl=options["dist_impl"])
        return lambda o: {"contrastive_loss": ref(o["image_features"], o["text_features"], o["logit_scale"],
                                                  o["logit_bias"])}
    if name == "clip":
        ref = loss.ClipLoss(rank=rank, world_size=world, **options)
        return lambda o: {"contrastive_loss": ref(o["image_features"], o["text_features"], o["logit_scale"])}
    ref = loss.DistillClipLoss(rank=rank, world_size=world, **options)
    return lambda o: ref(o["image_features"], o["text_features"], o["logit_scale"], o["teacher_image_features"],
                         o["teacher_text_features"], torch.tensor(30.0), output_dict=True)


def _outputs(full, rows, scale, bias):
    """Fresh leaves: the rows of the global batch one process holds, and the step's scale (and bias)."""
    out = {k: v[rows].clone() for k, v in full.items()}
    out["image_features"].requires_grad_()
    out["text_features"].requires_grad_()
    out["logit_scale"] = torch.tensor(scale, requires_grad=True)
    if bias is not None:
        out["logit_bias"] = torch.tensor(bias, requires_grad=True)
    return out


def _two_process_worker(rank, world, port, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    failures, checks = [], 0

    def check(label, ours, theirs, **tol):
        nonlocal checks
        checks += 1
        try:
            torch.testing.assert_close(ours, theirs, **(tol or TOL))
        except AssertionError as exc:
            failures.append(f"rank {rank}: {label}: {exc}")

    n = 3
    g = torch.Generator().manual_seed(1)  # every process draws the same global batch
    full = {k: F.normalize(torch.randn(world * n, 8, generator=g), dim=-1)
            for k in ("image_features", "text_features", "teacher_image_features", "teacher_text_features")}
    mine, everything = slice(rank * n, (rank + 1) * n), slice(None)
    for name, options in MODES:
        label = f"{name} {options}"
        scale, bias = (10.0, -10.0) if name == "siglip" else (1 / 0.07, None)
        objective = _ours(name, options, rank, world)
        wrt = ["image_features", "text_features", "logit_scale"] + (["logit_bias"] if bias is not None else [])
        ours_in, theirs_in = _outputs(full, mine, scale, bias), _outputs(full, mine, scale, bias)
        ours, theirs = objective(ours_in), _openclip(name, options, rank, world)(theirs_in)
        # without local loss or gather-with-grad, OpenCLIP's feature gradients are the global loss's over world
        factor = world if name != "siglip" and not options else 1
        for key in ours:
            check(f"{label} {key}", ours[key], theirs[key])
            a = torch.autograd.grad(ours[key], [ours_in[k] for k in wrt], retain_graph=True)
            b = torch.autograd.grad(theirs[key], [theirs_in[k] for k in wrt], retain_graph=True)
            for k, x, y in zip(wrt, a, b):
                check(f"{label} {key} d/d{k}", x, y * factor if k.endswith("features") else y)

        # the same objective on one process with the global batch: what training should equal
        single_in = _outputs(full, everything, scale, bias)
        single = _ours(name, options, 0, 1)(single_in)
        total, single_total = sum(ours.values()), sum(single.values())
        logged = total.detach().clone()
        if objective.per_process:
            dist.all_reduce(logged)
            logged /= world
        check(f"{label} logged loss", logged, single_total.detach(), rtol=1e-5, atol=1e-6)
        a = torch.autograd.grad(total, [ours_in[k] for k in wrt])
        b = torch.autograd.grad(single_total, [single_in[k] for k in wrt])
        for k, x, y in zip(wrt, a, b):
            if k.endswith("features"):
                if options.get("local_loss") and not options.get("gather_with_grad"):
                    continue  # documented: this mode leaves out the terms other processes' rows contribute
                # DDP averages over processes: world x the global gradient is the global gradient
                check(f"{label} global d/d{k}", x, world * y[mine], rtol=1e-5, atol=1e-6)
            else:
                x = x.clone()
                dist.all_reduce(x)
                check(f"{label} global d/d{k}", x / world, y, rtol=1e-5, atol=1e-6)
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"checks": checks, "failures": failures}))
    dist.destroy_process_group()


def test_two_processes_equal_openclip_and_one_process_with_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_process_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["failures"] for r in results] == [[], []]
    # per mode: each term's value and gradients against OpenCLIP, then the logged loss and global gradients
    per_term = {"clip": 4, "siglip": 5, "distill": 4}
    global_checks = {"clip": 4, "siglip": 5, "distill": 4}
    expected = sum(per_term[name] * (2 if name == "distill" else 1) + global_checks[name]
                   - (2 if o.get("local_loss") and not o.get("gather_with_grad") else 0) for name, o in MODES)
    assert [r["checks"] for r in results] == [expected, expected]
