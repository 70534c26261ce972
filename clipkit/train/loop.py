"""The training run: model and data from the flags, the optimisation loop, checkpoints and evaluation."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shlex
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ClipkitError
from . import checkpoints as ckpt
from . import distributed
from .data import DataError, Loader, Progress, train_loader
from .evaluate import check_evaluation, evaluate
from .loss import ClipLoss, SigLipLoss
from .report import Reporter, setup_logging
from .schedule import learning_rate

logger = logging.getLogger("clipkit.train")


# the metrics the closing log line repeats
_HEADLINE = ("zeroshot-top1", "zeroshot-top5", "imagenet-zeroshot-val-top1", "image_to_text_R@1", "text_to_image_R@1",
             "clip_val_loss")


class TrainingError(ClipkitError):
    """The run cannot go on (a non-finite loss, a run folder in the way)."""


# sysexits' EX_TEMPFAIL ("try again later"): stopped on request with a checkpoint, to be continued
STOPPED_EXIT_CODE = 75


class RunStopped(TrainingError):
    """A stop signal ended the run at a step boundary, after saving a checkpoint."""

    exit_code = STOPPED_EXIT_CODE


# -- set-up ---------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def precision_setup(precision: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool, Optional[torch.dtype]]:
    """``(autocast dtype or None, use a GradScaler, input dtype or None)`` for a ``--precision``."""
    if precision == "amp":
        # fp16 autocast needs loss scaling on GPU; the CPU's fast low precision is bf16
        return (torch.float16, True, None) if device.type == "cuda" else (torch.bfloat16, False, None)
    if precision in ("amp_bf16", "amp_bfloat16"):
        return torch.bfloat16, False, None
    if precision in ("bf16", "pure_bf16"):
        return None, False, torch.bfloat16
    if precision in ("fp16", "pure_fp16"):
        return None, False, torch.float16
    return None, False, None


def build_optimizer(args, model: nn.Module) -> Tuple[torch.optim.Optimizer, Dict[int, str]]:
    """AdamW with OpenCLIP's weight-decay exclusions: 1-d tensors, and names with bn, ln, bias or
    logit_scale in them; so that OpenCLIP recipes train the same parameters the same way."""
    names = {id(p): n for n, p in model.named_parameters()}

    def excluded(name: str, p: nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise TrainingError("every parameter is frozen: nothing to train (check the --lock-* flags)")
    groups = [{"params": [p for n, p in params if excluded(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in params if not excluded(n, p)], "weight_decay": args.wd}]
    groups = [g for g in groups if g["params"]]
    if args.opt.startswith("timm/"):
        from timm.optim import create_optimizer_v2

        extra = {"momentum": args.momentum} if args.momentum is not None else {}
        try:
            optimizer = create_optimizer_v2(groups, args.opt[len("timm/"):], lr=args.lr, weight_decay=args.wd,
                                            betas=(args.beta1, args.beta2), eps=args.eps, **extra)
        except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
            raise TrainingError(f"--opt {args.opt}: timm cannot build it: {exc}") from exc
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    return optimizer, names


def _tokenizer(args, model_name: str, model) -> Callable:
    from .._trust import caller_trust
    from ..tokenizer import _check_special_ids, get_tokenizer

    if not args.hf_tokenizer_name:
        return get_tokenizer(model_name, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)
    from ..registry import registry

    text_cfg = dict(model.model_config.raw.get("text_cfg", {}), hf_tokenizer_name=args.hf_tokenizer_name)
    kwargs = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    with caller_trust(args.trust_remote_code):
        tokenizer = registry.get("tokenizer", "hf").load()(text_cfg, model.context_length, **kwargs)
    _check_special_ids(f"--hf-tokenizer-name {args.hf_tokenizer_name}", model.model_config, tokenizer)
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and vocab > model.vocab_size:
        raise TrainingError(f"--hf-tokenizer-name {args.hf_tokenizer_name}: its {vocab} tokens do not fit the text "
                            f"tower's vocab_size {model.vocab_size}")
    return tokenizer


def _prepare_run_dir(args, env) -> Tuple[Optional[Path], Optional[Path]]:
    """The run folder and the checkpoint to resume from (``None`` for a fresh start).

    Process 0 decides (it holds the run folder's lock); the others learn its answer, or its error.
    """
    run_dir = Path(args.logs) / args.name if args.logs else None
    return run_dir, _on_main(env, lambda: _find_resume(args, run_dir))


def _on_main(env, decide: Callable[[], Optional[Path]]) -> Optional[Path]:
    """``decide()`` on process 0, its answer on every process; its failure fails them all, with its message."""
    found = error = None
    if env.main:
        try:
            found = decide()
        except (ClipkitError, OSError) as exc:
            if not env.distributed:
                raise
            error = exc
    found, message = distributed.broadcast((str(found) if found else None, str(error) if error else None), env)
    if error is not None:
        raise error
    if message is not None:
        raise TrainingError(message)
    return Path(found) if found else None


def _find_resume(args, run_dir: Optional[Path]) -> Optional[Path]:
    from ._runlock import lock_run_folder

    if run_dir is not None:  # before anything in it is read, written or removed
        lock_run_folder(run_dir, owner=args)
    resume: Optional[Path] = None
    if args.resume and args.resume != "latest" and "://" not in args.resume:
        resume = Path(args.resume)
        if not (resume.is_file() or ckpt.is_dcp(resume)):
            raise TrainingError(f"--resume {args.resume}: no such file (nor a complete --fsdp checkpoint folder)")
        ckpt.verify(resume)
    if run_dir is None:
        return resume
    folder = run_dir / "checkpoints"
    # a folder whose earlier attempt failed before its first checkpoint can be reused as is
    started = bool(ckpt.candidates(folder, folders=False) or ckpt.candidates(folder, folders=True))
    if started and args.resume is None:
        raise TrainingError(f"run folder {run_dir} already exists: pass --resume latest to continue that run, "
                            f"or a new --name")
    ckpt.remove_torn(folder)
    if args.resume != "latest":
        return resume
    resume = ckpt.find_latest(folder, fsdp=args.fsdp)
    dirs = ckpt.candidates(folder, folders=True)
    # never a folder that the run did not write or the user did not name
    if resume is None and not args.fsdp and dirs and not ckpt.candidates(folder, folders=False):
        raise TrainingError(f"--resume latest: {folder} holds --fsdp checkpoint folders only; add --fsdp, or "
                            f"name one: --resume {dirs[0]}")
    return resume


def _remote_resume(args, env, run_dir: Optional[Path], resume: Optional[Path]) -> Optional[Path]:
    """``--resume URL`` fetched, or ``--resume latest`` on a machine without the run: its --remote-sync copy."""
    if args.resume is not None and "://" in args.resume:  # fetched by process 0 into the (shared) run folder
        if run_dir is None:
            raise TrainingError(f"--resume {args.resume}: a remote checkpoint is fetched into the run folder; "
                                f"--logs is 'none'")

        def fetch() -> Path:
            from .remote import fetch

            try:
                fetched = fetch(args.resume, run_dir / "checkpoints" / "fetched")
            except (OSError, ValueError, ImportError) as exc:
                raise TrainingError(f"--resume {args.resume}: cannot fetch it: {exc}") from exc
            ckpt.verify(fetched)
            return fetched

        return _on_main(env, fetch)
    if args.resume != "latest" or resume is not None or not args.remote_sync or run_dir is None:
        return resume

    def pull() -> Optional[Path]:  # a requeued job on a fresh machine
        from .remote import pull

        try:
            pull(args.remote_sync, run_dir.name, run_dir / "checkpoints", folders=args.fsdp)
        except (OSError, ValueError, ImportError) as exc:
            raise TrainingError(f"--resume latest: cannot read the run's copy under --remote-sync "
                                f"{args.remote_sync}: {exc}") from exc
        return ckpt.find_latest(run_dir / "checkpoints", fsdp=args.fsdp)

    return _on_main(env, pull)


def _write_params(args, run_dir: Path) -> None:
    with open(run_dir / "params.txt", "w", encoding="utf-8") as f:
        for key in sorted(vars(args)):
            f.write(f"{key}: {getattr(args, key)}\n")


def _copy_codebase(run_dir: Path) -> None:
    package = Path(__file__).resolve().parents[1]
    target = run_dir / "code" / "clipkit"
    if not target.exists():
        shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


# -- the run --------------------------------------------------------------------------------------
class Run:
    """One training run. ``run()`` returns the final evaluation metrics (empty without eval data)."""

    def __init__(self, args):
        self.args = args

    # model and optimiser ------------------------------------------------------------------------
    def _build(self) -> None:
        from ..factory import create_model_and_transforms

        args, env = self.args, self.env
        extra = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if args.siglip else {}
        seed_everything(args.seed)  # the same initial weights on every process
        self.model, self.preprocess_train, self.preprocess_val = create_model_and_transforms(
            args.model, args.pretrained or None, precision=args.precision, device=env.device,
            force_quick_gelu=args.force_quick_gelu, force_custom_text=args.force_custom_text,
            force_patch_dropout=args.force_patch_dropout,
            force_image_size=(args.force_image_size[0] if args.force_image_size and len(args.force_image_size) == 1
                              else tuple(args.force_image_size) if args.force_image_size else None),
            force_context_length=args.force_context_length, image_mean=args.image_mean, image_std=args.image_std,
            image_interpolation=args.image_interpolation, image_resize_mode=args.image_resize_mode,
            aug_cfg=args.aug_cfg or None, pretrained_image=args.pretrained_image, cache_dir=args.cache_dir,
            output_dict=True, trust_remote_code=args.trust_remote_code, **extra)
        self.tokenizer = _tokenizer(args, args.model, self.model)
        self._lock(args)
        if args.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if env.distributed and args.use_bn_sync:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        logger.info("model %s: %.2fM parameters, %.2fM trainable", args.model, total / 1e6, trainable / 1e6)

    def _lock(self, args) -> None:
        if args.lock_image:
            self.model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                                        freeze_bn_stats=args.lock_image_freeze_bn_stats)
        if args.lock_text:
            self.model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers,
                                       freeze_layer_norm=args.lock_text_freeze_layer_norm)

    def _wrap(self) -> None:
        """DDP and ``torch.compile`` around the model; checkpoints always save the bare model."""
        args, env = self.args, self.env
        self.module = self.model
        if args.fsdp:
            self.replicated = _fully_shard(self.model, env)
        elif env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids, static_graph=args.ddp_static_graph)
        if args.torchcompile:
            if args.grad_checkpointing and env.distributed:
                from torch import _dynamo

                _dynamo.config.optimize_ddp = False  # DDP graph splitting breaks checkpointed blocks
            self.model = torch.compile(self.model, backend=args.torchcompile_backend)

    # checkpoints --------------------------------------------------------------------------------
    def _payload(self, completed_epochs: int, progress: Optional[Progress], with_state: bool = True) -> Dict[str, Any]:
        payload: Dict[str, Any] = {
            "epoch": completed_epochs, "name": self.args.name,
            "clipkit": {"step": self.step, "data": progress.as_state() if progress is not None else None,
                        "rng": ckpt.rng_state(), "param_names": ckpt.optimizer_names(self.optimizer, self.names),
                        "model": self.args.model, "version": _version()},
        }
        if with_state:
            payload["state_dict"] = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
            payload["optimizer"] = self.optimizer.state_dict()
        if self.scaler is not None:
            payload["scaler"] = self.scaler.state_dict()
        config = getattr(self.module, "model_config", None)
        if config is not None:
            from .._provenance import PROVENANCE_KEY, parts_provenance

            payload[PROVENANCE_KEY] = parts_provenance(config)
        return payload

    def save(self, completed_epochs: int, progress: Optional[Progress], epoch_end: bool) -> None:
        """Write ``epoch_N.pt`` at epoch ends the flags ask for, and always ``epoch_latest.pt``."""
        if self.ckpt_dir is None:
            return
        # every process has the same weights (under --fsdp: its shard, so they agree): all stop together
        bad = [n for n, p in self.module.named_parameters() if not torch.isfinite(_local(p)).all()]
        if distributed.all_agree(bool(bad), self.env) if self.args.fsdp else bad:  # a checkpoint that cannot be trained from is worse than none
            raise TrainingError(f"parameters became non-finite ({', '.join(bad[:3])}); not saving a checkpoint")
        # each process's data position and generators, so that every one resumes where it was
        ranks = [{"data": progress.as_state() if progress is not None else None, "rng": ckpt.rng_state()}]
        if self.env.distributed:
            ranks = [None] * self.env.world
            torch.distributed.all_gather_object(
                ranks, {"data": progress.as_state() if progress is not None else None, "rng": ckpt.rng_state()})
        args = self.args
        numbered = epoch_end and args.save_frequency > 0 and (
            completed_epochs == args.epochs or completed_epochs % args.save_frequency == 0)
        if args.fsdp:
            self._save_dcp(completed_epochs, progress, ranks, numbered, epoch_end)
            return
        if not self.env.main:
            return
        payload = self._payload(completed_epochs, progress)
        payload["clipkit"]["ranks"] = ranks
        latest = self.ckpt_dir / ckpt.LATEST
        if numbered:
            path = self.ckpt_dir / f"epoch_{completed_epochs}.pt"
            # epoch_latest first, so that it is the newest checkpoint at every moment (resuming trusts the names)
            ckpt.atomic_save(payload, latest)
            ckpt.atomic_copy(latest, path)
            logger.info("saved %s", path)
            previous = self.ckpt_dir / f"epoch_{completed_epochs - 1}.pt"
            if args.delete_previous_checkpoint and previous.exists():
                previous.unlink()
        else:
            ckpt.atomic_save(payload, latest)
            logger.info("saved %s (epoch %d, step %d)", latest, completed_epochs + (0 if epoch_end else 1), self.step)
        if self.remote is not None:
            self.remote.sync(final=False)

    def _save_dcp(self, completed_epochs: int, progress: Optional[Progress], ranks: List[Any], numbered: bool,
                  epoch_end: bool) -> None:
        """--fsdp: every process writes its shard into a Distributed Checkpoint folder; process 0 adds
        ``clipkit.pt`` (the rest of a .pt checkpoint) and swaps the complete folder into place as
        ``epoch_latest``, then copies it to ``epoch_N`` when numbered (as :meth:`save` does with files)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        # the model's own state_dict (FSDP2: its shards as DTensors), so keys keep OpenCLIP's layout;
        # the optimizer's keyed by parameter name
        model_state = self.module.state_dict()
        optim_state = get_optimizer_state_dict(self.module, self.optimizer)
        latest = self.ckpt_dir / ckpt.LATEST_DIR
        tmp = self.ckpt_dir / f"{ckpt.TMP_PREFIX}{ckpt.LATEST_DIR}"
        if self.env.main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            extras = self._payload(completed_epochs, progress, with_state=False)
            extras["clipkit"]["ranks"] = ranks
            ckpt.atomic_save(extras, tmp / ckpt.EXTRAS)
        distributed.barrier(self.env)  # the folder exists before anyone writes into it
        # DCP writes .metadata last, once every process's shard is written: its presence marks a whole checkpoint
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        if self.env.main:
            ckpt.swap_in(tmp, latest)
            if numbered:
                target = self.ckpt_dir / f"epoch_{completed_epochs}"
                copy = self.ckpt_dir / f"{ckpt.TMP_PREFIX}{target.name}"
                if copy.exists():
                    shutil.rmtree(copy)
                ckpt.copy_tree(latest, copy)
                ckpt.swap_in(copy, target)
                logger.info("saved %s", target)
                previous = self.ckpt_dir / f"epoch_{completed_epochs - 1}"
                if self.args.delete_previous_checkpoint and previous.is_dir():
                    shutil.rmtree(previous)
            else:
                logger.info("saved %s (epoch %d, step %d)", latest, completed_epochs + (0 if epoch_end else 1),
                            self.step)
            if self.remote is not None:
                self.remote.sync(final=False)
        distributed.barrier(self.env)

    def _load_weights(self, path: Path) -> Dict[str, Any]:
        """Weights and optimizer state from a .pt file or a --fsdp folder; the rest of the checkpoint."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)

        if path.is_dir():
            from torch.distributed.checkpoint.state_dict import _init_optim_state

            from . import _dcp

            data = ckpt.read_extras(path)
            # DCP fills in the tensors it is given: the optimizer needs its state (zeros) to receive the saved one
            _init_optim_state(self.optimizer)
            # this run's layout (sharded or not, any number of processes): DCP reads each its part; optimizer
            # state of parameters that were frozen then (no saved state) stays fresh
            state = {"model": self.module.state_dict(), "optim": get_optimizer_state_dict(self.module, self.optimizer)}
            with warnings.catch_warnings():  # one process without a group: DCP says it loads alone, as meant
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                _dcp.load(state, path, partial=True)  # as data only: never torch's plain unpickling
            bad = [k for k, v in state["model"].items()
                   if v.is_floating_point() and not torch.isfinite(_local(v)).all()]
            if distributed.all_agree(bool(bad), self.env):
                where = ", ".join(bad[:3]) if bad else "another process's shard"
                raise TrainingError(f"--resume {path}: non-finite values (NaN or inf) in {where}")
            self.module.load_state_dict(state["model"], strict=True)
            set_optimizer_state_dict(self.module, self.optimizer, state["optim"])
            return data
        from ..checkpoint import check_values, load_state_dict

        data = ckpt.read(path)
        state = data["state_dict"]
        if next(iter(state), "").startswith("module."):
            state = {k[len("module."):]: v for k, v in state.items()}
        extra = data.get("clipkit", {})
        if not self.args.fsdp:
            load_state_dict(self.module, state, strict=True, source=str(path))
            if "optimizer" in data:
                ckpt.load_optimizer(self.optimizer, data["optimizer"], extra.get("param_names"), self.names)
            return data
        # a whole checkpoint into a sharded model: every process reads the file and keeps its shards
        from torch.distributed.tensor import DTensor, distribute_tensor

        full = StateDictOptions(full_state_dict=True)
        current = self.module.state_dict()
        missing = sorted(set(current) - set(state))
        if missing:
            raise TrainingError(f"--resume {path}: the checkpoint lacks {len(missing)} of this model's weights "
                                f"({', '.join(missing[:3])})")
        check_values(current, state, {k for k, _ in self.module.named_parameters()}, str(path))
        state = {k: distribute_tensor(state[k].to(v.dtype), v.device_mesh, v.placements) if isinstance(v, DTensor)
                 else state[k].to(v.dtype) for k, v in current.items()}
        self.module.load_state_dict(state, strict=True)
        if "optimizer" in data and extra.get("param_names"):
            set_optimizer_state_dict(self.module, self.optimizer,
                                     ckpt.optimizer_to_fqn(data["optimizer"], extra["param_names"]), options=full)
        elif "optimizer" in data:
            logger.warning("%s has no optimizer parameter names (an OpenCLIP checkpoint?): under --fsdp the "
                           "optimizer starts fresh, the weights are restored", path)
        return data

    def _resume(self, path: Path) -> Optional[Progress]:
        """Load a checkpoint into the model, optimiser and scaler; the epoch's data progress if mid-epoch."""
        from .._provenance import PROVENANCE_KEY, check_provenance

        if path.is_dir():
            check_provenance(ckpt.read_extras(path).get(PROVENANCE_KEY), str(path))
        else:
            check_provenance(ckpt.read(path, mmap=True).get(PROVENANCE_KEY), str(path))
        data = self._load_weights(path)
        extra = data.get("clipkit", {})
        if self.scaler is not None and "scaler" in data:
            self.scaler.load_state_dict(data["scaler"])
        self.start_epoch = int(data.get("epoch", 0))
        self.step = int(extra.get("step", self.start_epoch * self.steps_per_epoch))
        mine = extra
        ranks = extra.get("ranks") or []
        if len(ranks) == self.env.world:
            mine = ranks[self.env.rank]
        elif self.env.distributed and ranks:
            logger.warning("the checkpoint was written by %d processes and this run has %d: every process resumes "
                           "from process 0's data position and generators", len(ranks), self.env.world)
        if "rng" in mine:
            ckpt.set_rng_state(mine["rng"])
        progress = Progress.from_state(mine["data"]) if mine.get("data") else None
        where = f"epoch {self.start_epoch + 1}, step {self.step}" if progress else f"after epoch {self.start_epoch}"
        logger.info("resumed from %s (%s)", path, where)
        done, every = self.start_epoch, self.args.save_frequency
        numbered = path.parent / f"epoch_{done}.pt"
        if (self.env.main and progress is None and self.ckpt_dir is not None and path == self.ckpt_dir / ckpt.LATEST
                and done > 0 and every > 0 and (done == self.args.epochs or done % every == 0)
                and not numbered.exists()):  # the run stopped between writing epoch_latest.pt and its copy
            ckpt.atomic_copy(path, numbered)
            logger.info("saved %s (the copy of %s the previous attempt did not finish)", numbered, path.name)
        return progress

    # the loop -----------------------------------------------------------------------------------
    def _forward_loss(self, images: torch.Tensor, texts: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        with self.autocast():
            out = self.model(images, texts)
            loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
        return loss, out

    def _check_finite(self, loss: torch.Tensor, epoch: int) -> None:
        bad = not bool(torch.isfinite(loss).item())
        if distributed.all_agree(bad, self.env):
            latest = ckpt.find_latest(self.ckpt_dir) if self.ckpt_dir is not None else None
            raise TrainingError(
                f"epoch {epoch + 1}, step {self.step + 1}: the loss is {loss.item() if bad else 'non-finite on another process'}; "
                f"stopping without saving. Last complete checkpoint: {latest or 'none'}. Try a lower --lr, "
                f"--grad-clip-norm or --precision amp_bf16, then --resume latest")

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _clip(self, max_norm: float) -> None:
        if not self.args.fsdp:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
            return
        # sharded gradients (DTensors) and the whole 0-d ones cannot go in one norm: combine the two
        from torch.nn.utils import clip_grads_with_norm_, get_total_norm

        replicated = {id(p) for p in self.replicated}
        params = [p for p in self.module.parameters() if p.grad is not None]
        sharded = [p for p in params if id(p) not in replicated]
        whole = [p for p in params if id(p) in replicated]
        norms = [_full(get_total_norm([p.grad for p in group])) for group in (sharded, whole) if group]
        total = torch.stack([n.to(torch.float32) for n in norms]).norm()
        clip_grads_with_norm_(sharded, max_norm, total)
        clip_grads_with_norm_(whole, max_norm, total)

    def _optimizer_step(self, epoch: int) -> None:
        args = self.args
        if args.fsdp and self.env.distributed:
            # FSDP averages the sharded gradients across processes; the 0-d parameters it leaves whole, here
            for p in self.replicated:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(self.env.world)
        if self.scaler is not None:
            if args.grad_clip_norm is not None:
                self.scaler.unscale_(self.optimizer)
                self._clip(args.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if args.grad_clip_norm is not None:
                self._clip(args.grad_clip_norm)
            self.optimizer.step()
        with torch.no_grad():  # OpenCLIP's clamp: a temperature below 1/100 destabilises training
            self.module.logit_scale.clamp_(0, math.log(100))

    def _step(self, micro: List[Tuple[torch.Tensor, torch.Tensor]], epoch: int) -> torch.Tensor:
        """One optimizer step over ``accum_freq`` batches (GradCache: the loss sees all of them)."""
        self.optimizer.zero_grad(set_to_none=True)
        if len(micro) == 1:
            loss, _ = self._forward_loss(*micro[0])
            self._check_finite(loss, epoch)
            self._backward(loss)
        else:
            with torch.no_grad(), self.autocast():
                cached = [self.model(images, texts) for images, texts in micro]
            last = len(micro) - 1
            for j, (images, texts) in enumerate(micro):
                # under DDP, gradients are all-reduced once, after the last micro-batch
                sync = contextlib.nullcontext() if j == last or not hasattr(self.model, "no_sync") else self.model.no_sync()
                with sync:
                    with self.autocast():
                        out = self.model(images, texts)
                        image = torch.cat([out["image_features"] if i == j else c["image_features"]
                                           for i, c in enumerate(cached)])
                        text = torch.cat([out["text_features"] if i == j else c["text_features"]
                                          for i, c in enumerate(cached)])
                        # every pass computes the whole loss, so the temperature (and bias) would collect
                        # its gradient accum_freq times (OpenCLIP does): only the last pass lets it through
                        scale, bias = out["logit_scale"], out.get("logit_bias")
                        if j != last:
                            scale, bias = scale.detach(), bias.detach() if bias is not None else None
                        loss = self.loss(image, text, scale, bias)
                    self._check_finite(loss, epoch)
                    self._backward(loss)
        self._optimizer_step(epoch)
        loss = loss.detach()
        if self.env.distributed and (self.args.siglip or self.args.local_loss):
            # each process's loss covers its own rows: their mean is the global loss that is logged
            torch.distributed.all_reduce(loss)
            loss = loss / self.env.world
        return loss

    def train_epoch(self, epoch: int, progress: Optional[Progress]) -> Progress:
        args, env = self.args, self.env
        self.model.train()
        loader = self.train_data
        accum = args.accum_freq
        steps = self.steps_per_epoch
        step_in_epoch = (progress.batches // accum) if progress is not None else 0
        micro: List[Tuple[torch.Tensor, torch.Tensor]] = []
        bar = _progress_bar(env.main, steps, step_in_epoch, epoch)
        losses: List[float] = []
        tick = time.perf_counter()
        data_time = 0.0
        for item in self._agreed(loader.epoch(epoch, progress)):
            images = item["images"].to(env.device, non_blocking=True)
            texts = item["texts"].to(env.device, non_blocking=True)
            if self.input_dtype is not None:
                images = images.to(self.input_dtype)
            micro.append((images, texts))
            if len(micro) < accum:
                continue
            data_time += time.perf_counter() - tick
            if not args.skip_scheduler:
                lr = learning_rate(args, self.step, self.total_steps, steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            loss = self._step(micro, epoch)
            micro = []
            self.step += 1
            step_in_epoch += 1
            losses.append(loss.item())
            batch_time = time.perf_counter() - tick
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step_in_epoch % args.log_every_n_steps == 0 or step_in_epoch == steps:
                scale = _local(self.module.logit_scale.detach())
                if args.fsdp:  # a shard: every process takes part in assembling it
                    scale = _full(self.module.logit_scale.detach())
                if env.main:
                    self._log_step(epoch, step_in_epoch, steps, losses, batch_time, data_time, images.shape[0] * accum,
                                   scale.exp().item())
            if step_in_epoch < steps:  # at an epoch's end the epoch's own checkpoint follows
                stop = self._stop_requested()
                if stop or args.save_every_n_steps and self.step % args.save_every_n_steps == 0:
                    self._agree(lambda: self._save(epoch, loader.progress, epoch_end=False), epoch,
                                "saving a checkpoint")
                if stop:
                    raise self._stopped(stop, epoch, step_in_epoch)
            data_time = 0.0
            tick = time.perf_counter()
        if bar is not None:
            bar.close()
        return loader.progress

    def _agreed(self, batches):
        """The batches, ended on every process as soon as one runs out (no process waits in a collective)."""
        if not self.env.distributed:
            yield from batches
            return
        iterator = iter(batches)
        while True:
            item = next(iterator, None)
            if distributed.all_agree(item is None, self.env):
                if item is not None:
                    logger.info("another process ran out of data: this epoch ends here on every process")
                return
            yield item

    def _log_step(self, epoch, step, steps, losses, batch_time, data_time, batch, scale) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        recent = losses[-self.args.log_every_n_steps:]
        sps = batch * self.env.world / max(batch_time, 1e-9)
        logger.info("epoch %d [%d/%d (%.0f%%)] loss %.4f (avg %.4f) lr %.3g logit scale %.2f | %.1f samples/s, "
                    "data %.3f s, batch %.3f s", epoch + 1, step, steps, 100 * step / max(1, steps), losses[-1],
                    sum(recent) / len(recent), lr, scale, sps, data_time, batch_time)
        self.reporter.scalars({"train/loss": losses[-1], "train/contrastive_loss": losses[-1], "train/lr": lr,
                               "train/scale": scale, "train/samples_per_second": sps,
                               "train/samples_per_second_per_gpu": sps / self.env.world,
                               "train/data_time": data_time, "train/batch_time": batch_time}, self.step)

    def _epoch_summary(self, epoch: int, progress: Progress) -> None:
        skipped = progress.skipped()
        bad = sum(v for k, v in skipped.items() if k != "bad_shard")
        dropped = sum(progress.dropped.values())
        seen = progress.samples + bad
        kinds = ", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"
        too_bad = bool(seen) and bad / seen > self.args.max_bad_sample_fraction
        if distributed.all_agree(too_bad, self.env) and not too_bad:
            raise DataError(f"epoch {epoch + 1}: another process found more than --max-bad-sample-fraction "
                            f"{self.args.max_bad_sample_fraction} of its samples unreadable; see its log")
        if not self.env.main and not too_bad:
            return
        logger.info("epoch %d data: %d samples in %d batches; skipped: %s; %d left over in partial batches",
                    epoch + 1, progress.samples, progress.batches, kinds, dropped)
        self.reporter.scalars({f"data/skipped_{k}": float(v) for k, v in skipped.items()} |
                              {"data/skipped": float(bad), "data/samples": float(progress.samples)}, self.step)
        if too_bad:
            raise DataError(f"epoch {epoch + 1}: {bad} of {seen} samples were unreadable ({kinds}), more than "
                            f"--max-bad-sample-fraction {self.args.max_bad_sample_fraction}; check --train-data")
        if self.train_data.num_batches and progress.batches < self.train_data.num_batches:
            logger.info("epoch %d ended after %d of %d batches: the data ran out (%d samples in partial per-worker "
                        "batches and skips)", epoch + 1, progress.batches, self.train_data.num_batches, dropped + bad)

    def run(self, argv: Optional[List[str]] = None) -> Dict[str, Any]:
        """Train (or evaluate) as the flags say. ``argv``, the command line, makes the resume hint
        of a stopped run the exact command to continue it."""
        args = self.args
        self.env = env = distributed.init(args)
        self.argv = argv
        self.reporter = None
        self.ckpt_dir: Optional[Path] = None
        self.step, self.epoch = 0, 0
        self.stage = "setting up"
        self.signals = distributed.StopSignals(self._signal_received, self._second_signal)
        restore_logging = None
        try:
            with self._writing("setting up the run folder"):
                run_dir, resume = _prepare_run_dir(args, env)
                self.ckpt_dir = run_dir / "checkpoints" if run_dir is not None else None
                log_file = None
                if run_dir is not None and (env.main or args.log_local):
                    log_file = run_dir / ("out.log" if not args.log_local or env.main and env.world == 1
                                          else f"out-{env.rank}.log")
                restore_logging = setup_logging(log_file, args.debug, env.rank, args.log_local)
            _guard_log_files()
            self.signals.install()  # they log: once the log file is open
            return self._start(run_dir, resume)
        except (Exception, distributed.Interrupted) as exc:
            if isinstance(exc, distributed.Interrupted):
                exc = self._interrupted(exc.signum)
            elif env.distributed and _lost_peer(exc):
                got = self.signals.received
                cause = (f"; it got {signal.Signals(got).name}, as torchrun sends when another process fails"
                         if got else "")
                exc = TrainingError(f"process {env.rank} lost contact with the others (one failed or was killed"
                                    f"{cause}): {str(exc).splitlines()[0][:300]}. Fix the cause and "
                                    f"{self._continue_with()}")
            elif isinstance(exc, OSError):
                exc = self._write_error(None, exc)
            if isinstance(exc, ClipkitError):
                stopped = isinstance(exc, RunStopped)
                if restore_logging is not None and (env.main or not stopped):
                    # in out.log too, not only on the terminal
                    (logger.warning if stopped else logger.error)("%s", exc)
                # a stopped run says so once, on process 0; the others end with the same exit code
                exc.logged = restore_logging is not None
                raise exc
            raise
        finally:
            self.signals.uninstall()
            if self.reporter is not None:
                self.reporter.close()
            distributed.shutdown(env)
            if restore_logging is not None:
                restore_logging()

    # stopping: signals, failed writes -------------------------------------------------------------
    def _continue_with(self) -> str:
        """How to go on from the last checkpoint: the command with ``--resume latest``."""
        if self.env.distributed or self.argv is None:
            return "rerun the same command with --resume latest"
        argv, kept = list(self.argv), []
        while argv:
            arg = argv.pop(0)
            if arg == "--resume":
                if argv:
                    argv.pop(0)
            elif not arg.startswith("--resume="):
                kept.append(arg)
        return "continue with: " + shlex.join(["clipkit-train", *kept, "--resume", "latest"])

    def _signal_received(self, signum: int) -> None:
        # the signal thread: the main thread may be busy for a whole step, so say now that it was heard
        logger.info("received %s: stopping after this step with a checkpoint (send SIGTERM or SIGINT again to "
                    "stop at once, without saving)", signal.Signals(signum).name)

    def _second_signal(self, signum: int) -> None:
        # the signal thread, while the main thread may wait in a collective: end the process from here
        where = f" in {self.ckpt_dir}" if self.ckpt_dir is not None else ""
        logger.error("stopped at once by a second %s at epoch %d, step %d, without saving; the last complete "
                     "checkpoint%s is kept: %s", signal.Signals(signum).name, self.epoch + 1, self.step, where,
                     self._continue_with())
        os._exit(128 + signum)

    def _interrupted(self, signum: int) -> RunStopped:
        """A signal outside the training steps: nothing to finish, the last checkpoint is all there is."""
        latest = ckpt.find_latest(self.ckpt_dir) if self.ckpt_dir is not None and self.ckpt_dir.is_dir() else None
        saved = f"the last checkpoint is {latest}" if latest else "no checkpoint was saved"
        go_on = f"; {self._continue_with()}" if self.args.train_data or self.args.dataset_type == "synthetic" else ""
        return RunStopped(f"stopped by {signal.Signals(signum).name} while {self.stage}; {saved}{go_on}")

    def _stop_requested(self) -> int:
        """The stop signal any process got (0: none); every process calls it at the same points."""
        return distributed.all_max(self.signals.received or 0, self.env)

    def _stopped(self, signum: int, epoch: int, step_in_epoch: int) -> RunStopped:
        if self.ckpt_dir is None:
            return RunStopped(f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1} step {step_in_epoch} "
                              f"(global step {self.step}); nothing saved (--logs is 'none')")
        return RunStopped(f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1} step {step_in_epoch} "
                          f"(global step {self.step}); checkpoint saved to "
                          f"{ckpt.find_latest(self.ckpt_dir) or self.ckpt_dir}; {self._continue_with()}")

    @contextlib.contextmanager
    def _writing(self, what: str):
        """A failed write (full disk, read-only folder) as one line that names it."""
        try:
            yield
        except OSError as exc:
            raise self._write_error(what, exc) from exc

    def _write_error(self, what: Optional[str], exc: OSError) -> TrainingError:
        path = f" ({exc.filename})" if exc.filename else ""
        latest = ckpt.find_latest(self.ckpt_dir) if self.ckpt_dir is not None and self.ckpt_dir.is_dir() else None
        resume = (f"after fixing it, --resume latest continues from the last complete checkpoint, {latest}" if latest
                  else "no checkpoint was saved yet")
        return TrainingError(f"{what + ' failed' if what else 'the run failed'}: {exc.strerror or exc}{path}; "
                             f"{resume}")

    def _start(self, run_dir: Optional[Path], resume: Optional[Path]) -> Dict[str, Any]:
        args, env = self.args, self.env
        if run_dir is not None and env.main:
            with self._writing("writing params.txt"):
                _write_params(args, run_dir)
            if args.copy_codebase:
                with self._writing("--copy-codebase"):
                    _copy_codebase(run_dir)
        # a typo in an evaluation flag fails now, not after an epoch of training
        self._agree(lambda: check_evaluation(args) if env.main or args.fsdp else None, None,
                    "checking the evaluation flags")
        resume = _remote_resume(args, env, run_dir, resume)
        if args.resume == "latest" and resume is None:
            logger.info("--resume latest: no checkpoint in %s yet, starting fresh", run_dir / "checkpoints")
        self.remote = None
        if args.remote_sync and env.main:
            from .remote import RemoteSync

            self.remote = RemoteSync(self.ckpt_dir, args.remote_sync, args.remote_sync_protocol,
                                     args.remote_sync_frequency)
        self.reporter = Reporter(args, run_dir, enabled=env.main)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data workers are forked
        return self._run(resume)

    def _run(self, resume: Optional[Path]) -> Dict[str, Any]:
        args, env = self.args, self.env
        from .._provenance import naming_missing_parts

        with naming_missing_parts(resume):  # a plugin missing for the checkpoint: its pip install line
            self._build()
        autocast_dtype, scaled, self.input_dtype = precision_setup(args.precision, env.device)
        if env.device.type == "cpu" and torch.bfloat16 in (autocast_dtype, self.input_dtype) and not _cpu_has_bf16():
            logger.warning("--precision %s computes in bf16, which this CPU emulates (no avx512_bf16/amx): expect it "
                           "to be many times slower than --precision fp32", args.precision)
        self.autocast = (lambda: torch.autocast(env.device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler("cuda") if scaled else None
        has_train = bool(args.train_data) or args.dataset_type == "synthetic"
        self.step, self.start_epoch = 0, 0
        self.train_data: Optional[Loader] = None
        if has_train:
            size = self.model.visual.image_size
            self.train_data = train_loader(args, self.preprocess_train, self.tokenizer, env.rank, env.world,
                                           size if isinstance(size, int) else max(size))
            self.steps_per_epoch = self.train_data.num_batches // args.accum_freq
            if self.steps_per_epoch == 0:
                raise DataError(f"--accum-freq {args.accum_freq} needs at least that many batches per epoch, "
                                f"but an epoch has {self.train_data.num_batches}")
            self.total_steps = self.steps_per_epoch * args.epochs
            if args.fsdp:  # the optimizer holds the sharded parameters
                self._wrap()
            self.optimizer, self.names = build_optimizer(args, self.model)
        if env.distributed and args.local_loss and not args.gather_with_grad:
            logger.warning("--local-loss without --gather-with-grad: gradients miss the terms other processes' "
                           "rows give this process's features; add --gather-with-grad for the exact gradient")
        self.loss = (SigLipLoss(rank=env.rank, world=env.world, dist_impl=args.loss_dist_impl) if args.siglip else
                     ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, rank=env.rank,
                              world=env.world))
        progress = None
        if resume is not None:
            if not has_train:
                raise TrainingError("--resume needs training data")
            if not args.fsdp:
                self.module = self.model
            progress = self._resume(resume)
        if not (args.fsdp and has_train):
            self._wrap()
        if not has_train:
            self.stage = "evaluating"
            return self._evaluate(0, final=True)
        logger.info("training %d epochs of %d steps (%d samples, batch %d x %d processes x %d accumulation)",
                    args.epochs, self.steps_per_epoch, self.train_data.num_samples, args.batch_size, env.world,
                    args.accum_freq)
        metrics: Dict[str, Any] = {}
        started = time.perf_counter()
        for epoch in range(self.start_epoch, args.epochs):
            self.epoch = epoch
            self.signals.defer = True  # a step and a save are finished before a signal is acted on
            done = self.train_epoch(epoch, progress)
            progress = None
            self._epoch_summary(epoch, done)
            # writing and evaluation happen on process 0: the others learn of its failure instead of
            # waiting for it in the next collective. The checkpoint comes first, so that a failed
            # evaluation never costs the epoch
            self._agree(lambda: self._save(epoch + 1, None, epoch_end=True), epoch, "saving a checkpoint")
            stop = self._stop_requested()
            if stop and epoch + 1 < args.epochs:  # after the last epoch the run finishes: nothing is left
                raise self._stopped(stop, epoch, done.batches // args.accum_freq)
            # the epoch is saved: a signal while evaluating it stops at once
            self.signals.defer, self.stage = False, f"evaluating epoch {epoch + 1}"
            metrics = self._agree(lambda: self._evaluate(epoch + 1, final=epoch + 1 == args.epochs), epoch, "evaluating")
        self.stage = "copying the run to --remote-sync"
        if self.remote is not None:
            self.remote.sync(final=True)
        if env.main:
            headline = "  ".join(f"{k} {metrics[k]:.4f}" for k in _HEADLINE if k in metrics)
            where = f"; checkpoints in {self.ckpt_dir}" if self.ckpt_dir is not None else ""
            if self.reporter.tb is not None:
                where += f"; TensorBoard: tensorboard --logdir {self.ckpt_dir.parent / 'tensorboard'}"
            logger.info("done: %d epochs in %.1f min%s%s", args.epochs - self.start_epoch,
                        (time.perf_counter() - started) / 60, f"; {headline}" if headline else "", where)
        return metrics

    def _agree(self, action: Callable[[], Any], epoch: Optional[int], what: str) -> Any:
        """Run ``action`` on every process; if it fails on any, it fails on all."""
        failure: Optional[BaseException] = None
        result = None
        try:
            result = action()
        except Exception as exc:
            failure = exc
        if distributed.all_agree(failure is not None, self.env):
            when = f"epoch {epoch + 1}: " if epoch is not None else ""
            raise failure or TrainingError(f"{when}another process failed while {what}; see its log")
        return result

    def _save(self, completed_epochs: int, progress: Optional[Progress], epoch_end: bool) -> None:
        with self._writing("saving a checkpoint"):
            self.save(completed_epochs, progress, epoch_end)

    def _evaluate(self, completed: int, final: bool) -> Dict[str, Any]:
        if not self.env.main and not self.args.fsdp:
            return {}
        # under --fsdp every process runs the same forward passes (each gathers the shards); process 0 reports
        metrics = evaluate(self, completed, final)
        if not self.env.main:
            return {}
        if metrics:
            logger.info("eval epoch %d: %s", completed,
                        "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
            self.reporter.scalars({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, self.step)
            with self._writing("writing results.jsonl"):
                self.reporter.result({**metrics, "epoch": completed, "step": self.step})
        return metrics


def _fully_shard(model: nn.Module, env) -> List[nn.Parameter]:
    """FSDP2: one ``fully_shard`` unit per entry of each tower's ``layer_groups()`` (its modules; bare
    parameters stay with the root), then the root, which holds everything else.

    FSDP2 cannot shard 0-d parameters (the temperature and the SigLIP bias): they stay whole on every
    process, and are returned, for the caller to average their gradients."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (env.world,))
    for tower in (getattr(model, "visual", None), getattr(model, "text", None)):
        groups = getattr(tower, "layer_groups", None)
        if groups is None:
            continue
        for entry in groups():
            modules = [m for m in entry if isinstance(m, nn.Module)
                       and any(True for _ in m.parameters())
                       and not any(isinstance(p, DTensor) for p in m.parameters())]  # not in a unit already
            if modules:
                fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh)
    scalars = [p for p in model.parameters() if p.ndim == 0 and not isinstance(p, DTensor)]
    fully_shard(model, mesh=mesh, ignored_params=set(scalars) or None)
    for method in ("encode_image", "encode_text"):  # evaluation calls these, not forward
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return scalars


def _local(t: torch.Tensor) -> torch.Tensor:
    """A tensor's part on this process (the tensor itself unless FSDP sharded it)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every process must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _progress_bar(main: bool, total: int, initial: int, epoch: int):
    import sys

    if not main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}", unit="step", leave=False)


def _guard_log_files() -> None:
    """A log file that cannot be written (a full disk) is given up with one line, and the log goes on
    on the terminal, instead of a "--- Logging error ---" traceback for every line."""
    for handler in logging.getLogger("clipkit").handlers:
        if isinstance(handler, logging.FileHandler) and getattr(handler, "_clipkit_train", False):
            handler.handleError = lambda record, handler=handler: _log_file_failed(handler)


def _log_file_failed(handler: logging.FileHandler) -> None:
    import sys

    error = sys.exc_info()[1]
    logging.getLogger("clipkit").removeHandler(handler)
    try:
        handler.close()  # flushes what it holds: that fails too
    except OSError:
        pass
    logger.error("cannot write %s: %s; the log goes to the terminal only from here on", handler.baseFilename,
                 getattr(error, "strerror", None) or error)


def _lost_peer(exc: BaseException) -> bool:
    """Whether an exception is a collective failing because another process is gone (or timed out)."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Connection reset by peer", "Connection closed by peer", "gloo", "NCCL", "Timed out", "timed out"))


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True  # not Linux: cannot tell, so say nothing
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _version() -> str:
    from .. import __version__

    return __version__


def run(args) -> Dict[str, Any]:
    return Run(args).run()
