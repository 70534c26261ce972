"""clipkit-train's settings: one typed dataclass per flag group, the single declaration of every flag.

Each field is a flag: its name (``--`` + the field name with dashes, unless ``names`` says otherwise),
type, default, bounds and ``--help`` text, and the row of the flags table in docs/training.md
(``shown``: the default as the table words it; ``details``: the meaning). The parser
(:mod:`clipkit.train.args`), the settings file (``--config``, and ``settings.json`` in every run folder)
and the docs table all come from these classes. Each part of the trainer receives its own group.

No torch here: ``clipkit-train --help`` imports this module.
"""
from __future__ import annotations

import dataclasses
import json
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
         details: Optional[str] = None) -> Any:
    """A settings field that is also a flag. ``default=dict`` means an empty dict; ``hidden``: accepted
    but left out of ``--help`` and the docs (OpenCLIP's flags for features clipkit does not have)."""
    extra = {"names": names, "hidden": hidden, "required": required, "shown": shown, "details": details}
    if default is dict:
        return option(doc=help, default_factory=dict, extra=extra)
    return option(default, help, gt=gt, ge=ge, le=le, choices=choices, extra=extra)


@dataclass
class DataSettings:
    """What to train and evaluate on, and how it is loaded."""

    train_data: Optional[str] = flag(None, "training data: WebDataset shards (brace patterns, 'pipe:' commands, "
        "several sources joined by '::'), a .csv/.tsv file, or nothing for synthetic",
        details='Training data: WebDataset shards (brace patterns such as `{00000..00329}`, `pipe:` commands, '
                'several sources joined by `::`) or a `.csv`/`.tsv` file. See [Data formats](#data-formats).')
    train_data_upsampling_factors: Optional[str] = flag(None, "per-source sampling weights joined by '::' (e.g. "
        "'1::2'); needs --dataset-resampled",
        details='Sampling weights per `::` source, e.g. `1::2`; needs `--dataset-resampled` and one weight per '
                'source.')
    val_data: Optional[str] = flag(None, 'validation data (same formats) for retrieval metrics and clip_val_loss',
        details='Validation data for retrieval metrics and `clip_val_loss`: shards or a CSV file, typed by its own '
                'extension as in OpenCLIP (see [Evaluation data and metrics](#evaluation-data-and-metrics)).')
    train_num_samples: Optional[int] = flag(None, 'samples per epoch; read from sizes.json/__len__ or counted from '
        'the shards when not given',
        gt=0,
        details='Samples per epoch. Without it the count comes from `sizes.json`/`__len__` beside the shards, or '
                'from counting the shards once (logged); a CSV counts its rows. Required for `synthetic` and '
                '`--dataset-resampled` (without it, a flag error before any work). **≠ OpenCLIP**, which errors '
                'instead of counting.')
    val_num_samples: Optional[int] = flag(None, 'evaluate on about this many validation samples (whole batches)',
        gt=0,
        details='Stop validation after `ceil(N / --batch-size)` batches.')
    dataset_type: str = flag('auto', "a registered data source (webdataset, csv, synthetic, or a plugin's), or "
        "'auto': each path's own, by extension (.csv/.tsv: csv; .tar and 'pipe:': webdataset) (default: auto)",
        details='A registered data source: `webdataset`, `csv`, `synthetic`, `folder`, or one a plugin registers '
                '(`clipkit plugins` lists them); or `auto`: chosen by what the registrations declare, so `.csv`/`.tsv` '
                '→ csv, `.tar` and `pipe:` → webdataset, a folder → folder; anything else is an error asking for '
                'the type. See [Data sources](#data-sources).')
    dataset_resampled: bool = flag(False, 'draw shards with replacement, forever (epochs are --train-num-samples '
        'long)',
        details='Draw shards with replacement, endlessly; an epoch is `--train-num-samples` long, so that flag is '
                'required (a flag error without it). WebDataset only.')
    csv_separator: str = flag('\t', 'CSV column separator (default: a tab)',
        shown='a tab',
        details='CSV column separator.')
    csv_img_key: str = flag('filepath', 'CSV column holding image paths (default: filepath)',
        details='CSV column with image paths (absolute, relative to the working directory, or relative to the '
                "CSV's folder).")
    csv_caption_key: str = flag('title', 'CSV column holding captions (default: title)',
        details='CSV column with captions.')
    imagenet_val: Optional[str] = flag(None, 'ImageNet validation folder (one sub-folder per class) for zero-shot '
        'top-1/5',
        details="ImageNet validation folder, one sub-folder per class: zero-shot top-1/top-5 with OpenAI's class "
                'names and templates.')
    imagenet_v2: Optional[str] = flag(None, 'ImageNet-V2 folder (one sub-folder per class) for zero-shot top-1/5',
        details='ImageNet-V2 folder, the same way.')
    zeroshot_data: Optional[str] = flag(None, "zero-shot evaluation data: WebDataset shards with a 'cls' member, "
        'or a folder with one sub-folder of images per class',
        details='**Addition.** Zero-shot data of your own: WebDataset shards whose samples have an image and a '
                '`cls` label, or a folder with one sub-folder of images per class.')
    zeroshot_classnames: Optional[str] = flag(None, 'class names, in label order: a JSON list or one name per line',
        details='**Addition.** Class names in label order: a JSON list or one per line. Required with shards; a '
                "folder's sub-folder names are the default (`_` read as a space).")
    zeroshot_templates: Optional[str] = flag(None, "prompt templates with '{}' (or '{c}') for the class name: a "
        'JSON list or one per line',
        shown='`a photo of a {}.`',
        details='**Addition.** Prompt templates, `{}` or `{c}` standing for the class name: a JSON list or one per '
                'line.')
    max_bad_sample_fraction: float = flag(0.5, "abort when more than this fraction of an epoch's samples is "
        'unreadable (default: 0.5)',
        ge=0, le=1,
        details="**Addition.** Abort when more than this fraction of an epoch's samples is unreadable (between 0 "
                'and 1). See [Bad samples](#bad-samples).')
    max_image_pixels: Optional[int] = flag(None, 'skip (count too_large) images with more pixels, read from the '
        "header before decoding (default: the larger of 32 million and (8 x the model's input side)^2)",
        gt=0, shown="the larger of 32,000,000 and (8 × the model's input side)²",
        details='**Addition.** Images with more pixels are skipped and counted `too_large`, judged from the image '
                'header before anything is decoded (a JPEG by the reduced scale it is decoded at). Raise it for '
                'datasets of very large PNG/TIFF/WebP images; each data worker needs about 7 bytes per pixel of '
                "the largest image it decodes. **≠ OpenCLIP**: PIL's fixed 89 MP warning / 179 MP error. See [Bad "
                'samples](#bad-samples).')
    workers: int = flag(4, 'data loader processes per GPU (default: 4)',
        details='Data loader processes per process (per GPU); 0 loads in the training process.')
    batch_size: int = flag(64, 'batch size per GPU (default: 64)',
        gt=0,
        details='Batch size per process (per GPU), per micro-batch with `--accum-freq`.')
    cache_dir: Optional[str] = flag(None, 'where pretrained weights and tokenizers are cached',
        details='Where pretrained weights and tokenizers are cached. (OpenCLIP lists it with the checkpoint flags.)')


