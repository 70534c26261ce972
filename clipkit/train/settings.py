"""clipkit-train's settings: one typed dataclass per flag group, the single declaration of every flag.

Each field is a flag: its name (``--`` + the field name with dashes, unless ``names`` says otherwise),
type, default, bounds and ``--help`` text (``shown``: the default as the docs table words it). The parser
(:mod:`clipkit.train.args`), the settings file (``--config``, and ``settings.json`` in every run folder)
and the flag and default columns of docs/training.md's flags tables all come from these classes; the
tables' meaning column is prose written in the docs page itself, which the generator keeps (a new flag
starts with its ``--help`` text there). Each part of the trainer receives its own group.

No torch here: ``clipkit-train --help`` imports this module.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .._precision import PRECISIONS
from .._typed import _bounds_problem, _coerce, _type_name, json_repr, option
from ..errors import ArgsError, suggest

# the file every run writes into its folder: the resolved settings, which --config reads back
SETTINGS_FILE = "settings.json"


def flag(default: Any, help: str, *, names: Tuple[str, ...] = (), gt: Optional[float] = None,
         ge: Optional[float] = None, le: Optional[float] = None, choices: Optional[Tuple[Any, ...]] = None,
         hidden: bool = False, required: bool = False, shown: Optional[str] = None,
         metavar: Optional[str] = None) -> Any:
    """A settings field that is also a flag. ``default=dict`` means an empty dict; ``hidden``: accepted
    but left out of ``--help`` and the docs (OpenCLIP's flags for features clipkit does not have);
    ``metavar``: the value's placeholder in ``--help`` (default: argparse's, the name in capitals)."""
    extra = {"names": names, "hidden": hidden, "required": required, "shown": shown, "metavar": metavar}
    if default is dict:
        return option(doc=help, default_factory=dict, extra=extra)
    return option(default, help, gt=gt, ge=ge, le=le, choices=choices, extra=extra)


@dataclass
class DataSettings:
    """What to train and evaluate on, and how it is loaded."""

    train_data: Optional[str] = flag(None, "training data: WebDataset shards (brace patterns, 'pipe:' commands, "
        "several sources joined by '::'), a .csv/.tsv file, or nothing for synthetic")
    train_data_upsampling_factors: Optional[str] = flag(None, "per-source sampling weights joined by '::' (e.g. "
        "'1::2'); needs --dataset-resampled")
    val_data: Optional[str] = flag(None, 'validation data (same formats) for retrieval metrics and clip_val_loss')
    train_num_samples: Optional[int] = flag(None, 'samples per epoch; read from sizes.json/__len__ or counted from '
        'the shards when not given', gt=0)
    val_num_samples: Optional[int] = flag(None, 'evaluate on about this many validation samples (whole batches)', gt=0)
    dataset_type: str = flag('auto', "a registered data source (webdataset, csv, synthetic, or a plugin's), or "
        "'auto': each path's own, by extension (.csv/.tsv: csv; .tar and 'pipe:': webdataset) (default: auto)")
    dataset_resampled: bool = flag(False, 'draw shards with replacement, forever (epochs are --train-num-samples '
        'long)')
    csv_separator: str = flag('\t', 'CSV column separator (default: a tab)', shown='a tab')
    csv_img_key: str = flag('filepath', 'CSV column holding image paths (default: filepath)')
    csv_caption_key: str = flag('title', 'CSV column holding captions (default: title)')
    imagenet_val: Optional[str] = flag(None, 'ImageNet validation folder (one sub-folder per class) for zero-shot '
        'top-1/5')
    imagenet_v2: Optional[str] = flag(None, 'ImageNet-V2 folder (one sub-folder per class) for zero-shot top-1/5')
    zeroshot_data: Optional[str] = flag(None, "zero-shot evaluation data: WebDataset shards with a 'cls' member, "
        'or a folder with one sub-folder of images per class')
    zeroshot_classnames: Optional[str] = flag(None, 'class names, in label order: a JSON list or one name per line')
    zeroshot_templates: Optional[str] = flag(None, "prompt templates with '{}' (or '{c}') for the class name: a "
        'JSON list or one per line', shown='`a photo of a {}.`')
    max_bad_sample_fraction: float = flag(0.5, "abort when more than this fraction of an epoch's samples is "
        'unreadable (default: 0.5)', ge=0, le=1)
    max_image_pixels: Optional[int] = flag(None, 'skip (count too_large) images with more pixels, read from the '
        "header before decoding (default: the larger of 32 million and (8 x the model's input side)^2)",
        gt=0, shown="the larger of 32,000,000 and (8 × the model's input side)²")
    workers: int = flag(4, 'data loader processes per GPU (default: 4)')
    batch_size: int = flag(64, 'batch size per GPU (default: 64)', gt=0)
    cache_dir: Optional[str] = flag(None, 'where pretrained weights and tokenizers are cached')


@dataclass
class ModelSettings:
    """The model: its config, pretrained weights, tokenizer, locks and overrides."""

    model: Optional[str] = flag(None, "model config: a name from `clipkit models`, 'hf-hub:org/repo', "
        "'local-dir:PATH' or a .json file", required=True)
    pretrained: str = flag('', 'pretrained tag of the model or a checkpoint file/folder', shown='none')
    pretrained_image: bool = flag(False, "load the image tower's own pretrained weights (timm)")
    hf_tokenizer_name: Optional[str] = flag(None, 'HuggingFace tokenizer (name or folder) to use instead of the '
        "config's")
    trust_remote_code: bool = flag(False, 'let HuggingFace repositories named by the model run their own Python (a '
        'config cannot)')
    lock_image: bool = flag(False, 'freeze the image tower (LiT)')
    lock_image_unlocked_groups: int = flag(0, 'with --lock-image, leave the last N layer groups trainable', metavar='N')
    lock_image_freeze_bn_stats: bool = flag(False, 'with --lock-image, keep locked BatchNorm statistics fixed')
    lock_text: bool = flag(False, 'freeze the text tower')
    lock_text_unlocked_layers: int = flag(0, 'with --lock-text, leave the last N layer groups trainable', metavar='N')
    lock_text_freeze_layer_norm: bool = flag(False, 'with --lock-text, freeze LayerNorm parameters in locked '
        'layers too')
    lock_train_mode: bool = flag(False, 'leave the locked parts of locked towers in train mode (dropout on), as '
        'OpenCLIP does')
    lock_image_eval_preprocess: bool = flag(False, 'with a fully locked image tower, give training images the '
        'eval preprocessing (LiT), so its outputs can be cached')
    no_lock_cache: bool = flag(False, 'do not cache the outputs of locked towers (or locked prefixes)')
    lock_cache_bytes: int = flag(2 ** 31, 'memory for cached locked outputs, per process (default: 2 GiB)',
        ge=0, shown='2147483648 (2 GiB)')
    image_mean: Optional[List[float]] = flag(None, 'override the normalisation mean', shown="the model's")
    image_std: Optional[List[float]] = flag(None, 'override the normalisation std', shown="the model's")
    image_interpolation: Optional[str] = flag(None, 'resize interpolation',
        choices=('bicubic', 'bilinear', 'random'), shown="the model's")
    image_resize_mode: Optional[str] = flag(None, 'how images are resized',
        choices=('shortest', 'longest', 'squash'), shown="the model's")
    aug_cfg: Dict[str, Any] = flag(dict, "training augmentation as key=value pairs, e.g. scale='(0.9,1.0)' "
        'color_jitter=0.4')
    force_context_length: Optional[int] = flag(None, 'override text_cfg.context_length', gt=0)
    force_image_size: Optional[List[int]] = flag(None, 'override vision_cfg.image_size', gt=0)
    force_quick_gelu: bool = flag(False, "use QuickGELU (OpenAI's weights need it)")
    force_patch_dropout: Optional[float] = flag(None, 'override vision_cfg.patch_dropout')
    force_custom_text: bool = flag(False, "build the text tower under 'text.' (OpenCLIP's CustomTextCLIP key "
        'layout)')
    siglip: bool = flag(False, 'SigLIP: sigmoid loss, logit scale initialised to ln 10 and a logit bias of -10')
    distill_model: Optional[str] = flag(None, 'distil from this teacher model (a model name, as for --model); '
        'needs --distill-pretrained')
    distill_pretrained: Optional[str] = flag(None, "the teacher's weights: a pretrained tag or a file; needs "
        '--distill-model')
    use_bnb_linear: Optional[str] = flag(None, '',
        hidden=True)


@dataclass
class OptimizationSettings:
    """The optimizer, its schedule, the loss across processes and the seed."""

    epochs: int = flag(32, 'epochs to train (default: 32)', gt=0)
    epochs_cooldown: Optional[int] = flag(None, 'with --lr-scheduler const-cooldown: the last N epochs decay the '
        'learning rate')
    lr: Optional[float] = flag(None, 'learning rate (default: 5e-4)', gt=0, shown='5e-4')
    beta1: Optional[float] = flag(None, 'Adam beta1 (default: 0.9)', shown='0.9')
    beta2: Optional[float] = flag(None, 'Adam beta2 (default: 0.98 for ViT models, else 0.999)',
        shown='0.98 if `vit` is in the `--model` value (case-insensitive), else 0.999')
    eps: Optional[float] = flag(None, 'Adam epsilon (default: 1e-6 for ViT models, else 1e-8)',
        shown='1e-6 if `vit` is in the `--model` value, else 1e-8')
    wd: float = flag(0.2, 'weight decay (default: 0.2)')
    momentum: Optional[float] = flag(None, 'momentum, for timm optimizers that take it')
    warmup: int = flag(10000, 'linear warmup steps (default: 10000)')
    opt: str = flag('adamw', "'adamw' or 'timm/NAME' for a timm optimizer (default: adamw)")
    use_bn_sync: bool = flag(False, 'synchronise BatchNorm statistics across processes')
    skip_scheduler: bool = flag(False, 'keep the learning rate constant at --lr')
    lr_scheduler: str = flag('cosine', 'learning-rate schedule after warmup (default: cosine)',
        choices=('cosine', 'const', 'const-cooldown'))
    lr_cooldown_end: float = flag(0.0, 'learning rate at the end of the cooldown')
    lr_cooldown_power: float = flag(1.0, 'cooldown shape: 1 is linear')
    accum_freq: int = flag(1, 'gradient accumulation: one optimizer step per N batches, with the contrastive loss '
        'over all N batches (default: 1)', gt=0)
    grad_clip_norm: Optional[float] = flag(None, 'clip the gradient norm to this value', gt=0)
    grad_checkpointing: bool = flag(False, 'recompute activations in backward to save memory')
    local_loss: bool = flag(False, 'distributed: each process computes the loss of its own features against all')
    gather_with_grad: bool = flag(False, 'distributed: gather features with gradients')
    loss_dist_impl: Optional[str] = flag(None, 'distributed SigLIP loss exchange (default: bidir)',
        choices=('bidir', 'shift', 'reduce', 'gather'), shown='`bidir`')
    objective: Optional[str] = flag(None, "what a step minimises: a registered objective (clip, siglip, distill, "
        "or a plugin's; default: siglip with --siglip, distill with --distill-model, else clip)", shown='`clip`')
    objective_opt: Dict[str, Any] = flag(dict, "the objective's options as key=value pairs (values read as Python "
        "literals), e.g. --objective-opt weight=0.5")
    seed: int = flag(0, 'random seed (default: 0)')


@dataclass
class PrecisionSettings:
    """Number formats and torch.compile."""

    precision: str = flag('amp', 'amp: fp16 autocast with loss scaling on GPU, bf16 autocast on CPU (default: amp)',
        choices=PRECISIONS)
    torchcompile: bool = flag(False, 'torch.compile the model')
    torchcompile_backend: str = flag('inductor', "torch.compile backend (default: inductor; 'aot_eager' compiles "
        'fast)')
    torchscript: bool = flag(False, '',
        hidden=True)
    trace: bool = flag(False, '',
        hidden=True)


@dataclass
class DistributedSettings:
    """Devices and the process group."""

    device: str = flag('cuda', 'device; falls back to CPU with a warning (default: cuda)')
    dist_url: Optional[str] = flag(None, 'process-group init URL (default: env://, as set by torchrun)',
        shown='`env://`')
    dist_backend: Optional[str] = flag(None, 'process-group backend (default: nccl on CUDA, gloo on CPU)',
        shown='`nccl` on CUDA, else `gloo`')
    ddp_static_graph: bool = flag(False, 'DistributedDataParallel(static_graph=True)')
    fsdp: bool = flag(False, 'shard weights, gradients and optimizer state across processes with FSDP2 '
        '(fully_shard per layer group of each tower) instead of DDP; checkpoints become Distributed Checkpoint '
        'folders (python -m clipkit.train.consolidate DIR OUT.pt makes one file of them)')
    no_set_device_rank: bool = flag(False, 'do not pick the GPU by local rank')
    horovod: bool = flag(False, '',
        hidden=True)


@dataclass
class LoggingSettings:
    """Where the run folder goes and what it reports."""

    logs: Optional[str] = flag('./logs/', "where run folders go; 'none' saves nothing (default: ./logs/). Under "
        'torchrun use --logs-dir: torchrun mistakes --logs for its --logs-specs', names=('--logs', '--logs-dir'))
    log_local: bool = flag(False, 'one log file per process (out-RANK.log)')
    name: Optional[str] = flag(None, 'run name (default: date, model, lr, batch size, workers and precision)',
        shown='`{date}-model_{model}-lr_{lr}-b_{batch}-j_{workers}-p_{precision}`')
    report_to: str = flag('', "'tensorboard', 'wandb', both comma-separated, or 'all'", shown='none')
    wandb_notes: str = flag('', 'notes for the wandb run', shown='empty')
    wandb_project_name: str = flag('open-clip', 'wandb project (default: open-clip)')
    debug: bool = flag(False, 'debug logging')
    log_every_n_steps: int = flag(100, 'log every N steps (default: 100)', gt=0)
    data_wait_warn: float = flag(0.3, 'warn once when the step waits for data more than this fraction of the '
        'time for 3 log intervals in a row; 0: never (default: 0.3)', ge=0, le=1)
    copy_codebase: bool = flag(False, 'copy the installed clipkit package into the run folder')


@dataclass
class CheckpointSettings:
    """Training checkpoints, resuming, and the remote copy of the run."""

    save_frequency: int = flag(1, 'save epoch_N.pt every N epochs; 0 never (default: 1)')
    save_most_recent: bool = flag(False, 'accepted for OpenCLIP compatibility: clipkit always keeps epoch_latest.pt')
    save_every_n_steps: Optional[int] = flag(None, 'also save epoch_latest.pt every N steps, mid-epoch (exact '
        'resume from there)', gt=0)
    resume: Optional[str] = flag(None, "checkpoint file to resume from, or 'latest' for this run's newest complete "
        'one')
    delete_previous_checkpoint: bool = flag(False, 'delete epoch_{N-1}.pt once epoch_N.pt is complete')
    remote_sync: Optional[str] = flag(None, 'copy complete checkpoints to this fsspec URL (e.g. s3://bucket/runs)')
    remote_sync_frequency: int = flag(300, 'seconds between remote syncs (default: 300)', gt=0)
    remote_sync_protocol: str = flag('s3', 'remote sync protocol', choices=('s3', 'fsspec'))


@dataclass
class EvaluationSettings:
    """How often evaluation runs (its data is in the data group)."""

    zeroshot_frequency: int = flag(2, 'zero-shot evaluation every N epochs (default: 2)')
    val_frequency: int = flag(1, 'validation every N epochs (default: 1)')


# (attribute of Settings, its class, the --help group title); the order of --help and of the docs
GROUPS: Tuple[Tuple[str, type, str], ...] = (
    ("data", DataSettings, "data"),
    ("model", ModelSettings, "model"),
    ("optimization", OptimizationSettings, "optimization"),
    ("precision", PrecisionSettings, "precision and compilation"),
    ("distributed", DistributedSettings, "distributed (see docs/training.md)"),
    ("logging", LoggingSettings, "logging"),
    ("checkpoints", CheckpointSettings, "checkpoints and resume"),
    ("evaluation", EvaluationSettings, "evaluation"),
)


@dataclass
class Settings:
    """Every setting of a run, by group; built once, from the flags and the ``--config`` file."""

    data: DataSettings
    model: ModelSettings
    optimization: OptimizationSettings
    precision: PrecisionSettings
    distributed: DistributedSettings
    logging: LoggingSettings
    checkpoints: CheckpointSettings
    evaluation: EvaluationSettings

    @classmethod
    def from_flat(cls, values: Dict[str, Any]) -> "Settings":
        """From one flat mapping of flag names (argparse's destinations) to values."""
        return cls(**{attr: group(**{f.name: values[f.name] for f in dataclasses.fields(group)})
                      for attr, group, _ in GROUPS})

    def flat(self) -> Dict[str, Any]:
        """Every setting under its flag's name, as OpenCLIP's flat namespace (``params.txt``, wandb's config)."""
        out: Dict[str, Any] = {}
        for attr, _, _ in GROUPS:
            out.update(dataclasses.asdict(getattr(self, attr)))
        return out

    def to_json(self) -> Dict[str, Any]:
        """The settings file: one object per group, every setting in it; ``--config`` reads it back."""
        return {attr: dataclasses.asdict(getattr(self, attr)) for attr, _, _ in GROUPS}


def flag_names(f: dataclasses.Field[Any]) -> Tuple[str, ...]:
    """A field's flag spellings, the canonical one first."""
    return tuple(f.metadata["names"]) or ("--" + f.name.replace("_", "-"),)


def read_settings_file(path: str) -> Dict[str, Any]:
    """The flat settings a ``--config`` file gives, checked against the declarations: one line per problem,
    ``FILE: group.key: what is wrong``, all reported together."""
    from ..config import read_json_object

    try:
        data = read_json_object(Path(path))
    except Exception as exc:  # ClipkitError: unreadable, too large, not JSON, not an object
        raise ArgsError(f"--config {exc}") from exc
    problems: List[str] = []
    values: Dict[str, Any] = {}
    groups = {attr: group for attr, group, _ in GROUPS}
    for attr, section in data.items():
        if attr not in groups:
            hint = suggest(attr, groups)
            problems.append(f"{path}: {attr}: not a settings group; expected one of {', '.join(groups)}{hint}")
            continue
        if not isinstance(section, dict):
            problems.append(f"{path}: {attr}: expected an object of settings, got {json_repr(section)}")
            continue
        declared = {f.name: f for f in dataclasses.fields(groups[attr])}
        hints = typing.get_type_hints(groups[attr])
        for key, value in section.items():
            where = f"{path}: {attr}.{key}"
            if key not in declared:
                elsewhere = [a for a, g in groups.items() if a != attr and key in {f.name for f in dataclasses.fields(g)}]
                hint = (suggest(key, declared, cutoff=0.7)
                        or (f" (it belongs to the {elsewhere[0]!r} group)" if elsewhere else ""))
                problems.append(f"{where}: unknown setting{hint}")
                continue
            ok, converted = _coerce(value, hints[key])
            if not ok:
                problems.append(f"{where}: expected {_type_name(hints[key])}, got {json_repr(value)}")
                continue
            bad = _bounds_problem(converted, declared[key].metadata) if converted is not None else None
            if bad:
                problems.append(f"{where}: {bad}")
                continue
            if isinstance(converted, dict):  # --aug-cfg: the command line's literals give tuples, JSON lists
                converted = {k: tuple(v) if isinstance(v, list) else v for k, v in converted.items()}
            values[key] = list(converted) if isinstance(converted, tuple) else converted
    if problems:
        raise ArgsError("\n".join(problems) if len(problems) > 1 else problems[0])
    return values


def write_settings_file(settings: Settings, path: Path) -> None:
    """``settings`` as the JSON file ``--config`` reads (sorted keys, so that two runs' files diff cleanly)."""
    path.write_text(json.dumps(settings.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- the flags tables of docs/training.md ------------------------------------------------------------
_BEGIN = "<!-- flags table: {} (generated from clipkit/train/settings.py; python -m clipkit.train.settings) -->"
_END = "<!-- end of flags table -->"
# a row of a flags table: `--first-flag`[, `--other-name`...] | default | meaning
_ROW = re.compile(r"^\| `(?P<flag>--[a-z0-9-]+)`(?:, `[^`]+`)* \| .*? \| (?P<meaning>.+) \|$")


def _shown_default(f: dataclasses.Field[Any]) -> str:
    shown: Optional[str] = f.metadata["shown"]
    if shown is not None:
        return shown
    if f.metadata["required"]:
        return "**required**"
    default: Any = f.default
    factory = f.default_factory
    if default is dataclasses.MISSING and callable(factory):
        default = factory()
    if default is None or default == {}:
        return "none"
    if default is False:
        return "off"
    return f"`{default}`" if isinstance(default, str) else str(default)


def written_meanings(text: str) -> Dict[str, str]:
    """The meaning column of the flags tables in ``text`` (docs/training.md), by each row's first flag."""
    meanings = {}
    for line in text.splitlines():
        row = _ROW.match(line)
        if row:
            meanings[row["flag"]] = row["meaning"]
    return meanings


def flags_table(group: type, meanings: Optional[Dict[str, str]] = None) -> str:
    """The markdown table of a group's documented flags: flag, default, and the meaning written in
    ``meanings`` (by first flag name), or the ``--help`` text for a flag the docs do not describe yet."""
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(group):
        if f.metadata["hidden"]:
            continue
        names = flag_names(f)
        meaning = (meanings or {}).get(names[0], f.metadata["doc"])
        lines.append(f"| {', '.join(f'`{name}`' for name in names)} | {_shown_default(f)} | {meaning} |")
    return "\n".join(lines)


def update_flags_tables(text: str) -> str:
    """``text`` (docs/training.md) with every generated flags table rewritten from the declarations,
    keeping the meanings its rows give."""
    meanings = written_meanings(text)
    for attr, group, _ in GROUPS:
        begin = _BEGIN.format(attr)
        start = text.index(begin) + len(begin)
        end = text.index(_END, start)
        text = text[:start] + "\n" + flags_table(group, meanings) + "\n" + text[end:]
    return text


if __name__ == "__main__":  # rewrite the tables of docs/training.md in place
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/training.md")
    target.write_text(update_flags_tables(target.read_text(encoding="utf-8")), encoding="utf-8")
