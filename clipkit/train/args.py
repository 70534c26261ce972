"""``clipkit-train`` flags: OpenCLIP 3.3.0's trainer flags with their meanings and defaults, plus clipkit's.

Parsing imports nothing heavy, so ``--help`` and flag errors are instant. Every check that can fail
without touching data or building a model runs in :func:`validate`, before any work starts.
"""
from __future__ import annotations

import argparse
import ast
import os
from typing import Any, Dict, List, Optional, Sequence

from ..errors import ClipkitError

PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")
# flags of OpenCLIP's trainer for features clipkit does not have: accepted by the parser so that
# the error is one line naming the feature instead of argparse's "unrecognized arguments"
UNSUPPORTED = {
    "torchscript": "TorchScript is not supported by clipkit; use --torchcompile",
    "trace": "TorchScript tracing (--trace) is not supported by clipkit",
    "horovod": "Horovod is not supported by clipkit; launch with torchrun (see docs/training.md)",
    "distill_model": "distillation (--distill-model) is not supported by clipkit yet",
    "distill_pretrained": "distillation (--distill-pretrained) is not supported by clipkit yet",
    "use_bnb_linear": "bitsandbytes linear layers (--use-bnb-linear) are not supported by clipkit yet",
    "coca_caption_loss_weight": "CoCa models are not supported by clipkit, so --coca-caption-loss-weight has no meaning",
    "coca_contrastive_loss_weight": "CoCa models are not supported by clipkit, so --coca-contrastive-loss-weight has no meaning",
}
REPORT_TARGETS = ("tensorboard", "wandb")


class ArgsError(ClipkitError):
    """A flag, or a combination of flags, that cannot work."""


