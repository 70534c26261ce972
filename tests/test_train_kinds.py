"""The trainer's registered kinds: objectives (``--objective``, ``--objective-opt``, OpenCLIP's --siglip and
--distill-*) and reporters (``--report-to``), builtin and third-party alike, in real short runs."""
import json
import math
from dataclasses import dataclass

import pytest
import torch

import clipkit
from _train_support import TINY_MODEL, base_args, read_scalars, run_inprocess, weights, write_model
from clipkit import kinds
from clipkit.plugin import option
from clipkit.registry import registry
from clipkit.testing import contract_cases
from clipkit.train import main
from clipkit.train.args import parse_args
from clipkit.train.loss import ClipLoss
from clipkit.train.objectives import FEATURES, BaseObjective
from clipkit.train.selection import objective_choice


def _choice(*flags):
    settings = parse_args(["--model", "m", "--train-data", "x.tar", *flags])
    return objective_choice(settings.model, settings.optimization)


# -- selecting an objective -----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, name, options", [
    ([], "clip", {}),
    (["--local-loss", "--gather-with-grad"], "clip", {"local_loss": True, "gather_with_grad": True}),
    (["--siglip"], "siglip", {}),
    (["--siglip", "--loss-dist-impl", "gather"], "siglip", {"dist_impl": "gather"}),
    (["--distill-model", "T", "--distill-pretrained", "w.pt", "--local-loss"], "distill",
     {"model": "T", "pretrained": "w.pt", "local_loss": True}),
    (["--objective", "siglip", "--loss-dist-impl", "shift"], "siglip", {"dist_impl": "shift"}),
    (["--objective", "clip", "--objective-opt", "local_loss=True"], "clip", {"local_loss": True}),
    (["--local-loss", "--objective-opt", "local_loss=False"], "clip", {"local_loss": False}),  # the option wins
])
def test_openclip_flags_and_objective_select_the_objective_and_its_options(flags, name, options):
    choice = _choice(*flags)
    assert (choice.name, dict(choice.options)) == (name, options)
    bound = choice.bound()
    assert all(getattr(bound, key) == value for key, value in options.items())


