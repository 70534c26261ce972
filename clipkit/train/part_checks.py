"""The contract checks of the trainer's kinds (``objective``, ``reporter``), behind ``clipkit.testing``'s
cases. Each part is built small, on one CPU process, and held to its protocol; every failure is a
:class:`~clipkit.errors.ContractError` naming the part, its plugin and the rule.

An objective is built from its registered ``example=`` options (or the ``section`` a case is run with,
else its options class's defaults) and fed random unit-norm features of :data:`BATCH` samples
(:data:`EMBED_DIM` wide), a logit scale (and a logit bias when it reads one), and extras from its own
``extra_forward`` on a batch of :data:`IMAGE_SIZE`-pixel images and :data:`CONTEXT`-token texts.
"""
from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from ..errors import ClipkitError, ContractError
from ..registry import Entry

EMBED_DIM = 24
BATCH = 4
IMAGE_SIZE = 32
CONTEXT = 16
VOCAB = 100


def _fail(entry: Entry, contract: str, detail: str) -> ContractError:
    return ContractError(f"{entry.where} breaks the contract '{contract}': {detail}")


# -- objectives -----------------------------------------------------------------------------------------------
def _objective(entry: Entry, section: Optional[Mapping[str, Any]]) -> Any:
    from .._typed import validate
    from .objectives import ObjectiveContext

    options: Any = None
    try:
        cls = entry.config_class()
        data = dict(section if section is not None else entry.meta.get("example") or {})
        if cls is not None:
            options, problems = validate(cls, data, "", f"objective {entry.name!r}")
            if problems:
                raise ClipkitError("; ".join(str(p) for p in problems) + " (register example={...} options it "
                                   "builds from, or run the case with a section)")
        objective = entry.load()(options, ObjectiveContext())
    except ClipkitError as exc:
        raise _fail(entry, "builds", str(exc)) from exc
    except Exception as exc:
        raise _fail(entry, "builds", f"building raised {exc!r}") from exc
    for attr in ("needs", "per_process", "extra_forward", "state_dict", "load_state_dict"):
        if not hasattr(objective, attr):
            raise _fail(entry, "builds", f"the object it returns ({type(objective).__name__}) has no {attr!r}")
    if not callable(objective):
        raise _fail(entry, "builds", f"the object it returns ({type(objective).__name__}) is not callable")
    return objective


def _batch(seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
            "texts": torch.randint(3, VOCAB, (BATCH, CONTEXT), generator=g)}


def _outputs(entry: Entry, objective: Any, seed: int = 0, contract: str = "terms") -> Dict[str, torch.Tensor]:
    """Leaf features with gradient, a learned scale (and bias when the objective reads one), and its extras."""
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(BATCH, EMBED_DIM, generator=g), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(BATCH, EMBED_DIM, generator=g), dim=-1).requires_grad_()
    out = {"image_features": image, "text_features": text,
           "logit_scale": torch.tensor(math.log(10.0)).exp().detach().requires_grad_()}
    if "logit_bias" in tuple(objective.needs):
        out["logit_bias"] = torch.tensor(-1.0, requires_grad=True)
    example_outputs = getattr(objective, "example_outputs", None)
    if callable(example_outputs):  # outputs a model family adds (a decoder's logits), for objectives that read them
        out.update(example_outputs(BATCH, g))
    try:
        with torch.no_grad():
            extras = objective.extra_forward(_batch(seed))
    except Exception as exc:
        raise _fail(entry, contract, f"extra_forward raised {exc!r}") from exc
    if not isinstance(extras, Mapping):
        raise _fail(entry, contract, f"extra_forward returned {type(extras).__name__}, not a mapping of tensors")
    for key, value in extras.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != BATCH:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise _fail(entry, contract, f"extra_forward's {key!r} is {shape}: extras are per-sample tensors, "
                                         f"their first dimension the batch ({BATCH})")
    missing = [k for k in objective.needs if k not in out and k not in extras]
    if missing:
        raise _fail(entry, contract, f"it needs {', '.join(missing)}, which neither the model's outputs "
                                     f"(image_features, text_features, logit_scale, logit_bias) nor its extra_forward give")
    return {**out, **extras}