class _KeyValues(argparse.Action):
    """``--aug-cfg scale='(0.9,1.0)' color_jitter=0.4``: values are Python literals when they parse as one."""

    def __call__(self, parser, namespace, values, option_string=None):
        out: Dict[str, Any] = {}
        for item in values:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string}: expected key=value, got {item!r}")
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                out[key] = raw
        setattr(namespace, self.dest, out)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipkit-train",
        description="Train a CLIP-style model. The flags are OpenCLIP's (python -m open_clip_train.main), "
                    "so its recipes run unchanged; see docs/training.md.",
        epilog="example:\n  clipkit-train --model ViT-B-32 --train-data 'shards/{00000..00099}.tar' "
               "--dataset-type webdataset \\\n      --batch-size 256 --epochs 10 --lr 5e-4 --warmup 2000 "
               "--precision amp --workers 6 --name my-run --report-to tensorboard\n"
               "  torchrun --nproc-per-node 8 -m clipkit.train ...   (the same, distributed)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pos_int, pos_float = _positive(int), _positive(float)

    g = p.add_argument_group("data")
    g.add_argument("--train-data", help="training data: WebDataset shards (brace patterns, 'pipe:' commands, "
                                        "several sources joined by '::'), a .csv/.tsv file, or nothing for synthetic")
    g.add_argument("--train-data-upsampling-factors",
                   help="per-source sampling weights joined by '::' (e.g. '1::2'); needs --dataset-resampled")
    g.add_argument("--val-data", help="validation data (same formats) for retrieval metrics and clip_val_loss")
    g.add_argument("--train-num-samples", type=pos_int,
                   help="samples per epoch; read from sizes.json/__len__ or counted from the shards when not given")
    g.add_argument("--val-num-samples", type=pos_int, help="evaluate on about this many validation samples (whole batches)")
    g.add_argument("--dataset-type", choices=("webdataset", "csv", "synthetic", "auto"), default="auto",
                   help="'auto' picks csv for .csv/.tsv and webdataset for .tar and 'pipe:' (default: auto)")
    g.add_argument("--dataset-resampled", action="store_true",
                   help="draw shards with replacement, forever (epochs are --train-num-samples long)")
    g.add_argument("--csv-separator", default="\t", help="CSV column separator (default: a tab)")
    g.add_argument("--csv-img-key", default="filepath", help="CSV column holding image paths (default: filepath)")
    g.add_argument("--csv-caption-key", default="title", help="CSV column holding captions (default: title)")
    g.add_argument("--imagenet-val", help="ImageNet validation folder (one sub-folder per class) for zero-shot top-1/5")
    g.add_argument("--imagenet-v2", help="ImageNet-V2 folder (one sub-folder per class) for zero-shot top-1/5")
    g.add_argument("--zeroshot-data", help="zero-shot evaluation data: WebDataset shards with a 'cls' member, "
                                           "or a folder with one sub-folder of images per class")
    g.add_argument("--zeroshot-classnames", help="class names, in label order: a JSON list or one name per line")
    g.add_argument("--zeroshot-templates", help="prompt templates with '{}' (or '{c}') for the class name: "
                                                "a JSON list or one per line")
    g.add_argument("--max-bad-sample-fraction", type=_fraction, default=0.5,
                   help="abort when more than this fraction of an epoch's samples is unreadable (default: 0.5)")
    g.add_argument("--max-image-pixels", type=pos_int,
                   help="skip (count too_large) images with more pixels, read from the header before decoding "
                        "(default: the larger of 32 million and (8 x the model's input side)^2)")
    g.add_argument("--workers", type=int, default=4, help="data loader processes per GPU (default: 4)")
    g.add_argument("--batch-size", type=pos_int, default=64, help="batch size per GPU (default: 64)")
    g.add_argument("--cache-dir", help="where pretrained weights and tokenizers are cached")

    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="model config: a name from `clipkit models`, 'hf-hub:org/repo', 'local-dir:PATH' or a .json file")
    g.add_argument("--pretrained", default="", help="pretrained tag of the model or a checkpoint file/folder")
    g.add_argument("--pretrained-image", action="store_true", help="load the image tower's own pretrained weights (timm)")
    g.add_argument("--hf-tokenizer-name", help="HuggingFace tokenizer (name or folder) to use instead of the config's")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="let HuggingFace repositories named by the model run their own Python (a config cannot)")
    g.add_argument("--lock-image", action="store_true", help="freeze the image tower (LiT)")
    g.add_argument("--lock-image-unlocked-groups", type=int, default=0,
                   help="with --lock-image, leave the last N layer groups trainable")
    g.add_argument("--lock-image-freeze-bn-stats", action="store_true",
                   help="with --lock-image, keep locked BatchNorm statistics fixed")
    g.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    g.add_argument("--lock-text-unlocked-layers", type=int, default=0,
                   help="with --lock-text, leave the last N layer groups trainable")
    g.add_argument("--lock-text-freeze-layer-norm", action="store_true",
                   help="with --lock-text, freeze LayerNorm parameters in locked layers too")
    g.add_argument("--image-mean", type=float, nargs="+", help="override the normalisation mean")
    g.add_argument("--image-std", type=float, nargs="+", help="override the normalisation std")
    g.add_argument("--image-interpolation", choices=("bicubic", "bilinear", "random"), help="resize interpolation")
    g.add_argument("--image-resize-mode", choices=("shortest", "longest", "squash"), help="how images are resized")
    g.add_argument("--aug-cfg", nargs="*", action=_KeyValues, default={},
                   help="training augmentation as key=value pairs, e.g. scale='(0.9,1.0)' color_jitter=0.4")
    g.add_argument("--force-context-length", type=pos_int, help="override text_cfg.context_length")
    g.add_argument("--force-image-size", type=pos_int, nargs="+", help="override vision_cfg.image_size")
    g.add_argument("--force-quick-gelu", action="store_true", help="use QuickGELU (OpenAI's weights need it)")
    g.add_argument("--force-patch-dropout", type=float, help="override vision_cfg.patch_dropout")
    g.add_argument("--force-custom-text", action="store_true", help="build the text tower under 'text.' (OpenCLIP's CustomTextCLIP key layout)")
    g.add_argument("--siglip", action="store_true",
                   help="SigLIP: sigmoid loss, logit scale initialised to ln 10 and a logit bias of -10")
    g.add_argument("--distill-model", help=argparse.SUPPRESS)
    g.add_argument("--distill-pretrained", help=argparse.SUPPRESS)
    g.add_argument("--use-bnb-linear", help=argparse.SUPPRESS)
    g.add_argument("--coca-caption-loss-weight", type=float, help=argparse.SUPPRESS)
    g.add_argument("--coca-contrastive-loss-weight", type=float, help=argparse.SUPPRESS)

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=pos_int, default=32, help="epochs to train (default: 32)")
    g.add_argument("--epochs-cooldown", type=int,
                   help="with --lr-scheduler const-cooldown: the last N epochs decay the learning rate")
    g.add_argument("--lr", type=pos_float, help="learning rate (default: 5e-4)")
    g.add_argument("--beta1", type=float, help="Adam beta1 (default: 0.9)")
    g.add_argument("--beta2", type=float, help="Adam beta2 (default: 0.98 for ViT models, else 0.999)")
    g.add_argument("--eps", type=float, help="Adam epsilon (default: 1e-6 for ViT models, else 1e-8)")
    g.add_argument("--wd", type=float, default=0.2, help="weight decay (default: 0.2)")
    g.add_argument("--momentum", type=float, help="momentum, for timm optimizers that take it")
    g.add_argument("--warmup", type=int, default=10000, help="linear warmup steps (default: 10000)")
    g.add_argument("--opt", default="adamw", help="'adamw' or 'timm/NAME' for a timm optimizer (default: adamw)")
    g.add_argument("--use-bn-sync", action="store_true", help="synchronise BatchNorm statistics across processes")
    g.add_argument("--skip-scheduler", action="store_true", help="keep the learning rate constant at --lr")
    g.add_argument("--lr-scheduler", choices=("cosine", "const", "const-cooldown"), default="cosine",
                   help="learning-rate schedule after warmup (default: cosine)")
    g.add_argument("--lr-cooldown-end", type=float, default=0.0, help="learning rate at the end of the cooldown")
    g.add_argument("--lr-cooldown-power", type=float, default=1.0, help="cooldown shape: 1 is linear")
    g.add_argument("--accum-freq", type=pos_int, default=1,
                   help="gradient accumulation: one optimizer step per N batches, with the contrastive loss "
                        "over all N batches (default: 1)")
    g.add_argument("--grad-clip-norm", type=pos_float, help="clip the gradient norm to this value")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    g.add_argument("--local-loss", action="store_true",
                   help="distributed: each process computes the loss of its own features against all")
    g.add_argument("--gather-with-grad", action="store_true", help="distributed: gather features with gradients")
    g.add_argument("--loss-dist-impl", choices=("bidir", "shift", "reduce", "gather"),
                   help="distributed SigLIP loss exchange (default: bidir)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    g = p.add_argument_group("precision and compilation")
    g.add_argument("--precision", choices=PRECISIONS, default="amp",
                   help="amp: fp16 autocast with loss scaling on GPU, bf16 autocast on CPU (default: amp)")
    g.add_argument("--torchcompile", action="store_true", help="torch.compile the model")
    g.add_argument("--torchcompile-backend", default="inductor",
                   help="torch.compile backend (default: inductor; 'aot_eager' compiles fast)")
    g.add_argument("--torchscript", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)

    g = p.add_argument_group("distributed (see docs/training.md)")
    g.add_argument("--device", default="cuda", help="device; falls back to CPU with a warning (default: cuda)")
    g.add_argument("--dist-url", help="process-group init URL (default: env://, as set by torchrun)")
    g.add_argument("--dist-backend", help="process-group backend (default: nccl on CUDA, gloo on CPU)")
    g.add_argument("--ddp-static-graph", action="store_true", help="DistributedDataParallel(static_graph=True)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimizer state across processes with FSDP2 (fully_shard per "
                        "layer group of each tower) instead of DDP; checkpoints become Distributed Checkpoint folders "
                        "(python -m clipkit.train.consolidate DIR OUT.pt makes one file of them)")
    g.add_argument("--no-set-device-rank", action="store_true", help="do not pick the GPU by local rank")
    g.add_argument("--horovod", action="store_true", help=argparse.SUPPRESS)

    g = p.add_argument_group("logging")
    # torchrun's parser takes '--logs' for an abbreviation of its own '--logs-specs' and refuses it, even
    # after the script name: under torchrun write '--logs-dir'
    g.add_argument("--logs", "--logs-dir", dest="logs", default="./logs/",
                   help="where run folders go; 'none' saves nothing (default: ./logs/). Under torchrun use "
                        "--logs-dir: torchrun mistakes --logs for its --logs-specs")
    g.add_argument("--log-local", action="store_true", help="one log file per process (out-RANK.log)")
    g.add_argument("--name", help="run name (default: date, model, lr, batch size, workers and precision)")
    g.add_argument("--report-to", default="", help="'tensorboard', 'wandb', both comma-separated, or 'all'")
    g.add_argument("--wandb-notes", default="", help="notes for the wandb run")
    g.add_argument("--wandb-project-name", default="open-clip", help="wandb project (default: open-clip)")
    g.add_argument("--debug", action="store_true", help="debug logging")
    g.add_argument("--log-every-n-steps", type=pos_int, default=100, help="log every N steps (default: 100)")
    g.add_argument("--copy-codebase", action="store_true", help="copy the installed clipkit package into the run folder")

    g = p.add_argument_group("checkpoints and resume")
    g.add_argument("--save-frequency", type=int, default=1, help="save epoch_N.pt every N epochs; 0 never (default: 1)")
    g.add_argument("--save-most-recent", action="store_true",
                   help="accepted for OpenCLIP compatibility: clipkit always keeps epoch_latest.pt")
    g.add_argument("--save-every-n-steps", type=pos_int,
                   help="also save epoch_latest.pt every N steps, mid-epoch (exact resume from there)")
    g.add_argument("--resume", help="checkpoint file to resume from, or 'latest' for this run's newest complete one")
    g.add_argument("--delete-previous-checkpoint", action="store_true",
                   help="delete epoch_{N-1}.pt once epoch_N.pt is complete")
    g.add_argument("--remote-sync", help="copy complete checkpoints to this fsspec URL (e.g. s3://bucket/runs)")
    g.add_argument("--remote-sync-frequency", type=pos_int, default=300, help="seconds between remote syncs (default: 300)")
    g.add_argument("--remote-sync-protocol", choices=("s3", "fsspec"), default="s3", help="remote sync protocol")

    g = p.add_argument_group("evaluation")
    g.add_argument("--zeroshot-frequency", type=int, default=2, help="zero-shot evaluation every N epochs (default: 2)")
    g.add_argument("--val-frequency", type=int, default=1, help="validation every N epochs (default: 1)")
    return p


def default_name(args: argparse.Namespace) -> str:
    from datetime import datetime

    model = os.path.basename(args.model).replace(".json", "").replace("/", "-")
    stamp = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    return f"{stamp}-model_{model}-lr_{args.lr}-b_{args.batch_size}-j_{args.workers}-p_{args.precision}"


def _sources(spec: Optional[str]) -> List[str]:
    return [s for s in spec.split("::")] if spec else []


def infer_dataset_type(spec: str, flag: str) -> str:
    """'csv' or 'webdataset' from a data spec's extension, as OpenCLIP's 'auto'."""
    first = _sources(spec)[0]
    if first.startswith("pipe:"):
        return "webdataset"
    ext = first.split("?")[0].rsplit(".", 1)[-1].lower().rstrip("}")
    if ext in ("csv", "tsv"):
        return "csv"
    if ext == "tar" or "tar" in ext:
        return "webdataset"
    if os.path.isdir(first):
        return "folder"
    raise ArgsError(f"{flag} {spec!r}: cannot tell the dataset type from the extension; "
                    f"pass --dataset-type webdataset or csv")


def validate(args: argparse.Namespace) -> argparse.Namespace:
    """Fill OpenCLIP's computed defaults and reject what cannot work, naming the flags involved."""
    for dest, message in UNSUPPORTED.items():
        if getattr(args, dest) not in (None, False):
            raise ArgsError(message)
    problems = []

    def need(cond: bool, message: str) -> None:
        if not cond:
            problems.append(message)

    vit = "vit" in args.model.lower()
    args.lr = 5e-4 if args.lr is None else args.lr
    args.beta1 = 0.9 if args.beta1 is None else args.beta1
    args.beta2 = (0.98 if vit else 0.999) if args.beta2 is None else args.beta2
    args.eps = (1e-6 if vit else 1e-8) if args.eps is None else args.eps
    need(args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    need(args.warmup >= 0, f"--warmup must be >= 0, got {args.warmup}")
    need(args.wd >= 0, f"--wd must be >= 0, got {args.wd}")

    if args.dataset_type == "synthetic":
        need(not args.train_data, "--dataset-type synthetic makes its own data; drop --train-data")
        need(args.train_num_samples is not None, "--dataset-type synthetic needs --train-num-samples")
    elif args.train_data:
        if args.dataset_type == "auto":
            try:
                args.dataset_type = infer_dataset_type(args.train_data, "--train-data")
            except ArgsError as exc:
                if args.train_data.lower() == "synthetic":  # a guess at the generated data's flag
                    exc = ArgsError("--train-data synthetic: no such data; generated data is --dataset-type "
                                    "synthetic --train-num-samples N, without --train-data")
                problems.append(str(exc))
            if args.dataset_type == "folder":
                problems.append(f"--train-data {args.train_data!r} is a folder; training needs WebDataset shards "
                                f"or a CSV file")
    elif not (args.val_data or args.zeroshot_data or args.imagenet_val or args.imagenet_v2):
        problems.append("nothing to do: give --train-data (or --dataset-type synthetic), or evaluation data "
                        "(--val-data, --zeroshot-data, --imagenet-val)")
    if args.dataset_resampled:
        need(args.dataset_type == "webdataset", "--dataset-resampled needs WebDataset --train-data "
                                                f"(got --dataset-type {args.dataset_type})")
        need(args.train_num_samples is not None, "--dataset-resampled needs --train-num-samples (an epoch's "
                                                 "length): the shards are drawn forever")
    if args.train_data_upsampling_factors:
        need(args.dataset_resampled, "--train-data-upsampling-factors needs --dataset-resampled")
        factors = _sources(args.train_data_upsampling_factors)
        try:
            weights = [float(f) for f in factors]
            need(all(w >= 0 for w in weights) and any(w > 0 for w in weights),
                 "--train-data-upsampling-factors must be non-negative with at least one > 0")
        except ValueError:
            problems.append(f"--train-data-upsampling-factors {args.train_data_upsampling_factors!r}: "
                            f"expected numbers joined by '::'")
        need(len(factors) == len(_sources(args.train_data)),
             f"--train-data-upsampling-factors has {len(factors)} values but --train-data has "
             f"{len(_sources(args.train_data))} sources")
    if args.zeroshot_data:
        need(args.zeroshot_classnames is not None or os.path.isdir(args.zeroshot_data),
             "--zeroshot-data with WebDataset shards needs --zeroshot-classnames")
    for flag in ("zeroshot_classnames", "zeroshot_templates"):
        if getattr(args, flag) and not args.zeroshot_data:
            problems.append(f"--{flag.replace('_', '-')} needs --zeroshot-data")

    need(args.lock_image or (args.lock_image_unlocked_groups == 0 and not args.lock_image_freeze_bn_stats),
         "--lock-image-unlocked-groups/--lock-image-freeze-bn-stats need --lock-image")
    need(args.lock_text or (args.lock_text_unlocked_layers == 0 and not args.lock_text_freeze_layer_norm),
         "--lock-text-unlocked-layers/--lock-text-freeze-layer-norm need --lock-text")
    need(args.lock_image_unlocked_groups >= 0 and args.lock_text_unlocked_layers >= 0,
         "--lock-image-unlocked-groups and --lock-text-unlocked-layers must be >= 0")

    if args.lr_scheduler == "const-cooldown":
        need(args.epochs_cooldown is not None, "--lr-scheduler const-cooldown needs --epochs-cooldown")
    if args.epochs_cooldown is not None:
        need(args.lr_scheduler == "const-cooldown", "--epochs-cooldown needs --lr-scheduler const-cooldown")
        need(0 <= args.epochs_cooldown <= args.epochs,
             f"--epochs-cooldown must be between 0 and --epochs ({args.epochs}), got {args.epochs_cooldown}")
    need(args.momentum is None or args.opt.startswith("timm/"),
         "--momentum is for timm optimizers (--opt timm/NAME); AdamW has none")
    need(args.opt == "adamw" or args.opt.startswith("timm/"), f"--opt must be 'adamw' or 'timm/NAME', got {args.opt!r}")
    need(args.loss_dist_impl is None or args.siglip, "--loss-dist-impl is for the SigLIP loss; add --siglip")
    need(args.save_frequency >= 0, f"--save-frequency must be >= 0, got {args.save_frequency}")
    need(args.zeroshot_frequency >= 0 and args.val_frequency >= 0,
         "--zeroshot-frequency and --val-frequency must be >= 0")

    targets = [t.strip() for t in args.report_to.split(",") if t.strip()]
    if targets == ["all"]:
        targets = list(REPORT_TARGETS)
    for target in targets:
        need(target in REPORT_TARGETS, f"--report-to {target!r}: expected tensorboard, wandb or all")
    if "wandb" in targets:
        import importlib.util

        need(importlib.util.find_spec("wandb") is not None, "--report-to wandb needs the wandb package: pip install wandb")
    args.report_to = ",".join(t for t in targets if t in REPORT_TARGETS)
    if args.logs.lower() == "none":
        args.logs = None
        need("tensorboard" not in targets, "--report-to tensorboard needs a run folder; --logs is 'none'")
        need(args.resume != "latest", "--resume latest needs a run folder; --logs is 'none'")
    if args.resume == "latest":
        need(args.name is not None, "--resume latest needs --name: the default name is a new timestamp, so there "
                                    "would be nothing to resume")
    if args.remote_sync:
        need(args.logs is not None, "--remote-sync copies the run folder; --logs is 'none'")
        need(args.remote_sync_protocol != "s3" or args.remote_sync.startswith("s3://"),
             f"--remote-sync {args.remote_sync}: --remote-sync-protocol s3 (the default) needs an s3:// URL; "
             f"pass --remote-sync-protocol fsspec for other fsspec URLs")
    if problems:
        raise ArgsError("; ".join(problems) if len(problems) == 1 else
                        "invalid flags:\n  " + "\n  ".join(problems))
    if args.name is None:
        args.name = default_name(args)
    return args


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and validate; a bad flag is reported by argparse (exit 2), a bad combination by :class:`ArgsError`."""
    return validate(build_parser().parse_args(argv))