@pytest.mark.parametrize("flags, message", [
    (["--objective", "clp"], "--objective: unknown objective 'clp' (did you mean 'clip'?); installed: clip, "),
    (["--objective-opt", "lcal_loss=True"], "--objective-opt lcal_loss: unknown key for objective 'clip' (did you "
                                            "mean 'local_loss'?)"),
    (["--objective-opt", "local_loss=3"], "--objective-opt local_loss: expected boolean, got 3"),
    (["--objective", "distill"], "--objective distill needs a teacher: --distill-model and --distill-pretrained"),
    (["--distill-pretrained", "w.pt"], "--distill-model and --distill-pretrained go together"),
    (["--report-to", "tensorbord"], "--report-to: unknown reporter 'tensorbord' (did you mean 'tensorboard'?); "
                                    "installed: results, tensorboard, wandb"),
    (["--report-to", "results"], "--report-to results: the results reporter is always on"),
])
def test_unknown_names_and_bad_options_are_one_line_flag_errors(flags, message, capsys):
    assert main(["--model", "m", "--train-data", "x.tar", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_report_to_keeps_openclips_values():
    assert parse_args(["--model", "m", "--train-data", "x.tar", "--report-to", "all"]).logging.report_to == \
        "tensorboard,wandb"
    assert parse_args(["--model", "m", "--train-data", "x.tar", "--report-to", "tensorboard"]).logging.report_to == \
        "tensorboard"


def test_every_builtin_objective_and_reporter_is_registered_by_its_plugin_and_has_contract_cases():
    builtin = [n for n in registry.names(kinds.OBJECTIVE) if registry.get(kinds.OBJECTIVE, n).plugin.builtin]
    assert builtin == ["clip", "distill", "siglip"]  # (an installed plugin's, e.g. coca, are not builtins)
    assert registry.names(kinds.REPORTER) == ["results", "tensorboard", "wandb"]
    assert {registry.get(kinds.OBJECTIVE, n).plugin.module for n in builtin} == {"clipkit.builtin.objectives"}
    assert registry.get(kinds.REPORTER, "results").meta == {"always": True, "needs_folder": True}
    cases = {str(c) for c in contract_cases(kinds=[kinds.OBJECTIVE, kinds.REPORTER])}
    for name in registry.names(kinds.OBJECTIVE):
        assert {f"objective:{name}:{c}" for c in kinds.spec(kinds.OBJECTIVE).contracts} <= cases
    for name in registry.names(kinds.REPORTER):
        assert {f"reporter:{name}:{c}" for c in kinds.spec(kinds.REPORTER).contracts} <= cases


# -- a third party's objective and reporter, selected by flags ---------------------------------------------
@dataclass
class PenaltyOptions:
    weight: float = option(0.1, "How much the logit scale is penalised.", ge=0)


class Penalty(BaseObjective):
    """The CLIP loss plus ``weight * logit_scale / 100``: a second term whose value is known."""

    name = "penalty"
    needs = FEATURES

    def __init__(self, options, ctx):
        self.weight = options.weight
        self.clip = ClipLoss(rank=ctx.rank, world=ctx.world)

    def __call__(self, outputs):
        image, text, scale = self.inputs(outputs)
        return {"contrastive_loss": self.clip(image, text, scale), "scale_penalty": self.weight * scale / 100}


class Counting(BaseObjective):
    """The CLIP loss, counting its calls: state that a training checkpoint keeps."""

    name = "counting"
    needs = FEATURES

    def __init__(self, options, ctx):
        self.calls = 0
        self.clip = ClipLoss()

    def __call__(self, outputs):
        self.calls += 1
        image, text, scale = self.inputs(outputs)
        return {"contrastive_loss": self.clip(image, text, scale)}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        RESTORED.append(dict(state))
        self.calls = state["calls"]


class Needy(BaseObjective):
    """Reads an output no two-tower model gives, without going through ``inputs()``."""

    name = "needy"
    needs = (*FEATURES, "caption_logits")

    def __init__(self, options, ctx):
        pass

    def __call__(self, outputs):
        return {"caption_loss": outputs["caption_logits"].mean()}


RECORDED, RESTORED = [], []


class Recorder:
    def __init__(self, ctx):
        self.ctx, self.values, self.results, self.closed = ctx, [], [], 0
        RECORDED.append(self)

    def scalars(self, values, step):
        self.values.append((step, dict(values)))

    def result(self, metrics):
        self.results.append(metrics)

    def close(self):
        self.closed += 1


@pytest.fixture
def third_party(clipkit_plugins):
    @clipkit.hookimpl
    def register_objectives(register):
        register("penalty", f"{__name__}:Penalty", config=f"{__name__}:PenaltyOptions")
        register("counting", f"{__name__}:Counting")
        register("needy", f"{__name__}:Needy")

    @clipkit.hookimpl
    def register_reporters(register):
        register("recorder", f"{__name__}:Recorder")

    RECORDED.clear()
    RESTORED.clear()
    clipkit_plugins.module("kindsplug", register_objectives=register_objectives, register_reporters=register_reporters)
    yield
    RECORDED.clear()


def _synthetic(tmp_path, name, *extra):
    return base_args(write_model(tmp_path), "", tmp_path / "logs", name, "--dataset-type", "synthetic",
                     "--train-num-samples", "16", "--epochs", "1", *extra)


@pytest.mark.slow
def test_a_third_party_objective_and_reporter_train_selected_by_flags(third_party, tmp_path):
    assert run_inprocess(_synthetic(tmp_path, "third", "--objective", "penalty", "--objective-opt", "weight=0.5",
                                    "--report-to", "recorder,tensorboard")) == 0
    [recorder] = RECORDED
    assert recorder.ctx.run_folder == tmp_path / "logs" / "third" and recorder.ctx.name == "third"
    assert recorder.ctx.settings["objective_opt"] == {"weight": 0.5} and recorder.closed == 1
    steps = [(step, values) for step, values in recorder.values if "train/loss" in values]
    assert [step for step, _ in steps] == [1, 2]
    first = steps[0][1]
    # the first step's terms are computed before any update: the initial logit scale is 1/0.07
    assert first["train/scale_penalty"] == pytest.approx(0.5 / 0.07 / 100, rel=1e-5)
    for _, values in steps:
        assert values["train/loss"] == pytest.approx(values["train/contrastive_loss"] + values["train/scale_penalty"],
                                                     rel=1e-6)
    assert [v for _, v in read_scalars(tmp_path / "logs" / "third", "train/scale_penalty")] == \
        pytest.approx([values["train/scale_penalty"] for _, values in steps])
    assert json.loads((tmp_path / "logs" / "third" / "settings.json").read_text())["optimization"]["objective"] == \
        "penalty"


@pytest.mark.slow
def test_objective_options_come_from_a_config_file_and_flags_win(third_party, tmp_path):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"optimization": {"objective": "penalty", "objective_opt": {"weight": 0.25}}}))
    assert run_inprocess(_synthetic(tmp_path, "from-file", "--config", config, "--report-to", "recorder")) == 0
    assert RECORDED[-1].values[0][1]["train/scale_penalty"] == pytest.approx(0.25 / 0.07 / 100, rel=1e-5)
    assert run_inprocess(_synthetic(tmp_path, "flag-wins", "--config", config, "--report-to", "recorder",
                                    "--objective-opt", "weight=1.0")) == 0
    assert RECORDED[-1].values[0][1]["train/scale_penalty"] == pytest.approx(1.0 / 0.07 / 100, rel=1e-5)