def _terms(entry: Entry, objective: Any, outputs: Mapping[str, torch.Tensor], contract: str) -> Dict[str, torch.Tensor]:
    try:
        terms = objective(outputs)
    except Exception as exc:
        raise _fail(entry, contract, f"calling it raised {exc!r}") from exc
    if not isinstance(terms, dict) or not terms:
        raise _fail(entry, contract, f"it returned {type(terms).__name__}, not a non-empty dict of loss terms")
    for name, value in terms.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise _fail(entry, contract, f"term name {name!r} is not a plain name (it is logged as train/<name>)")
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise _fail(entry, contract, f"term {name!r} is {shape}, not a 0-d tensor")
        if not torch.isfinite(value):
            raise _fail(entry, contract, f"term {name!r} is {value.item()} on random features")
    return terms


def _total(terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(terms.values())).sum()


def _check_terms(entry: Entry, section: Any) -> None:
    objective = _objective(entry, section)
    first = _terms(entry, objective, _outputs(entry, objective), "terms")
    again = _terms(entry, objective, _outputs(entry, objective), "terms")
    if first.keys() != again.keys() or not all(torch.equal(first[k], again[k]) for k in first):
        raise _fail(entry, "terms", "the same outputs gave different terms on a second call")


def _check_gradients(entry: Entry, section: Any) -> None:
    objective = _objective(entry, section)
    outputs = _outputs(entry, objective, contract="gradients")
    _total(_terms(entry, objective, outputs, "gradients")).backward()
    for key in ("image_features", "text_features", "logit_scale"):
        grad = outputs[key].grad
        if grad is None or not torch.isfinite(grad).all() or not grad.abs().sum() > 0:
            what = "no gradient" if grad is None else "a zero or non-finite gradient"
            raise _fail(entry, "gradients", f"{key} gets {what} from the sum of its terms: the model would not learn")


def _check_accumulation(entry: Entry, section: Any) -> None:
    """GradCache over two micro-batches gives the terms of the whole batch and, summed over the passes,
    its gradient (the trainer's ``--accum-freq``)."""
    from .objectives.accumulate import gradcache_outputs

    objective = _objective(entry, section)
    whole = _outputs(entry, objective, contract="accumulation")
    reference = _terms(entry, objective, whole, "accumulation")
    _total(reference).backward()
    half = BATCH // 2
    leaves = {k: v.detach().clone().requires_grad_() for k, v in whole.items() if v.requires_grad}
    parts = [{k: (leaves.get(k, v) if k in ("logit_scale", "logit_bias") else leaves.get(k, v)[i * half:(i + 1) * half])
              for k, v in whole.items()} for i in range(2)]
    cached = [{k: v.detach() for k, v in part.items()} for part in parts]
    for j in range(2):
        terms = _terms(entry, objective, gradcache_outputs(cached, parts[j], j), "accumulation")
        for name in reference:
            if name not in terms or not torch.allclose(terms[name], reference[name], atol=1e-5, rtol=1e-4):
                raise _fail(entry, "accumulation", f"term {name!r} of an accumulation pass differs from the whole "
                                                   f"batch's: a term must depend only on the concatenated outputs")
        _total(terms).backward()
    for key, leaf in leaves.items():
        got, want = leaf.grad, whole[key].grad
        if got is None or want is None or not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
            raise _fail(entry, "accumulation", f"the gradient of {key} over two accumulation passes differs from "
                                               f"the whole batch's")