@dataclass
class ModelSettings:
    """The model: its config, pretrained weights, tokenizer, locks and overrides."""

    model: Optional[str] = flag(None, "model config: a name from `clipkit models`, 'hf-hub:org/repo', "
        "'local-dir:PATH' or a .json file",
        required=True,
        details='A config name (`clipkit models`), `hf-hub:org/repo`, `local-dir:PATH`, or a `.json` file. **≠ '
                'OpenCLIP**: no `RN50` default; paths accepted.')
    pretrained: str = flag('', 'pretrained tag of the model or a checkpoint file/folder',
        shown='none',
        details="A pretrained tag of the model (see [pretrained.md](pretrained.md)), a checkpoint file (clipkit's "
                "or OpenCLIP's) or a `save_pretrained` folder. Loads weights only: the optimizer and step start "
                'fresh (use `--resume` to continue a run).')
    pretrained_image: bool = flag(False, "load the image tower's own pretrained weights (timm)",
        details="Load the image tower's own pretrained weights (timm towers).")
    hf_tokenizer_name: Optional[str] = flag(None, 'HuggingFace tokenizer (name or folder) to use instead of the '
        "config's",
        details="**Addition.** A Hugging Face tokenizer (hub name or folder) to use instead of the config's. Its "
                "special tokens must agree with the text tower config and its vocabulary must fit the tower's "
                '`vocab_size`, or the run stops before training.')
    trust_remote_code: bool = flag(False, 'let HuggingFace repositories named by the model run their own Python (a '
        'config cannot)',
        details='**Addition.** Let the HuggingFace repositories the model names (`hf_model_name`, '
                '`hf_tokenizer_name`, `--hf-tokenizer-name`) run their own Python. Only this flag (or '
                "`CLIPKIT_TRUST_REMOTE_CODE=1`) allows it: a config's `trust_remote_code` is a request that is "
                'ignored without it, and a repository that needs its code stops the run with one line.')
    lock_image: bool = flag(False, 'freeze the image tower (LiT)',
        details='Freeze the image tower (LiT).')
    lock_image_unlocked_groups: int = flag(0, 'with --lock-image, leave the last N layer groups trainable',
        details='With `--lock-image`: leave the last N layer groups trainable.')
    lock_image_freeze_bn_stats: bool = flag(False, 'with --lock-image, keep locked BatchNorm statistics fixed',
        details='With `--lock-image`: keep locked BatchNorms in eval mode, so their running statistics do not '
                'change.')
    lock_text: bool = flag(False, 'freeze the text tower',
        details='Freeze the text tower.')
    lock_text_unlocked_layers: int = flag(0, 'with --lock-text, leave the last N layer groups trainable',
        details='With `--lock-text`: leave the last N layer groups trainable.')
    lock_text_freeze_layer_norm: bool = flag(False, 'with --lock-text, freeze LayerNorm parameters in locked '
        'layers too',
        details='With `--lock-text`: freeze the norm parameters of locked groups too (without it they stay '
                "trainable, as in OpenCLIP's CLI).")
    lock_train_mode: bool = flag(False, 'leave the locked parts of locked towers in train mode (dropout on), as '
        'OpenCLIP does',
        details='**Addition.** Leave the locked parts of `--lock-image`/`--lock-text` towers in train mode, as '
                'OpenCLIP does (dropout on, BatchNorm on batch statistics). Without it, every part of a tower whose '
                'parameters are all frozen runs in eval mode during training (**≠ OpenCLIP**), which makes it '
                'deterministic and so cacheable. See [Locked towers are computed once](#locked-towers-are-computed-'
                'once).')
    lock_image_eval_preprocess: bool = flag(False, 'with a fully locked image tower, give training images the '
        'eval preprocessing (LiT), so its outputs can be cached',
        details='**Addition.** With a fully locked image tower (`--lock-image`, no unlocked groups): training '
                'images get the evaluation preprocessing (resize and centre crop, no augmentation), as in LiT, so '
                "the same image gives the same input and the tower's output is computed once.")
    no_lock_cache: bool = flag(False, 'do not cache the outputs of locked towers (or locked prefixes)',
        details='**Addition.** Turn off the cache of locked computation: locked towers and locked prefixes are '
                'then run on every step. The cache is exact (a run with it ends with the same weights), so this '
                'is for measuring it or saving its memory.')
    lock_cache_bytes: int = flag(2 ** 31, 'memory for cached locked outputs, per process (default: 2 GiB)',
        ge=0, shown='2147483648 (2 GiB)',
        details='**Addition.** Memory (on the training device) the cache of locked outputs may hold per process; '
                'when it is full, new inputs are computed and not kept. Also bounds its file in the run folder.')
    image_mean: Optional[List[float]] = flag(None, 'override the normalisation mean',
        shown="the model's",
        details='Normalisation mean, one number per channel.')
    image_std: Optional[List[float]] = flag(None, 'override the normalisation std',
        shown="the model's",
        details='Normalisation standard deviation, one number per channel.')
    image_interpolation: Optional[str] = flag(None, 'resize interpolation',
        choices=('bicubic', 'bilinear', 'random'), shown="the model's",
        details='`bicubic`, `bilinear` or `random`.')
    image_resize_mode: Optional[str] = flag(None, 'how images are resized',
        choices=('shortest', 'longest', 'squash'), shown="the model's",
        details='`shortest`, `longest` or `squash`.')
    aug_cfg: Dict[str, Any] = flag(dict, "training augmentation as key=value pairs, e.g. scale='(0.9,1.0)' "
        'color_jitter=0.4',
        details="Training augmentation as `key=value` pairs, values read as Python literals: `scale='(0.9,1.0)'`, "
                '`ratio`, `color_jitter`, `color_jitter_prob`, `gray_scale_prob`, `re_prob`, `re_count`, '
                '`use_timm`.')
    force_context_length: Optional[int] = flag(None, 'override text_cfg.context_length',
        gt=0,
        details='Override `text_cfg.context_length`.')
    force_image_size: Optional[List[int]] = flag(None, 'override vision_cfg.image_size',
        gt=0,
        details='Override `vision_cfg.image_size`: one number, or height and width.')
    force_quick_gelu: bool = flag(False, "use QuickGELU (OpenAI's weights need it)",
        details="Use QuickGELU (OpenAI's pretrained weights need it).")
    force_patch_dropout: Optional[float] = flag(None, 'override vision_cfg.patch_dropout',
        details='Override `vision_cfg.patch_dropout`.')
    force_custom_text: bool = flag(False, "build the text tower under 'text.' (OpenCLIP's CustomTextCLIP key "
        'layout)',
        details="Set the config's `custom_text`: checkpoints keep text weights under `text.` (OpenCLIP's "
                '`CustomTextCLIP` layout).')
    siglip: bool = flag(False, 'SigLIP: sigmoid loss, logit scale initialised to ln 10 and a logit bias of -10',
        details='SigLIP: the sigmoid loss, logit scale initialised to ln 10 and a logit bias of −10.')
    distill_model: Optional[str] = flag(None, 'distil from this teacher model (a model name, as for --model); '
        'needs --distill-pretrained',
        details="Train with the `distill` objective (OpenCLIP's `DistillClipLoss`): the contrastive loss plus a "
                "distillation loss towards this frozen teacher's similarities. The teacher must take the "
                "student's image size and tokenizer. Needs `--distill-pretrained`.")
    distill_pretrained: Optional[str] = flag(None, "the teacher's weights: a pretrained tag or a file; needs "
        '--distill-model',
        details="The teacher's weights: a pretrained tag of `--distill-model`, a checkpoint file or a "
                '`save_pretrained` folder.')
    use_bnb_linear: Optional[str] = flag(None, '',
        hidden=True)


