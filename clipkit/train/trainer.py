"""The trainer: a shell whose constructor builds every part of a run from its slice of the settings, in
one place, and whose :meth:`Trainer.fit` runs the optimisation loop over them.

The parts: the run folder (:mod:`.run_folder`), the model and its tokenizer, number formats, optimizer
and objective (:mod:`.build`), the parallelism strategy (:mod:`.parallel`), the training data
(:mod:`.data`), the checkpointer (:mod:`.checkpointer`), evaluation (:mod:`.evaluate`) and the reporters
(:mod:`.report`). Around it, the :class:`~.session.Session` owns the processes, the log and the stop signals.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..errors import DataError, TrainingError
from . import distributed
from .build import Precision, build_model, build_objective, build_optimizer
from .checkpointer import Checkpointer, SavedParts, fetch_resume, find_resume
from .data import Progress, train_loader
from .data_sources import has_training_data
from .evaluate import EvalContext, Evaluator
from .lock_cache import LockCache, set_locked_modes, transform_is_random
from .lock_cache import build as build_lock_cache
from .objectives import ObjectiveContext
from .objectives.accumulate import gradcache_outputs
from .parallel import parallelism_for
from .report import build_reporters
from .run_folder import RunFolder
from .schedule import learning_rate
from .selection import objective_choice
from .session import Session
from .settings import Settings
from .step_log import DataWait, Interval, LoggedValues, NonFiniteWatch

if TYPE_CHECKING:
    from tqdm import tqdm

logger = logging.getLogger("clipkit.train")

# the metrics the closing log line repeats
_HEADLINE = ("zeroshot-top1", "zeroshot-top5", "imagenet-zeroshot-val-top1", "image_to_text_R@1", "text_to_image_R@1",
             "clip_val_loss")


class Trainer:
    """One run, built from its settings. ``fit()`` returns the final evaluation metrics (empty without
    evaluation data)."""

    def __init__(self, settings: Settings, session: Session):
        s, env = settings, session.env
        self.settings = settings
        self.session = session
        self.env = env
        self.position = session.position
        # resolved settings (clipkit.train.settings): the run and its model are named
        run_name, model_name = s.logging.name, s.model.model
        assert run_name is not None and model_name is not None

        # the run folder: process 0 locks it and decides where the run starts from; then the log
        self.folder = RunFolder.of(s.logging.logs, run_name)
        with session.writing("setting up the run folder"):
            found = session.on_main(lambda: find_resume(s.checkpoints.resume, self.folder.run_folder, s.distributed.fsdp,
                                                        owner=settings))
            session.start_logging(self.folder.log_file(env.rank, env.world, s.logging.log_local), s.logging.debug,
                                  s.logging.log_local)
        if self.folder.run_folder is not None and env.main:
            with session.writing("writing params.txt"):
                self.folder.write_settings(settings)
            if s.logging.copy_codebase:
                with session.writing("--copy-codebase"):
                    self.folder.copy_codebase()

        # a typo in an evaluation flag fails now, not after an epoch of training
        self.evaluator = Evaluator(s.evaluation, s.data)
        session.agree(lambda: self.evaluator.check() if env.main or s.distributed.fsdp else None, None,
                      "checking the evaluation flags")
        resume = session.on_main(lambda: fetch_resume(s.checkpoints.resume, s.checkpoints.remote_sync,
                                                      self.folder.run_folder, s.distributed.fsdp, found))
        if s.checkpoints.resume == "latest" and resume is None:
            logger.info("--resume latest: no checkpoint in %s yet, starting fresh", self.folder.checkpoints)
        self.remote = None
        checkpoints = self.folder.checkpoints  # there is one with --remote-sync (clipkit.train.args checks)
        if s.checkpoints.remote_sync and env.main and checkpoints is not None:
            from .remote import RemoteSync

            self.remote = RemoteSync(checkpoints, s.checkpoints.remote_sync,
                                     s.checkpoints.remote_sync_protocol, s.checkpoints.remote_sync_frequency)
        self.reporters = build_reporters(s.logging, self.folder, settings.flat(), enabled=env.main)
        session.on_close(self.reporters.close)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data workers are forked

        # the model, how its numbers are computed, and how it is spread over the processes
        from .._provenance import naming_missing_parts

        with naming_missing_parts(resume):  # a plugin missing for the checkpoint: its pip install line
            built = build_model(s.model, s.data.cache_dir, s.precision.precision, s.optimization.seed, env.device,
                                env.distributed, s.optimization.use_bn_sync, s.optimization.grad_checkpointing)
        self.model = built.model  # bare: what is saved, evaluated and clamped
        self.precision = Precision.of(s.precision.precision, env.device)
        self.parallel = parallelism_for(s.distributed.fsdp, s.distributed.ddp_static_graph, env)

        # the data, the optimizer (over the sharded parameters under FSDP), the objective
        self.train_data = None
        self.steps_per_epoch = self.total_steps = 0
        if has_training_data(s.data):
            size: Any = self.model.visual.image_size  # an int or (height, width): the tower contract
            # --lock-image-eval-preprocess: a locked image tower sees each image the same way every epoch (LiT)
            preprocess = built.preprocess_val if s.model.lock_image_eval_preprocess else built.preprocess_train
            self.train_data = train_loader(s.data, s.optimization.seed, preprocess, built.tokenizer,
                                           env.rank, env.world, size if isinstance(size, int) else max(size),
                                           pin_memory=env.device.type == "cuda")
            accum = s.optimization.accum_freq
            self.steps_per_epoch = (self.train_data.num_batches or 0) // accum  # a training loader knows it
            if self.steps_per_epoch == 0:
                raise DataError(f"--accum-freq {accum} needs at least that many batches per epoch, "
                                f"but an epoch has {self.train_data.num_batches}")
            self.total_steps = self.steps_per_epoch * s.optimization.epochs
        self.parallel.shard(self.model)
        # a torch.optim.Optimizer when there is training data, which is when fit() trains, else None
        self.optimizer: Any
        self.optimizer, param_names = (build_optimizer(s.optimization, self.model) if self.train_data is not None
                                       else (None, {}))
        choice = objective_choice(s.model, s.optimization)
        self.objective_name = choice.name
        self.objective = build_objective(choice, ObjectiveContext(
            rank=env.rank, world=env.world, device=str(env.device), precision=s.precision.precision,
            cache_dir=s.data.cache_dir, trust_remote_code=s.model.trust_remote_code))

        # training checkpoints, and where this run starts
        self.checkpointer = Checkpointer(
            s.checkpoints, self.folder.checkpoints, env=env, parallel=self.parallel,
            parts=SavedParts(self.model, self.optimizer, param_names, self.precision.scaler, self.objective),
            run_name=run_name, model_name=model_name, epochs=s.optimization.epochs, remote=self.remote)
        self.start_epoch = 0
        self.resumed_data: Optional[Progress] = None
        if resume is not None:
            if self.train_data is None:
                raise TrainingError("--resume needs training data")
            resumed = self.checkpointer.restore(resume, self.steps_per_epoch)
            self.start_epoch, self.position.step = resumed.epoch, resumed.step
            self.resumed_data = Progress.from_state(resumed.data) if resumed.data else None

        # locked computation done once: the locked towers' outputs cached per sample (see lock_cache)
        self.locked_sides = [side for side, on in (("image", s.model.lock_image), ("text", s.model.lock_text)) if on]
        self.lock_cache: Optional[LockCache] = None
        if self.train_data is not None:
            random_transform = s.model.lock_image and not s.model.lock_image_eval_preprocess and \
                transform_is_random(built.preprocess_train)
            cache_folder = self.folder.run_folder / "lock_cache" if self.folder.run_folder is not None else None
            self.lock_cache = build_lock_cache(self.model, settings, cache_folder, env.rank, env.world, env.device,
                                               random_transform, self.parallel.sharded)
            if self.lock_cache is not None:
                session.on_close(self.lock_cache.close)
        # what the training step calls: DDP around the model, and torch.compile around that
        # what DDP and torch.compile make of the model: called, and switched to train mode
        self.train_model: Any = self.parallel.wrap(self.model)
        if s.precision.torchcompile:
            if s.optimization.grad_checkpointing and env.distributed:
                from torch import _dynamo

                _dynamo.config.optimize_ddp = False  # DDP graph splitting breaks checkpointed blocks
            self.train_model = torch.compile(self.train_model, backend=s.precision.torchcompile_backend)
        # watched on the device, read on log steps (see step_log)
        self.nonfinite = NonFiniteWatch()
        size = self.model.visual.image_size
        # process 0 warns: the processes of a run step together, so they wait alike
        self.data_wait = DataWait(s.logging.data_wait_warn if env.main else 0.0, workers=s.data.workers,
                                  train_data=s.data.train_data, image_size=size if isinstance(size, int) else max(size))
        self.eval_context = EvalContext(model=self.model, preprocess=built.preprocess_val, tokenizer=built.tokenizer,
                                        device=env.device, autocast=self.precision.autocast,
                                        input_dtype=self.precision.input_dtype, seed=s.optimization.seed)

    # the run ------------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train (or, without training data, evaluate) as the settings say; the last evaluation's metrics."""
        s, env, session = self.settings, self.env, self.session
        if self.train_data is None:
            session.stage = "evaluating"
            return self._evaluate(0, final=True)
        opt = s.optimization
        logger.info("training %d epochs of %d steps (%d samples, batch %d x %d processes x %d accumulation)",
                    opt.epochs, self.steps_per_epoch, self.train_data.num_samples, s.data.batch_size, env.world,
                    opt.accum_freq)
        metrics: Dict[str, Any] = {}
        started = time.perf_counter()
        progress = self.resumed_data
        for epoch in range(self.start_epoch, opt.epochs):
            self.position.epoch = epoch
            session.signals.defer = True  # a step and a save are finished before a signal is acted on
            done = self.train_epoch(epoch, progress)
            progress = None
            if self.lock_cache is not None:
                self.lock_cache.report(epoch)
            self._epoch_summary(epoch, done)
            # writing and evaluation happen on process 0: the others learn of its failure instead of
            # waiting for it in the next collective. The checkpoint comes first, so that a failed
            # evaluation never costs the epoch
            session.agree(functools.partial(self._save, epoch + 1, None, epoch_end=True), epoch, "saving a checkpoint")
            stop = session.stop_requested()
            if stop and epoch + 1 < opt.epochs:  # after the last epoch the run finishes: nothing is left
                raise session.stopped(stop, epoch, done.batches // opt.accum_freq)
            # the epoch is saved: a signal while evaluating it stops at once
            session.signals.defer, session.stage = False, f"evaluating epoch {epoch + 1}"
            metrics = session.agree(functools.partial(self._evaluate, epoch + 1, final=epoch + 1 == opt.epochs), epoch,
                                    "evaluating")
        session.stage = "copying the run to --remote-sync"
        if self.remote is not None:
            self.remote.sync(final=True)
        if env.main:
            headline = "  ".join(f"{k} {metrics[k]:.4f}" for k in _HEADLINE if k in metrics)
            where = f"; checkpoints in {self.folder.checkpoints}" if self.folder.run_folder is not None else ""
            if "tensorboard" in s.logging.report_to.split(","):
                where += f"; TensorBoard: tensorboard --logdir {self.folder.tensorboard}"
            logger.info("done: %d epochs in %.1f min%s%s", opt.epochs - self.start_epoch,
                        (time.perf_counter() - started) / 60, f"; {headline}" if headline else "", where)
        return metrics

    def _save(self, completed_epochs: int, progress: Optional[Progress], epoch_end: bool) -> None:
        with self.session.writing("saving a checkpoint"):
            self.checkpointer.save(completed_epochs, self.position.step,
                                   progress.as_state() if progress is not None else None, epoch_end)
        if self.lock_cache is not None:  # after the checkpoint: entries are valid for any step of the run
            with self.session.writing("saving the lock cache"):
                self.lock_cache.save()

    def _evaluate(self, completed: int, final: bool) -> Dict[str, Any]:
        if not self.env.main and not self.parallel.sharded:
            return {}
        # a sharded model: every process runs the same forward passes (each gathers the shards); process 0 reports
        metrics = self.evaluator.run(self.eval_context, completed, final)
        if not self.env.main:
            return {}
        if metrics:
            logger.info("eval epoch %d: %s", completed,
                        "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
            self.reporters.scalars({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                                   self.position.step)
            with self.session.writing("writing results.jsonl"):
                self.reporters.result({**metrics, "epoch": completed, "step": self.position.step})
        return metrics

    # one epoch ----------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, progress: Optional[Progress]) -> Progress:
        opt, env, session = self.settings.optimization, self.env, self.session
        self.train_model.train()
        if not self.settings.model.lock_train_mode:  # locked parts compute without dropout (--lock-train-mode)
            set_locked_modes(self.model, self.locked_sides)
        loader = self.train_data
        assert loader is not None  # fit() trains only with training data
        accum = opt.accum_freq
        steps = self.steps_per_epoch
        every_n = self.settings.logging.log_every_n_steps
        save_every = self.settings.checkpoints.save_every_n_steps
        step_in_epoch = (progress.batches // accum) if progress is not None else 0
        micro: List[Tuple[torch.Tensor, torch.Tensor]] = []
        micro_keys: List[Optional[Dict[str, List[bytes]]]] = []  # the lock cache's, from the CPU batches
        bar = _progress_bar(env.main, steps, step_in_epoch, epoch)
        # nothing here reads a device tensor except on log steps, saves and the epoch's end: see step_log
        logged = LoggedValues(every_n)
        self.data_wait.start_epoch()
        # the epoch's data workers stop however it ends (a stop signal, an error): see Loader.epoch
        with contextlib.closing(loader.epoch(epoch, progress)) as batches:
            for item in self._agreed(self.data_wait.batches(batches)):
                if self.lock_cache is not None:
                    micro_keys.append(self.lock_cache.keys(item["images"], item["texts"]))
                images = item["images"].to(env.device, non_blocking=True)
                texts = item["texts"].to(env.device, non_blocking=True)
                if self.precision.input_dtype is not None:
                    images = images.to(self.precision.input_dtype)
                micro.append((images, texts))
                if len(micro) < accum:
                    continue
                if not opt.skip_scheduler:
                    lr = learning_rate(opt, self.position.step, self.total_steps, steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                loss, terms = self._step(micro, epoch, micro_keys)
                micro, micro_keys = [], []
                self.position.step += 1
                step_in_epoch += 1
                logged.add(loss, terms)
                self.data_wait.step()
                if bar is not None:
                    bar.update(1)
                if step_in_epoch % every_n == 0 or step_in_epoch == steps:
                    self._raise_if_nonfinite(epoch)
                    scale = self.parallel.logit_scale(self.model)  # every process: a sharded one is gathered
                    interval = self.data_wait.interval()
                    if env.main:
                        latest = self._log_step(epoch, step_in_epoch, steps, logged, scale, interval,
                                                images.shape[0] * accum)
                        if bar is not None:
                            bar.set_postfix(loss=f"{latest:.4f}")
                if step_in_epoch < steps:  # at an epoch's end the epoch's own checkpoint follows
                    stop = session.stop_requested()
                    if stop or save_every and self.position.step % save_every == 0:
                        self._raise_if_nonfinite(epoch)
                        session.agree(lambda: self._save(epoch, loader.progress, epoch_end=False), epoch,
                                      "saving a checkpoint")
                    if stop:
                        raise session.stopped(stop, epoch, step_in_epoch)
        if bar is not None:
            bar.close()
        self._raise_if_nonfinite(epoch)  # the epoch's checkpoint follows
        return loader.progress

    def _agreed(self, batches: Iterable[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        """The batches, ended on every process as soon as one runs out (no process waits in a collective)."""
        if not self.env.distributed:
            yield from batches
            return
        iterator = iter(batches)
        while True:
            item = next(iterator, None)
            if distributed.all_agree(item is None, self.env) or item is None:  # true on every process at once
                if item is not None:
                    logger.info("another process ran out of data: this epoch ends here on every process")
                return
            yield item

    # one step -----------------------------------------------------------------------------------------
    def _outputs(self, model: Any, images: torch.Tensor, texts: torch.Tensor, extras: Dict[str, torch.Tensor],
                 keys: Optional[Dict[str, List[bytes]]] = None) -> Dict[str, torch.Tensor]:
        """What the objective sees: the model's outputs (those it has) merged with the objective's extras.
        ``keys``: the micro-batch's rows as the lock cache knows them."""
        with self.lock_cache.batch(keys) if self.lock_cache is not None else contextlib.nullcontext():
            out = model(images, texts)
        return {**{k: v for k, v in out.items() if isinstance(v, torch.Tensor)}, **extras}

    def _terms(self, outputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The objective's loss terms, and their sum (the loss back-propagated)."""
        missing = [key for key in self.objective.needs if outputs.get(key) is None]
        if missing:  # the first step stops here, before any update: the model and objective do not fit
            raise TrainingError(f"objective {self.objective_name!r} needs {', '.join(missing)}, which neither the "
                                f"model ({type(self.model).__name__}) nor the objective's extras give (the step "
                                f"has: {', '.join(sorted(outputs))}); choose an --objective this model trains with")
        terms = self.objective(outputs)
        bad = ([repr(k) for k, v in terms.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
                or v.dim() != 0] if isinstance(terms, dict) and terms else ["(none)"])
        if bad:
            raise TrainingError(f"objective {self.objective_name!r} returned {', '.join(bad)}: an objective "
                                f"returns a non-empty dict of named 0-d tensors (its loss terms)")
        values = iter(terms.values())
        loss = next(values)
        for term in values:
            loss = loss + term
        return loss, terms

    def _check_finite(self, loss: torch.Tensor, epoch: int) -> None:
        """Note a non-finite loss on the device; :meth:`_raise_if_nonfinite` acts on it (no sync per step)."""
        self.nonfinite.observe(loss, self.position.step + 1)

    def _raise_if_nonfinite(self, epoch: int) -> None:
        """Stop the run if a loss since the start was non-finite, here or on another process. Called on log
        steps and before every save, on every process: the steps after the bad one changed only weights
        that are never saved."""
        first = self.nonfinite.first()
        if distributed.all_agree(first is not None, self.env):
            latest = self.session.latest()
            where = (f"step {first[0]}: the loss is {first[1]}" if first is not None else
                     f"at or before step {self.position.step}: the loss is non-finite on another process")
            raise TrainingError(
                f"epoch {epoch + 1}, {where}; stopping without saving. Last complete checkpoint: {latest or 'none'}. "
                f"Try a lower --lr, --grad-clip-norm or --precision amp_bf16, then --resume latest")

    def _backward(self, loss: torch.Tensor) -> None:
        scaler = self.precision.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def _optimizer_step(self) -> None:
        clip, scaler = self.settings.optimization.grad_clip_norm, self.precision.scaler
        self.parallel.before_step(self.model)
        if scaler is not None:
            if clip is not None:
                scaler.unscale_(self.optimizer)
                self.parallel.clip_grad_norm(self.model, clip)
            scaler.step(self.optimizer)
            scaler.update()
        else:
            if clip is not None:
                self.parallel.clip_grad_norm(self.model, clip)
            self.optimizer.step()
        with torch.no_grad():  # OpenCLIP's clamp: a temperature below 1/100 destabilises training
            self.model.logit_scale.clamp_(0, math.log(100))

    def _step(self, micro: Sequence[Tuple[torch.Tensor, torch.Tensor]], epoch: int,
              keys: Optional[Sequence[Optional[Dict[str, List[bytes]]]]] = None
              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One optimizer step over ``accum_freq`` batches (GradCache: the objective sees all of them); the
        loss and its terms, as logged (averaged over processes for a per-process objective). ``keys``: the
        lock cache's, one entry per micro-batch."""
        model, autocast = self.train_model, self.precision.autocast
        keys = list(keys) if keys else [None] * len(micro)
        self.optimizer.zero_grad(set_to_none=True)
        # the objective's extras (a teacher's features): once per micro-batch, constants of the step
        with torch.no_grad(), autocast():
            extras = [self.objective.extra_forward({"images": images, "texts": texts}) for images, texts in micro]
        if len(micro) == 1:
            with autocast():
                loss, terms = self._terms(self._outputs(model, *micro[0], extras[0], keys[0]))
            self._check_finite(loss, epoch)
            self._backward(loss)
        else:
            with torch.no_grad(), autocast():
                cached = [self._outputs(model, images, texts, extra, key)
                          for (images, texts), extra, key in zip(micro, extras, keys)]
            last = len(micro) - 1
            for j, (images, texts) in enumerate(micro):
                # under DDP, gradients are all-reduced once, after the last micro-batch
                sync = contextlib.nullcontext() if j == last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    with autocast():
                        live = self._outputs(model, images, texts, extras[j], keys[j])
                        loss, terms = self._terms(gradcache_outputs(cached, live, j))
                    self._check_finite(loss, epoch)
                    self._backward(loss)
        self._optimizer_step()
        logged = torch.stack([loss.detach().float(), *(term.detach().float() for term in terms.values())])
        if self.env.distributed and self.objective.per_process:
            # each process's terms cover its own rows: their mean is the global value that is logged
            torch.distributed.all_reduce(logged)
            logged = logged / self.env.world
        return logged[0], dict(zip(terms, logged[1:]))

    # reporting ----------------------------------------------------------------------------------------
    def _log_step(self, epoch: int, step: int, steps: int, logged: LoggedValues, scale: torch.Tensor,
                  interval: Interval, batch: int) -> float:
        """The log line and the reporters' scalars of a log step; returns the step's loss. Times are means over
        the steps since the last log line: with the device running ahead of the host, one step's time means
        little."""
        loss, mean, terms, (scale_exp,) = logged.read(scale.exp())
        lr = self.optimizer.param_groups[0]["lr"]
        batch_time = interval.wall / max(1, interval.steps)
        data_time = interval.waited / max(1, interval.steps)
        wait = interval.wait_fraction
        sps = batch * self.env.world / max(batch_time, 1e-9)
        logger.info("epoch %d [%d/%d (%.0f%%)] loss %.4f (avg %.4f) lr %.3g logit scale %.2f | %.1f samples/s, "
                    "data %.3f s, batch %.3f s, data wait %.0f%%", epoch + 1, step, steps, 100 * step / max(1, steps),
                    loss, mean, lr, scale_exp, sps, data_time, batch_time, 100 * wait)
        self.reporters.scalars({"train/loss": loss, **{f"train/{k}": v for k, v in terms.items()},
                                "train/lr": lr, "train/scale": scale_exp, "train/samples_per_second": sps,
                                "train/samples_per_second_per_gpu": sps / self.env.world,
                                "train/data_time": data_time, "train/batch_time": batch_time,
                                "train/data_wait_fraction": wait}, self.position.step)
        return loss

    def _epoch_summary(self, epoch: int, progress: Progress) -> None:
        limit = self.settings.data.max_bad_sample_fraction
        skipped = progress.skipped()
        bad = sum(v for k, v in skipped.items() if k != "bad_shard")
        dropped = sum(progress.dropped.values())
        seen = progress.samples + bad
        kinds = ", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"
        too_bad = bool(seen) and bad / seen > limit
        if distributed.all_agree(too_bad, self.env) and not too_bad:
            raise DataError(f"epoch {epoch + 1}: another process found more than --max-bad-sample-fraction "
                            f"{limit} of its samples unreadable; see its log")
        if not self.env.main and not too_bad:
            return
        logger.info("epoch %d data: %d samples in %d batches; skipped: %s; %d left over in partial batches",
                    epoch + 1, progress.samples, progress.batches, kinds, dropped)
        self.reporters.scalars({f"data/skipped_{k}": float(v) for k, v in skipped.items()} |
                               {"data/skipped": float(bad), "data/samples": float(progress.samples)},
                               self.position.step)
        if too_bad:
            raise DataError(f"epoch {epoch + 1}: {bad} of {seen} samples were unreadable ({kinds}), more than "
                            f"--max-bad-sample-fraction {limit}; check --train-data")
        expected = self.train_data.num_batches if self.train_data is not None else None
        if expected and progress.batches < expected:
            logger.info("epoch %d ended after %d of %d batches: the data ran out (%d samples in partial per-worker "
                        "batches and skips)", epoch + 1, progress.batches, expected, dropped + bad)


def _progress_bar(main: bool, total: int, initial: int, epoch: int) -> Optional[tqdm[Any]]:
    import sys

    if not main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}", unit="step", leave=False)


def run(settings: Settings, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train (or evaluate) as ``settings`` say. ``argv``, the command line, makes the resume hint of a
    stopped run the exact command to continue it."""
    resumable = has_training_data(settings.data)
    checkpoints = RunFolder.of(settings.logging.logs, settings.logging.name).checkpoints
    with Session(settings.distributed, checkpoints, resumable, argv) as session:
        return Trainer(settings, session).fit()
