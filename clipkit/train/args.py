"""``clipkit-train`` flags: OpenCLIP 3.3.0's trainer flags with their meanings and defaults, plus clipkit's.

The flags are declared once, as typed settings (:mod:`clipkit.train.settings`); this module makes the
parser from them, reads ``--config``, and checks combinations. Parsing imports nothing heavy, so
``--help`` and flag errors are instant. Every check that can fail without touching data or building a
model runs in :func:`validate`, before any work starts.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
import typing
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ..errors import ArgsError
from . import data_sources
from .report import selected_reporters
from .selection import apply_objective_flags, objective_choice, objective_flags, objective_name
from .settings import GROUPS, SETTINGS_FILE, Settings, flag_names, read_settings_file

# flags of OpenCLIP's trainer for features clipkit does not have: accepted by the parser so that
# the error is one line naming the feature instead of argparse's "unrecognized arguments"
UNSUPPORTED = {
    "torchscript": "TorchScript is not supported by clipkit; use --torchcompile",
    "trace": "TorchScript tracing (--trace) is not supported by clipkit",
    "horovod": "Horovod is not supported by clipkit; launch with torchrun (see docs/training.md)",
    "use_bnb_linear": "bitsandbytes linear layers (--use-bnb-linear) are not supported by clipkit yet",
}


class _KeyValues(argparse.Action):
    """``--aug-cfg scale='(0.9,1.0)' color_jitter=0.4``: values are Python literals when they parse as one."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
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


def _bounded(kind: Callable[[str], Any], meta: Mapping[str, Any]) -> Callable[[str], Any]:
    """argparse's ``type``: convert, then check the declared bounds (argparse reports the message)."""
    from .._typed import _bounds_problem

    def parse(text: str) -> Any:
        value = kind(text)
        bad = _bounds_problem(value, meta)
        if bad:
            raise argparse.ArgumentTypeError(bad)
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def _add(group: argparse._ActionsContainer, f: dataclasses.Field[Any], hint: Any) -> None:
    """One declared setting as a flag."""
    meta = f.metadata
    kwargs: Dict[str, Any] = {"dest": f.name, "help": argparse.SUPPRESS if meta["hidden"] else meta["doc"]}
    if meta["required"]:
        kwargs["required"] = True
    if meta["metavar"] is not None:
        kwargs["metavar"] = meta["metavar"]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]: X
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        kwargs["action"] = "store_true"
    elif origin is dict:
        kwargs.update(nargs="*", action=_KeyValues, default={})
    else:
        if origin is list:
            kwargs["nargs"] = "+"
            hint = args[0]
        if hint in (int, float):
            kwargs["type"] = _bounded(hint, meta) if any(meta[k] is not None for k in ("gt", "ge", "le")) else hint
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        kwargs["default"] = f.default
    group.add_argument(*flag_names(f), **kwargs)