@dataclass
class OptimizationSettings:
    """The optimizer, its schedule, the loss across processes and the seed."""

    epochs: int = flag(32, 'epochs to train (default: 32)',
        gt=0,
        details='Epochs to train.')
    epochs_cooldown: Optional[int] = flag(None, 'with --lr-scheduler const-cooldown: the last N epochs decay the '
        'learning rate',
        details='With `--lr-scheduler const-cooldown` (and only then): the last N epochs decay the learning rate.')
    lr: Optional[float] = flag(None, 'learning rate (default: 5e-4)',
        gt=0, shown='5e-4',
        details='Peak learning rate.')
    beta1: Optional[float] = flag(None, 'Adam beta1 (default: 0.9)',
        shown='0.9',
        details='Adam β1.')
    beta2: Optional[float] = flag(None, 'Adam beta2 (default: 0.98 for ViT models, else 0.999)',
        shown='0.98 if `vit` is in the `--model` value (case-insensitive), else 0.999',
        details='Adam β2.')
    eps: Optional[float] = flag(None, 'Adam epsilon (default: 1e-6 for ViT models, else 1e-8)',
        shown='1e-6 if `vit` is in the `--model` value, else 1e-8',
        details='Adam ε.')
    wd: float = flag(0.2, 'weight decay (default: 0.2)',
        details="Weight decay (decoupled, AdamW). OpenCLIP's rule, exactly: not applied to tensors with fewer than "
                '2 dimensions or to names containing `bn`, `ln`, `bias` or `logit_scale`; everything else decays '
                "(the towers' `no_weight_decay()` lists are not used).")
    momentum: Optional[float] = flag(None, 'momentum, for timm optimizers that take it',
        details='Momentum for timm optimizers that take it; **≠ OpenCLIP**: an error without `--opt timm/NAME`.')
    warmup: int = flag(10000, 'linear warmup steps (default: 10000)',
        details='Linear warmup steps (optimizer steps). Lower it for short runs: with the default, a run shorter '
                'than 10,000 steps never reaches `--lr`.')
    opt: str = flag('adamw', "'adamw' or 'timm/NAME' for a timm optimizer (default: adamw)",
        details="`adamw`, or `timm/NAME` for timm's `create_optimizer_v2(NAME)` (e.g. `timm/lamb`, "
                '`timm/momentum`).')
    use_bn_sync: bool = flag(False, 'synchronise BatchNorm statistics across processes',
        details='Convert BatchNorms to SyncBatchNorm when distributed.')
    skip_scheduler: bool = flag(False, 'keep the learning rate constant at --lr',
        details='No warmup, no schedule: the learning rate stays at `--lr`.')
    lr_scheduler: str = flag('cosine', 'learning-rate schedule after warmup (default: cosine)',
        choices=('cosine', 'const', 'const-cooldown'),
        details='After warmup: `cosine` (to 0 at the last step), `const`, or `const-cooldown` (constant, then a '
                'decay over the last `--epochs-cooldown` epochs).')
    lr_cooldown_end: float = flag(0.0, 'learning rate at the end of the cooldown',
        details='Learning rate at the end of the cooldown.')
    lr_cooldown_power: float = flag(1.0, 'cooldown shape: 1 is linear',
        details='Cooldown shape: 1 is linear.')
    accum_freq: int = flag(1, 'gradient accumulation: one optimizer step per N batches, with the contrastive loss '
        'over all N batches (default: 1)',
        gt=0,
        details='Gradient accumulation: one optimizer step per N batches, and the contrastive loss of each step '
                'sees all N × `--batch-size` pairs (features of the other micro-batches are recomputed without '
                'gradient, as OpenCLIP). **≠ OpenCLIP**: the logit scale and bias get their gradient once per '
                'step, not N times, so the step equals that of one batch of N × `--batch-size`. Under DDP the '
                'gradients are all-reduced once per step (`no_sync` for the earlier micro-batches). An epoch has '
                '`batches // N` steps; leftover batches are not used.')
    grad_clip_norm: Optional[float] = flag(None, 'clip the gradient norm to this value',
        gt=0,
        details='Clip the global gradient norm to this value (after unscaling with fp16).')
    grad_checkpointing: bool = flag(False, 'recompute activations in backward to save memory',
        details='Recompute activations in the backward pass to save memory.')
    local_loss: bool = flag(False, 'distributed: each process computes the loss of its own features against all',
        details="Distributed CLIP loss: each process scores its own features against everyone's (memory linear in "
                'the global batch). Without `--gather-with-grad` the gradient misses terms, and a warning says so.')
    gather_with_grad: bool = flag(False, 'distributed: gather features with gradients',
        details="Distributed: gather features with gradients. With `--local-loss`: OpenCLIP's linear-memory setup, "
                'with the exact gradient of the global-batch loss.')
    loss_dist_impl: Optional[str] = flag(None, 'distributed SigLIP loss exchange (default: bidir)',
        choices=('bidir', 'shift', 'reduce', 'gather'), shown='`bidir`',
        details='SigLIP only (`bidir`, `shift`, `reduce`, `gather`); needs `--siglip`. **≠ OpenCLIP**: accepted, '
                'but every value uses the same implementation: each process scores its images against every '
                "process's texts, block by block, through one differentiable all-gather of the text features; no "
                'process holds the global B×B logits.')
    objective: Optional[str] = flag(None, "what a step minimises: a registered objective (clip, siglip, distill, "
        "or a plugin's; default: siglip with --siglip, distill with --distill-model, else clip)",
        shown='`clip`',
        details='**Addition.** The training objective, by its registered name (`clipkit plugins` lists them): '
                '`clip`, `siglip`, `distill`, or one a plugin registers. Without it: `siglip` with `--siglip`, '
                '`distill` with `--distill-model`, else `clip`. See [Objectives](#objectives).')
    objective_opt: Dict[str, Any] = flag(dict, "the objective's options as key=value pairs (values read as Python "
        "literals), e.g. --objective-opt weight=0.5",
        details="**Addition.** Options of the objective, as `key=value` pairs checked against its options class "
                "(unknown keys, types and bounds are flag errors). The builtins take theirs from OpenCLIP's "
                "flags (`--local-loss`, `--gather-with-grad`, `--loss-dist-impl`, `--distill-*`); a value given "
                "here wins.")
    seed: int = flag(0, 'random seed (default: 0)',
        details='Seeds the initial weights (identical on every process), the data order and augmentations.')