@pytest.mark.slow
def test_an_objectives_state_is_kept_in_training_checkpoints(third_party, tmp_path, capsys):
    logs = tmp_path / "logs"
    assert run_inprocess(_synthetic(tmp_path, "counted", "--objective", "counting", "--epochs", "2")) == 0
    saved = [torch.load(logs / "counted" / "checkpoints" / f"epoch_{n}.pt", weights_only=True) for n in (1, 2)]
    assert [c["objective"] for c in saved] == [{"calls": 2}, {"calls": 4}]  # 2 steps an epoch
    assert run_inprocess(_synthetic(tmp_path, "again", "--objective", "counting", "--epochs", "2", "--resume",
                                    logs / "counted" / "checkpoints" / "epoch_1.pt")) == 0
    assert RESTORED == [{"calls": 2}]
    again = torch.load(logs / "again" / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert again["objective"] == {"calls": 4}
    # an objective without state does not silently drop another objective's
    assert run_inprocess(_synthetic(tmp_path, "other", "--epochs", "2", "--resume",
                                    logs / "counted" / "checkpoints" / "epoch_1.pt")) == 1
    assert ("objective 'clip' keeps no state, but the checkpoint has objective state (calls)"
            in capsys.readouterr().err.strip().splitlines()[-1])


@pytest.mark.slow
def test_an_objective_needing_what_the_model_does_not_output_stops_at_the_first_step(third_party, tmp_path, capsys):
    assert run_inprocess(_synthetic(tmp_path, "needy", "--objective", "needy")) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("objective 'needy' needs caption_logits, which neither the model (ClipModel) nor the objective's extras "
            "give (the step has: image_features, logit_scale, text_features); choose an --objective") in last
    assert not list((tmp_path / "logs" / "needy" / "checkpoints").glob("epoch_*.pt"))  # nothing trained, nothing saved


def test_a_third_party_objectives_options_are_checked_before_any_work(third_party, capsys):
    assert main(["--model", "m", "--train-data", "x.tar", "--objective", "penalty", "--objective-opt",
                 "weight=-1"]) == 1
    assert "--objective-opt weight: must be >= 0, got -1" in capsys.readouterr().err


# -- distillation, end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny teacher (the student's image size and tokenizer), saved with clipkit.save_pretrained."""
    folder = tmp_path_factory.mktemp("teacher")
    config = write_model(folder, "teacher", TINY_MODEL)
    torch.manual_seed(11)
    model = clipkit.create_model(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    clipkit.save_pretrained(model, folder / "saved")
    return config, str(folder / "saved")


@pytest.mark.slow
def test_distillation_trains_logs_both_terms_and_resumes_bit_identically(teacher, tmp_path):
    model, saved = teacher
    student = write_model(tmp_path)
    flags = ["--dataset-type", "synthetic", "--train-num-samples", "32", "--distill-model", model,
             "--distill-pretrained", saved, "--report-to", "tensorboard"]
    assert run_inprocess(base_args(student, "", tmp_path, "distill", *flags)) == 0
    run = tmp_path / "distill"
    losses, contrastive, distill = (read_scalars(run, f"train/{tag}") for tag in ("loss", "contrastive_loss",
                                                                                "distill_loss"))
    assert len(losses) == 8 and [s for s, _ in distill] == [s for s, _ in losses]
    for (_, total), (_, c), (_, d) in zip(losses, contrastive, distill):
        assert total == pytest.approx(c + d, rel=1e-5) and d > 0
    # resuming from the first epoch's checkpoint continues exactly as the run did
    assert run_inprocess(base_args(student, "", tmp_path, "resumed", *flags, "--resume",
                                   run / "checkpoints" / "epoch_1.pt")) == 0
    ref, got = weights(run / "checkpoints" / "epoch_2.pt"), weights(tmp_path / "resumed" / "checkpoints" / "epoch_2.pt")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_a_teacher_that_does_not_fit_the_student_is_one_line(teacher, tmp_path, capsys):
    model, saved = teacher
    other = write_model(tmp_path, "small-student", {**TINY_MODEL, "vision_cfg": {**TINY_MODEL["vision_cfg"],
                                                                                 "image_size": 16}})
    args = base_args(other, "", tmp_path, "misfit", "--dataset-type", "synthetic", "--train-num-samples", "16",
                     "--epochs", "1", "--distill-model", model, "--distill-pretrained", saved)
    assert run_inprocess(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "the teacher must use the student's image size and tokenizer" in err[-1]