def _check_state_dict(entry: Entry, section: Any) -> None:
    objective = _objective(entry, section)
    try:
        state = objective.state_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise _fail(entry, "state-dict", f"its state_dict() cannot be saved in a training checkpoint and loaded "
                                         f"with weights_only=True: {exc!r}") from exc
    fresh = _objective(entry, section)
    try:
        fresh.load_state_dict(restored)
    except Exception as exc:
        raise _fail(entry, "state-dict", f"load_state_dict(its own state_dict()) raised {exc!r}") from exc
    outputs = _outputs(entry, objective, contract="state-dict")
    a, b = _terms(entry, objective, outputs, "state-dict"), _terms(entry, fresh, outputs, "state-dict")
    if a.keys() != b.keys() or not all(torch.allclose(a[k], b[k]) for k in a):
        raise _fail(entry, "state-dict", "an objective restored from its state_dict() gives other terms")


OBJECTIVE_CHECKS: Dict[str, Callable[[Entry, Any], None]] = {
    "builds": lambda entry, section: _objective(entry, section) and None,
    "terms": _check_terms,
    "gradients": _check_gradients,
    "accumulation": _check_accumulation,
    "state-dict": _check_state_dict,
}


# -- reporters ---------------------------------------------------------------------------------------------------
def _reporter(entry: Entry, folder: Path) -> Tuple[Any, Any]:
    from .report import ReporterContext

    ctx = ReporterContext(folder / "run", "contract-run", {"wandb_project_name": "clipkit-contract", "wandb_notes": ""})
    required = entry.meta.get("requires")
    if required:
        import importlib.util

        if importlib.util.find_spec(required) is None:
            # without its package the factory must say so in one line rather than fail later
            try:
                entry.load()(ctx)
            except ClipkitError as exc:
                if "\n" in str(exc):
                    raise _fail(entry, "builds", f"its error without {required} is several lines: {exc}") from exc
                return None, ctx
            except Exception as exc:
                raise _fail(entry, "builds", f"without {required} installed it raised {exc!r}, not a ClipkitError "
                                             f"naming the package") from exc
            raise _fail(entry, "builds", f"it declares requires={required!r}, which is not installed, yet it built")
    try:
        reporter = entry.load()(ctx)
    except Exception as exc:
        raise _fail(entry, "builds", f"building it for a run folder raised {exc!r}") from exc
    for method in ("scalars", "result", "close"):
        if not callable(getattr(reporter, method, None)):
            raise _fail(entry, "builds", f"the object it returns ({type(reporter).__name__}) has no {method}()")
    return reporter, ctx


def _offline(check: Callable[[Entry, Path], None]) -> Callable[[Entry, Any], None]:
    """Run a reporter check in a temporary folder, with wandb (when a reporter uses it) kept offline."""
    def run(entry: Entry, section: Any) -> None:
        import os

        saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
        try:
            with tempfile.TemporaryDirectory() as folder:
                check(entry, Path(folder))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return run


def _builds_reporter(entry: Entry, folder: Path) -> None:
    reporter, _ = _reporter(entry, folder)
    if reporter is not None:
        reporter.close()


def _reports(entry: Entry, folder: Path) -> None:
    reporter, _ = _reporter(entry, folder)
    if reporter is None:
        return
    try:
        reporter.scalars({"train/loss": 1.5, "train/contrastive_loss": 1.5, "train/lr": 1e-3}, 1)
        reporter.scalars({"val/clip_val_loss": 1.25}, 2)
        reporter.result({"clip_val_loss": 1.25, "image_to_text_R@1": 0.5, "epoch": 1, "step": 2})
    except Exception as exc:
        raise _fail(entry, "reports", f"scalars()/result() with a run's values raised {exc!r}") from exc
    finally:
        reporter.close()


def _closes(entry: Entry, folder: Path) -> None:
    reporter, _ = _reporter(entry, folder)
    if reporter is None:
        return
    reporter.scalars({"train/loss": 1.0}, 1)
    try:
        reporter.close()
        reporter.close()  # a failed run closes what it opened, and the session closes it again
    except Exception as exc:
        raise _fail(entry, "closes", f"close() a second time raised {exc!r}") from exc


REPORTER_CHECKS: Dict[str, Callable[[Entry, Any], None]] = {
    "builds": _offline(_builds_reporter),
    "reports": _offline(_reports),
    "closes": _offline(_closes),
}