@dataclass
class PrecisionSettings:
    """Number formats and torch.compile."""

    precision: str = flag('amp', 'amp: fp16 autocast with loss scaling on GPU, bf16 autocast on CPU (default: amp)',
        choices=PRECISIONS,
        details='`amp`: on GPU fp16 autocast with a GradScaler; **≠ OpenCLIP** on CPU bf16 autocast without '
                'scaling (a CPU without AVX512-BF16/AMX emulates bf16, slowly; a warning says so). '
                "`amp_bf16`/`amp_bfloat16`: bf16 autocast. `bf16`/`fp16`: the model's matrix weights in that type "
                '(norms, embeddings and the logit scale stay fp32) and inputs cast to it. `pure_bf16`/`pure_fp16`: '
                'the whole model in that type. `fp32`: no casting. Losses and logits are computed in fp32 whatever '
                'the precision.')
    torchcompile: bool = flag(False, 'torch.compile the model',
        details="`torch.compile` the model. Checkpoints still hold the plain model's keys (no `_orig_mod.`). See "
                '[torch.compile](#torchcompile).')
    torchcompile_backend: str = flag('inductor', "torch.compile backend (default: inductor; 'aot_eager' compiles "
        'fast)',
        details='**Addition.** The `torch.compile` backend; `aot_eager` compiles much faster (useful on CPU and in '
                'tests).')
    torchscript: bool = flag(False, '',
        hidden=True)
    trace: bool = flag(False, '',
        hidden=True)


