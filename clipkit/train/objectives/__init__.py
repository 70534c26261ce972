"""Objectives: what a training step computes from a batch (features in, named loss terms out).

An objective is built once per process by a factory, ``factory(options, ctx) -> Objective``:
``options`` is an instance of the objective's options dataclass (fields declared with ``option()``,
as in model configs; validated before the call) and ``ctx`` an :class:`ObjectiveContext`
(rank, world size, and how to build a model through clipkit's factory, e.g. a distillation teacher).

Each step, the trainer hands the objective one mapping of tensors, ``outputs``: the model's outputs
(``image_features``, ``text_features``, ``logit_scale`` and ``logit_bias`` when the model has one)
merged with whatever the objective's own :meth:`Objective.extra_forward` computed from the raw batch
(a teacher's features). The objective returns its loss terms by name; the trainer back-propagates
their sum and logs each term as ``train/<name>`` and the sum as ``train/loss``.

Accumulation (``--accum-freq``, GradCache) works on outputs alone, which is why an objective sees
features and never the model. ``logit_scale`` and ``logit_bias`` (:data:`PER_STEP`) belong to the
step: on every pass but the last they are detached, so their gradient is counted once. Every other
entry is per-sample, its first dimension the batch: on every pass the trainer concatenates the
micro-batches' ones, the pass's own with gradient and the others cached without
(:func:`clipkit.train.objectives.accumulate.gradcache_outputs`). ``extra_forward`` runs once per
micro-batch, under ``torch.no_grad()`` and the trainer's autocast, and returns per-sample tensors only;
they are constants of the step.

The builtins are :data:`BUILTIN_OBJECTIVES`, described as a third party registers its own: a name,
a lazy ``"package.module:attr"`` factory and options class. This module imports no torch: plugin
modules, ``clipkit plugins`` and config checks read it; the factories import torch when called.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, Literal, Mapping, Optional, Protocol, Tuple

from ..._typed import option
from ...errors import ClipkitError, TrainingError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from ...model import ClipModel

logger = logging.getLogger("clipkit.train")

#: The model outputs the contrastive objectives read; ``logit_bias`` is used too when the model has one.
FEATURES = ("image_features", "text_features", "logit_scale")
#: The outputs that belong to the step, not to a sample (the model's learned temperature and bias).
PER_STEP = ("logit_scale", "logit_bias")


@dataclass(frozen=True)
class ObjectiveContext:
    """What the trainer tells an objective's factory.

    Attributes:
        rank, world: this process's rank and the number of processes (the default process group).
        device: where the run computes (``"cpu"``, ``"cuda:0"``); a teacher is built there.
        precision: the run's ``--precision``; a teacher is built in it, as OpenCLIP does.
        cache_dir: where hub downloads go, when the user chose (``--cache-dir``).
        trust_remote_code: whether the user let HuggingFace repositories run their own code.
    """

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    cache_dir: Optional[str] = None
    trust_remote_code: bool = False

    def create_model(self, name: str, pretrained: str, *, what: str = "model") -> ClipModel:
        """A model built by clipkit's factory (any name ``create_model`` takes), its pretrained
        weights required, on this context's device and in its precision, returning dicts from
        ``forward``. Errors are :class:`TrainingError` lines that start with ``what`` and the name."""
        from ...factory import create_model

        try:
            model: ClipModel = create_model(name, pretrained, precision=self.precision, device=self.device,
                                            cache_dir=self.cache_dir, output_dict=True, require_pretrained=True,
                                            trust_remote_code=self.trust_remote_code)
            return model
        except ClipkitError as exc:
            raise TrainingError(f"{what} {name!r} (pretrained {pretrained!r}): {exc}") from exc


class Objective(Protocol):
    """What a training step computes. Subclass :class:`BaseObjective` for the optional parts' defaults.

    Attributes:
        needs: the keys of ``outputs`` it reads (model outputs and its own extras); the trainer may
            check them against the model once.
        per_process: true when, on several processes, each process's terms cover its own samples
            only, so the value to log is their mean over processes; false when every process
            computes the terms of the global batch already.
    """

    needs: Tuple[str, ...]
    per_process: bool

    def __call__(self, outputs: Mapping[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
        """The loss terms by name (0-d tensors); the step minimises their sum."""

    def extra_forward(self, batch: Mapping[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
        """Per-sample tensors (first dimension the batch) computed from the raw micro-batch
        (``images``, ``texts``), merged into ``outputs``; called once per micro-batch under
        ``torch.no_grad()``."""

    def state_dict(self) -> Dict[str, Any]:
        """State to keep in training checkpoints (empty when there is none)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class ObjectiveFactory(Protocol):
    """A registered objective's factory: ``factory(options, ctx)``, ``options`` an instance of the
    options class registered with it."""

    def __call__(self, options: Any, ctx: ObjectiveContext) -> Objective: ...


