"""clipkit-train's flags: OpenCLIP's, with its defaults; clear one-line errors before any work starts."""
import argparse
import subprocess
import sys

import pytest
import torch

from clipkit.train import main
from clipkit.train.args import ArgsError, build_parser, parse_args
from clipkit.train.build import precision_setup

BASE = ["--model", "ViT-B-32", "--train-data", "shards/{000..009}.tar"]


def _openclip_parser():
    """OpenCLIP 3.3.0's trainer parser, captured from its own parse_args."""
    import open_clip_train.params as params

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        return real(self, [], namespace)

    argparse.ArgumentParser.parse_args = capture
    try:
        params.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured["parser"]


def test_every_openclip_flag_is_accepted_with_its_default():
    ours = {a.dest: a for a in build_parser()._actions}
    theirs = [a for a in _openclip_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(theirs) == 90
    # documented differences: --model is required (OpenCLIP: RN50); the CoCa weights are the coca plugin's
    # objective options (its flags, installed here), defaulted by the objective, not by the parser
    differ = {"model", "coca_caption_loss_weight", "coca_contrastive_loss_weight"}
    for action in theirs:
        assert action.dest in ours, action.option_strings
        assert action.option_strings[0] in ours[action.dest].option_strings
        if action.dest not in differ:
            assert ours[action.dest].default == action.default, action.dest
    assert ours["model"].required


def test_computed_defaults_follow_openclip():
    vit = parse_args(BASE).optimization
    assert (vit.lr, vit.beta1, vit.beta2, vit.eps) == (5e-4, 0.9, 0.98, 1e-6)
    rn = parse_args(["--model", "RN50", "--train-data", "x.tar"])
    assert (rn.optimization.beta2, rn.optimization.eps) == (0.999, 1e-8)
    assert rn.data.dataset_type == "webdataset"
    assert parse_args(["--model", "m", "--train-data", "a.csv"]).data.dataset_type == "csv"
    assert parse_args(BASE).logging.name.endswith("-model_ViT-B-32-lr_0.0005-b_64-j_4-p_amp")
    assert parse_args(BASE + ["--aug-cfg", "scale=(0.9,1.0)", "color_jitter=0.4"]).model.aug_cfg == {
        "scale": (0.9, 1.0), "color_jitter": 0.4}


@pytest.mark.parametrize("flags, message", [
    (["--torchscript"], "TorchScript is not supported by clipkit; use --torchcompile"),
    (["--horovod"], "Horovod is not supported by clipkit"),
    (["--distill-model", "ViT-L-14"], "--distill-model and --distill-pretrained go together"),
    (["--lock-text-unlocked-layers", "2"], "--lock-text-unlocked-layers/--lock-text-freeze-layer-norm need --lock-text"),
    (["--lock-image-unlocked-groups", "1"], "need --lock-image"),
    (["--train-data-upsampling-factors", "1"], "--train-data-upsampling-factors needs --dataset-resampled"),
    (["--lr-scheduler", "const-cooldown"], "--lr-scheduler const-cooldown needs --epochs-cooldown"),
    (["--epochs-cooldown", "2"], "--epochs-cooldown needs --lr-scheduler const-cooldown"),
    (["--loss-dist-impl", "gather"], "--loss-dist-impl is for the SigLIP loss; add --siglip"),
    (["--momentum", "0.9"], "--momentum is for timm optimizers"),
    (["--resume", "latest"], "--resume latest needs --name"),
    (["--report-to", "mlflow"], "--report-to: unknown reporter 'mlflow'; installed: results, tensorboard, wandb"),
    (["--logs", "none", "--report-to", "tensorboard"], "--report-to tensorboard needs a run folder"),
    (["--zeroshot-classnames", "c.txt"], "--zeroshot-classnames needs --zeroshot-data"),
    (["--zeroshot-data", "zs.tar"], "--zeroshot-data with WebDataset shards needs --zeroshot-classnames"),
])
def test_bad_combinations_fail_with_one_line_naming_the_flags(flags, message, capsys):
    assert main(BASE + flags) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_several_problems_are_reported_together():
    with pytest.raises(ArgsError) as err:
        parse_args(BASE + ["--lock-text-unlocked-layers", "2", "--epochs-cooldown", "1"])
    assert str(err.value).count("\n  ") == 2


def test_synthetic_and_type_inference_errors():
    with pytest.raises(ArgsError, match="--dataset-type synthetic needs --train-num-samples"):
        parse_args(["--model", "m", "--dataset-type", "synthetic"])
    with pytest.raises(ArgsError, match="cannot tell the dataset type from the extension"):
        parse_args(["--model", "m", "--train-data", "data.parquet"])
    with pytest.raises(ArgsError, match="nothing to do"):
        parse_args(["--model", "m"])


def test_bad_values_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(BASE + ["--batch-size", "0"])
    assert exit_.value.code == 2 and "--batch-size: must be > 0, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--train-data", "x.tar"])
    assert "the following arguments are required: --model" in capsys.readouterr().err


def test_help_is_grouped_and_imports_no_torch():
    code = ("import sys; from clipkit.train.args import build_parser; h = build_parser().format_help(); "
            "print('torch' in sys.modules); print(h)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, _, text = out.partition("\n")
    assert first == "False"
    for group in ("data:", "model:", "optimization:", "precision and compilation:", "logging:",
                  "checkpoints and resume:", "evaluation:"):
        assert f"\n{group}\n" in text, group
    assert "--torchscript" not in text  # unsupported flags are accepted but not advertised


def test_python_m_clipkit_train_help():
    out = subprocess.run([sys.executable, "-m", "clipkit.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: clipkit-train")


def test_precision_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision_setup("amp", cpu) == (torch.bfloat16, False, None)  # the CPU's fast low precision
    assert precision_setup("amp", cuda) == (torch.float16, True, None)
    assert precision_setup("amp_bf16", cuda) == (torch.bfloat16, False, None)
    assert precision_setup("pure_fp16", cpu) == (None, False, torch.float16)
    assert precision_setup("fp32", cpu) == (None, False, None)


def test_no_flag_is_taken_by_torchrun():
    """torchrun parses every option-like argument, even after the script: a flag of ours that is a
    prefix of one of its flags is refused as ambiguous (``--logs`` vs ``--logs-specs``)."""
    from torch.distributed.run import get_args_parser

    theirs = [o for a in get_args_parser()._actions for o in a.option_strings]
    clashes = {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"
               and any(t.startswith(o) for t in theirs)}
    assert clashes == {"--logs"}  # OpenCLIP's name, kept; --logs-dir is its torchrun-safe spelling
    assert parse_args(BASE + ["--logs-dir", "/tmp/x"]).logging.logs == "/tmp/x"