@dataclass
class DistributedSettings:
    """Devices and the process group."""

    device: str = flag('cuda', 'device; falls back to CPU with a warning (default: cuda)',
        details='The device. Without CUDA it falls back to the CPU with a warning, so CPU runs may pass `--device '
                'cpu` to avoid it. Under torchrun each process takes `cuda:LOCAL_RANK`.')
    dist_url: Optional[str] = flag(None, 'process-group init URL (default: env://, as set by torchrun)',
        shown='`env://`',
        details='Process-group init URL (torchrun and SLURM set the `env://` variables).')
    dist_backend: Optional[str] = flag(None, 'process-group backend (default: nccl on CUDA, gloo on CPU)',
        shown='`nccl` on CUDA, else `gloo`',
        details='Process-group backend.')
    ddp_static_graph: bool = flag(False, 'DistributedDataParallel(static_graph=True)',
        details='`DistributedDataParallel(static_graph=True)`.')
    fsdp: bool = flag(False, 'shard weights, gradients and optimizer state across processes with FSDP2 '
        '(fully_shard per layer group of each tower) instead of DDP; checkpoints become Distributed Checkpoint '
        'folders (python -m clipkit.train.consolidate DIR OUT.pt makes one file of them)',
        details='*clipkit addition (OpenCLIP 3.3.0 has no FSDP).* Shard weights, gradients and optimizer state '
                'with FSDP2 (`fully_shard` on each layer group of each tower, then the model) instead of DDP. '
                'Checkpoints become Distributed Checkpoint folders `epoch_N/` and `epoch_latest/`; `--resume '
                'latest` finds them (only under `--fsdp`) and resumes at any number of processes; without '
                '`--fsdp`, name a folder with `--resume DIR`; `python -m clipkit.train.consolidate DIR OUT.pt` '
                'makes one ordinary checkpoint file of a folder. See [distributed.md](distributed.md#fsdp).')
    no_set_device_rank: bool = flag(False, 'do not pick the GPU by local rank',
        details='Keep `--device` as given instead of `cuda:LOCAL_RANK` (when each process already sees one GPU); '
                'give it with an index, e.g. `--device cuda:0`.')
    horovod: bool = flag(False, '',
        hidden=True)