class BaseObjective:
    """Defaults for an objective without extra forward pass or state; subclasses define
    ``__call__``, ``name`` (for messages), ``needs`` and ``per_process``."""

    name = "objective"
    needs: Tuple[str, ...] = FEATURES
    per_process = False

    def extra_forward(self, batch: Mapping[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:  # a checkpoint written with another objective: its state would be silently lost
            raise TrainingError(f"objective {self.name!r} keeps no state, but the checkpoint has objective state "
                                f"({', '.join(sorted(state))}): it was written by another objective")

    def inputs(self, outputs: Mapping[str, "torch.Tensor"]) -> Tuple["torch.Tensor", ...]:
        """``outputs[k]`` for every ``k`` in ``needs``, or a one-line error naming what is missing."""
        missing = [key for key in self.needs if outputs.get(key) is None]
        if missing:
            raise TrainingError(f"objective {self.name!r} needs {', '.join(missing)}, which the step's outputs "
                                f"lack (they have: {', '.join(sorted(k for k in outputs if outputs[k] is not None))})")
        return tuple(outputs[key] for key in self.needs)


# -- the builtins' options ---------------------------------------------------------------------------
@dataclass
class ClipOptions:
    """Options of the ``clip`` objective (OpenCLIP's softmax contrastive loss)."""

    local_loss: bool = option(False, "Each process scores its own samples against the global batch (--local-loss): "
                                     "memory linear in the global batch.")
    gather_with_grad: bool = option(False, "Back-propagate through the gathering of other processes' features "
                                           "(--gather-with-grad).")


@dataclass
class SigLipOptions:
    """Options of the ``siglip`` objective (the pairwise sigmoid loss)."""

    dist_impl: Optional[Literal["bidir", "shift", "reduce", "gather"]] = option(
        None, "How texts travel between processes (--loss-dist-impl): a ring ('bidir', the default, or 'shift') "
              "or all at once ('gather', 'reduce').")


@dataclass
class DistillOptions:
    """Options of the ``distill`` objective (OpenCLIP's ``DistillClipLoss``)."""

    model: str = option(doc="The teacher: a model name, as for --model (--distill-model).")
    pretrained: str = option(doc="The teacher's weights: a pretrained tag or a file (--distill-pretrained).")
    local_loss: bool = option(False, "As for the clip objective (--local-loss).")
    gather_with_grad: bool = option(False, "As for the clip objective (--gather-with-grad).")

    def check(self) -> Iterator[Tuple[str, str]]:
        for key in ("model", "pretrained"):
            if not getattr(self, key).strip():
                yield key, "must not be empty"


# -- the builtins' factories (torch is imported when they are called) --------------------------------
def _warn_partial_gradient(local_loss: bool, gather_with_grad: bool, ctx: ObjectiveContext) -> None:
    if ctx.world > 1 and local_loss and not gather_with_grad:
        logger.warning("--local-loss without --gather-with-grad: gradients miss the terms other processes' "
                       "rows give this process's features; add --gather-with-grad for the exact gradient")


def build_clip(options: ClipOptions, ctx: ObjectiveContext) -> Objective:
    """The ``clip`` objective: term ``contrastive_loss``, OpenCLIP's ``ClipLoss``."""
    from .contrastive import ClipObjective

    _warn_partial_gradient(options.local_loss, options.gather_with_grad, ctx)
    return ClipObjective(local_loss=options.local_loss, gather_with_grad=options.gather_with_grad,
                         rank=ctx.rank, world=ctx.world)


def build_siglip(options: SigLipOptions, ctx: ObjectiveContext) -> Objective:
    """The ``siglip`` objective: term ``contrastive_loss``, OpenCLIP's ``SigLipLoss``."""
    from .contrastive import SigLipObjective

    return SigLipObjective(dist_impl=options.dist_impl, rank=ctx.rank, world=ctx.world)


def build_distill(options: DistillOptions, ctx: ObjectiveContext) -> Objective:
    """The ``distill`` objective: terms ``contrastive_loss`` and ``distill_loss``, OpenCLIP's
    ``DistillClipLoss``, against a frozen teacher built by ``ctx.create_model``."""
    from .distill import DistillObjective

    _warn_partial_gradient(options.local_loss, options.gather_with_grad, ctx)
    teacher = ctx.create_model(options.model, options.pretrained, what="distill teacher")
    return DistillObjective(teacher, teacher_name=options.model, local_loss=options.local_loss,
                            gather_with_grad=options.gather_with_grad, rank=ctx.rank, world=ctx.world)


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective as a plugin registers it: ``register(name, factory, config=config)``."""

    name: str
    factory: str
    config: str


BUILTIN_OBJECTIVES: Tuple[ObjectiveSpec, ...] = (
    ObjectiveSpec("clip", f"{__name__}:build_clip", f"{__name__}:ClipOptions"),
    ObjectiveSpec("siglip", f"{__name__}:build_siglip", f"{__name__}:SigLipOptions"),
    ObjectiveSpec("distill", f"{__name__}:build_distill", f"{__name__}:DistillOptions"),
)


def register_builtin_objectives(register: Any) -> None:
    """Register the builtins through a ``register`` callback, as a third party's hook does."""
    for spec in BUILTIN_OBJECTIVES:
        register(spec.name, spec.factory, config=spec.config)
