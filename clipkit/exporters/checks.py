"""The contract checks of kind ``exporter`` (named by its ``KindSpec``; imported when a case runs)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

from ..errors import ContractError
from ..registry import Entry

#: the model the checks ask an exporter about: builtin towers, small enough to build in milliseconds
_TINY = {"embed_dim": 16,
         "vision_cfg": {"image_size": 16, "patch_size": 8, "layers": 1, "width": 32, "head_width": 16},
         "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def _fail(entry: Entry, contract: str, detail: str) -> ContractError:
    return ContractError(f"{entry.where} breaks the contract '{contract}': {detail}")


def _exporter(entry: Entry) -> Any:
    try:
        exporter = entry.load()()
    except Exception as exc:
        raise _fail(entry, "builds", f"factory() raised {exc!r}") from exc
    for method in ("supports", "export"):
        if not callable(getattr(exporter, method, None)):
            raise _fail(entry, "builds", f"the object it returns ({type(exporter).__name__}) has no {method}()")
    return exporter


def _supports(entry: Entry, section: Any) -> None:
    from ..factory import create_model

    exporter = _exporter(entry)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.json"
        path.write_text(json.dumps(section or _TINY))
        model = create_model(str(path)).eval()
    try:
        answer = exporter.supports(model)
    except Exception as exc:
        raise _fail(entry, "supports", f"supports(model) raised {exc!r}; it answers None or a reason") from exc
    if answer is not None and (not isinstance(answer, str) or not answer or "\n" in answer):
        raise _fail(entry, "supports", f"supports(model) returned {answer!r}, not None or a one-line reason")


EXPORTER_CHECKS: Dict[str, Callable[[Entry, Any], None]] = {
    "builds": lambda entry, section: _exporter(entry) and None,
    "supports": _supports,
}