@dataclass
class LoggingSettings:
    """Where the run folder goes and what it reports."""

    logs: Optional[str] = flag('./logs/', "where run folders go; 'none' saves nothing (default: ./logs/). Under "
        'torchrun use --logs-dir: torchrun mistakes --logs for its --logs-specs',
        names=('--logs', '--logs-dir'),
        details='Where run folders go; `none` writes nothing (no log file, checkpoints, TensorBoard or `--resume '
                "latest`). Under torchrun write `--logs-dir` (**addition**): torchrun's own parser mistakes "
                '`--logs` for its `--logs-specs`.')
    log_local: bool = flag(False, 'one log file per process (out-RANK.log)',
        details='Distributed: every process writes its own log, `out-RANK.log` (rank 0 too, `out-0.log`), and logs '
                'at INFO level; otherwise only rank 0 writes `out.log` and other ranks print warnings only.')
    name: Optional[str] = flag(None, 'run name (default: date, model, lr, batch size, workers and precision)',
        shown='`{date}-model_{model}-lr_{lr}-b_{batch}-j_{workers}-p_{precision}`',
        details="The run folder's name under `--logs`. Give one to resume.")
    report_to: str = flag('', "'tensorboard', 'wandb', both comma-separated, or 'all'",
        shown='none',
        details='`tensorboard`, `wandb`, both comma-separated, or `all`. See [Reporting](#reporting).')
    wandb_notes: str = flag('', 'notes for the wandb run',
        shown='empty',
        details='Notes for the wandb run.')
    wandb_project_name: str = flag('open-clip', 'wandb project (default: open-clip)',
        details='wandb project.')
    debug: bool = flag(False, 'debug logging',
        details='Debug-level logging.')
    log_every_n_steps: int = flag(100, 'log every N steps (default: 100)',
        gt=0,
        details='A log line (and TensorBoard/wandb scalars) every N optimizer steps, and at the last step of each '
                'epoch.')
    data_wait_warn: float = flag(0.3, 'warn once when the step waits for data more than this fraction of the '
        'time for 3 log intervals in a row; 0: never (default: 0.3)',
        ge=0, le=1,
        details='**Addition.** Each log line gives the fraction of the time the step waited for data (`data wait`, '
                'TensorBoard `train/data_wait_fraction`); when it stays above this for 3 log intervals in a row '
                "(not counting an epoch's first, which starts the data workers), one warning says what to change. "
                '`0` turns the warning off. See [Is the data the bottleneck?](#is-the-data-the-bottleneck).')
    copy_codebase: bool = flag(False, 'copy the installed clipkit package into the run folder',
        details='Copy the installed `clipkit` package into `RUN/code/clipkit` (OpenCLIP copies its source tree).')