def add_setting_arguments(parser: argparse._ActionsContainer, cls: type, names: Sequence[str]) -> None:
    """Add the fields ``names`` of the settings group ``cls`` to ``parser`` as clipkit-train's flags: the same
    names, types, defaults, bounds and ``--help`` texts, for another command that takes them with the same
    meaning (``clipkit trainable``'s lock flags)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        _add(parser, fields[name], hints[name])


def build_parser() -> argparse.ArgumentParser:
    """The ``clipkit-train`` parser, made from the declarations in :mod:`clipkit.train.settings`."""
    p = argparse.ArgumentParser(
        prog="clipkit-train",
        description="Train a CLIP-style model. The flags are OpenCLIP's (python -m open_clip_train.main), "
                    "so its recipes run unchanged; see docs/training.md.",
        epilog="example:\n  clipkit-train --model ViT-B-32 --train-data 'shards/{00000..00099}.tar' "
               "--dataset-type webdataset \\\n      --batch-size 256 --epochs 10 --lr 5e-4 --warmup 2000 "
               "--precision amp --workers 6 --name my-run --report-to tensorboard\n"
               "  clipkit-train --config logs/my-run/settings.json --name my-run-again   (repeat a run)\n"
               "  torchrun --nproc-per-node 8 -m clipkit.train ...   (the same, distributed)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help=f"read settings from a JSON file (every run writes its own as RUN/{SETTINGS_FILE}); "
                        f"flags given here win")
    for _attr, cls, title in GROUPS:
        group = p.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add(group, f, hints[f.name])
    flags = objective_flags()
    if flags:
        group = p.add_argument_group("options of installed objectives (giving one selects its objective)")
        for flag in flags:
            kwargs: Dict[str, Any] = {"dest": flag.dest, "default": None, "help": f"{flag.doc} (objective {flag.objective})"}
            if flag.kind is bool:
                kwargs["action"] = "store_true"
            else:
                kwargs["type"] = flag.kind
            group.add_argument(flag.flag, **kwargs)
    for action in p._actions:
        if action.dest == "dataset_type":  # its choices are the registered data sources (validate() checks)
            action.metavar = "{" + ",".join(data_sources.choices()) + "}"
    return p


def default_name(args: argparse.Namespace) -> str:
    from datetime import datetime

    model = os.path.basename(args.model).replace(".json", "").replace("/", "-")
    stamp = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    return f"{stamp}-model_{model}-lr_{args.lr}-b_{args.batch_size}-j_{args.workers}-p_{args.precision}"


def _sources(spec: Optional[str]) -> List[str]:
    return [s for s in spec.split("::")] if spec else []


def infer_dataset_type(spec: str, flag: str) -> str:
    """The registered data source a data spec selects, as OpenCLIP's 'auto' (``.csv``/``.tsv`` -> csv,
    ``.tar`` -> webdataset): by the prefixes, extensions and folders the registrations declare."""
    return data_sources.resolve(spec, data_sources.AUTO, flag).name


def validate(args: argparse.Namespace) -> Settings:
    """Fill OpenCLIP's computed defaults and reject what cannot work, naming the flags involved."""
    given = vars(args)
    for dest, message in UNSUPPORTED.items():
        if given[dest] not in (None, False):
            raise ArgsError(message)
    apply_objective_flags(args)
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

    source = None  # the registered data source of the training data
    if args.dataset_type != data_sources.AUTO:
        try:
            source = data_sources.resolve(None, args.dataset_type, "--dataset-type")
        except ArgsError as exc:
            problems.append(str(exc))
    if source is not None and data_sources.generated(source):
        need(not args.train_data, f"--dataset-type {source.name} makes its own data; drop --train-data")
        need(args.train_num_samples is not None, f"--dataset-type {source.name} needs --train-num-samples")
    elif args.train_data:
        if args.dataset_type == data_sources.AUTO:
            try:
                source = data_sources.resolve(args.train_data, data_sources.AUTO, "--train-data")
                args.dataset_type = source.name
            except ArgsError as exc:
                message = str(exc)
                entry = data_sources.lookup(args.train_data.lower())
                if entry is not None and data_sources.generated(entry):  # a guess at the generated data's flag
                    message = (f"--train-data {args.train_data}: no such data; generated data is --dataset-type "
                               f"{entry.name} --train-num-samples N, without --train-data")
                problems.append(message)
        if source is not None and "text" not in data_sources.yields(source):
            problems.append(f"--train-data {args.train_data!r} is read by data source {source.name!r}, whose samples "
                            f"have class labels, not captions; training needs image-caption pairs (WebDataset "
                            f"shards, a CSV file, or another registered data source)")
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
        if given[flag] and not args.zeroshot_data:
            problems.append(f"--{flag.replace('_', '-')} needs --zeroshot-data")

    need(args.lock_image or (args.lock_image_unlocked_groups == 0 and not args.lock_image_freeze_bn_stats),
         "--lock-image-unlocked-groups/--lock-image-freeze-bn-stats need --lock-image")
    need(args.lock_text or (args.lock_text_unlocked_layers == 0 and not args.lock_text_freeze_layer_norm),
         "--lock-text-unlocked-layers/--lock-text-freeze-layer-norm need --lock-text")
    need(args.lock_image_unlocked_groups >= 0 and args.lock_text_unlocked_layers >= 0,
         "--lock-image-unlocked-groups and --lock-text-unlocked-layers must be >= 0")
    need(not args.lock_image_eval_preprocess or args.lock_image and args.lock_image_unlocked_groups == 0,
         "--lock-image-eval-preprocess needs a wholly locked image tower (--lock-image, no unlocked groups)")
    need(not args.lock_train_mode or args.lock_image or args.lock_text, "--lock-train-mode needs --lock-image or "
                                                                        "--lock-text")

    if args.lr_scheduler == "const-cooldown":
        need(args.epochs_cooldown is not None, "--lr-scheduler const-cooldown needs --epochs-cooldown")
    if args.epochs_cooldown is not None:
        need(args.lr_scheduler == "const-cooldown", "--epochs-cooldown needs --lr-scheduler const-cooldown")
        need(0 <= args.epochs_cooldown <= args.epochs,
             f"--epochs-cooldown must be between 0 and --epochs ({args.epochs}), got {args.epochs_cooldown}")
    need(args.momentum is None or args.opt.startswith("timm/"),
         "--momentum is for timm optimizers (--opt timm/NAME); AdamW has none")
    need(args.opt == "adamw" or args.opt.startswith("timm/"), f"--opt must be 'adamw' or 'timm/NAME', got {args.opt!r}")
    objective = objective_name(args.objective, args.siglip, args.distill_model)
    need(args.loss_dist_impl is None or objective == "siglip", "--loss-dist-impl is for the SigLIP loss; add --siglip")
    need((args.distill_model is None) == (args.distill_pretrained is None),
         "--distill-model and --distill-pretrained go together: the teacher and its weights")
    need(objective != "distill" or args.distill_model is not None or "model" in args.objective_opt,
         "--objective distill needs a teacher: --distill-model and --distill-pretrained")
    need(args.save_frequency >= 0, f"--save-frequency must be >= 0, got {args.save_frequency}")
    need(args.zeroshot_frequency >= 0 and args.val_frequency >= 0,
         "--zeroshot-frequency and --val-frequency must be >= 0")

    if args.logs is not None and args.logs.lower() == "none":
        args.logs = None
        need(args.resume != "latest", "--resume latest needs a run folder; --logs is 'none'")
    try:
        args.report_to = selected_reporters(args.report_to, has_folder=args.logs is not None)
    except ArgsError as exc:
        problems.append(str(exc))
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
    settings = Settings.from_flat(given)
    objective_choice(settings.model, settings.optimization).bound()  # an unknown name or bad option: one line now
    return settings


def parse_args(argv: Optional[Sequence[str]] = None) -> Settings:
    """The run's settings from the command line and its ``--config`` file (flags given on the command line
    win); a bad flag is reported by argparse (exit 2), a bad combination or file by :class:`ArgsError`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config")
    path = config.parse_known_args(argv)[0].config
    if path:
        from_file = read_settings_file(path)
        parser.set_defaults(**from_file)
        if from_file.get("model"):
            for action in parser._actions:
                if action.dest == "model":
                    action.required = False
    args = parser.parse_args(argv)
    del args.config
    return validate(args)