@dataclass
class CheckpointSettings:
    """Training checkpoints, resuming, and the remote copy of the run."""

    save_frequency: int = flag(1, 'save epoch_N.pt every N epochs; 0 never (default: 1)',
        details='Write `checkpoints/epoch_N.pt` every N epochs and after the last; 0 writes no numbered files '
                '(`epoch_latest.pt` is still written at every epoch end).')
    save_most_recent: bool = flag(False, 'accepted for OpenCLIP compatibility: clipkit always keeps epoch_latest.pt',
        details='**≠ OpenCLIP**: accepted and has no effect: `epoch_latest.pt` is always written, by every save.')
    save_every_n_steps: Optional[int] = flag(None, 'also save epoch_latest.pt every N steps, mid-epoch (exact '
        'resume from there)',
        gt=0,
        details='**Addition.** Also save `epoch_latest.pt` every N optimizer steps, mid-epoch; a resume continues '
                'from exactly there.')
    resume: Optional[str] = flag(None, "checkpoint file to resume from, or 'latest' for this run's newest complete "
        'one',
        details="A checkpoint file to continue from (clipkit's, or OpenCLIP's), a URL of one (any fsspec URL, such "
                'as `s3://bucket/runs/NAME/checkpoints/epoch_3.pt`; copied into the run folder first), or '
                "`latest`: this run's newest complete checkpoint (needs `--name`; with `--remote-sync`, a machine "
                "without the run's folder pulls the remote copy), starting fresh when there is none. See "
                '[Checkpoints and resuming](#checkpoints-and-resuming).')
    delete_previous_checkpoint: bool = flag(False, 'delete epoch_{N-1}.pt once epoch_N.pt is complete',
        details='Delete `epoch_{N-1}.pt` once `epoch_N.pt` is written.')
    remote_sync: Optional[str] = flag(None, 'copy complete checkpoints to this fsspec URL (e.g. s3://bucket/runs)',
        details="Copy the run folder's complete files (checkpoints, logs, TensorBoard events) to this URL, under "
                "the run's name: `s3://bucket/runs` → `s3://bucket/runs/NAME/...`. Each file goes to a temporary "
                'remote name first and is then moved, so the remote never holds a torn checkpoint. Uses fsspec '
                '(`s3://` needs `s3fs`).')
    remote_sync_frequency: int = flag(300, 'seconds between remote syncs (default: 300)',
        gt=0,
        details='Minimum seconds between syncs. **≠ OpenCLIP**: syncs happen when a checkpoint is saved (and once '
                'at the end), not in a background process.')
    remote_sync_protocol: str = flag('s3', 'remote sync protocol',
        choices=('s3', 'fsspec'),
        details='`s3` (the URL must start with `s3://`) or `fsspec` (any fsspec URL).')


@dataclass
class EvaluationSettings:
    """How often evaluation runs (its data is in the data group)."""

    zeroshot_frequency: int = flag(2, 'zero-shot evaluation every N epochs (default: 2)',
        details='Zero-shot evaluation (`--zeroshot-data`, `--imagenet-val`, `--imagenet-v2`) every N epochs and '
                'after the last; 0 never.')
    val_frequency: int = flag(1, 'validation every N epochs (default: 1)',
        details='Retrieval evaluation on `--val-data` every N epochs and after the last; 0 never.')


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


def flags_table(group: type) -> str:
    """The markdown table of a group's documented flags: flag, default, meaning."""
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(group):
        if f.metadata["hidden"]:
            continue
        names = ", ".join(f"`{name}`" for name in flag_names(f))
        lines.append(f"| {names} | {_shown_default(f)} | {f.metadata['details'] or f.metadata['doc']} |")
    return "\n".join(lines)


def update_flags_tables(text: str) -> str:
    """``text`` (docs/training.md) with every generated flags table rewritten from the declarations."""
    for attr, group, _ in GROUPS:
        begin = _BEGIN.format(attr)
        start = text.index(begin) + len(begin)
        end = text.index(_END, start)
        text = text[:start] + "\n" + flags_table(group) + "\n" + text[end:]
    return text


if __name__ == "__main__":  # rewrite the tables of docs/training.md in place
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/training.md")
    target.write_text(update_flags_tables(target.read_text(encoding="utf-8")), encoding="utf-8")
