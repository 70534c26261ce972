"""Who may let a model repository run its own Python: the caller, never a config.

A HuggingFace repository can ship modelling or tokenizer code (``auto_map`` in its ``config.json``)
that ``transformers`` imports when asked with ``trust_remote_code=True``. A model config is data that
may come from anywhere (a hub download, a shared folder), so its ``trust_remote_code`` keys are only
requests: the permission comes from the caller's ``trust_remote_code=True`` argument, clipkit-train's
``--trust-remote-code``, or ``CLIPKIT_TRUST_REMOTE_CODE=1``. Torch-free.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Any, Callable, Iterator, List, Mapping, Tuple, Type

from .errors import ClipkitError

logger = logging.getLogger("clipkit")

TRUST_ENV = "CLIPKIT_TRUST_REMOTE_CODE"
#: How a caller opts in, for messages.
OPT_IN = (f"pass trust_remote_code=True (create_model, get_tokenizer), --trust-remote-code (clipkit-train) "
          f"or set {TRUST_ENV}=1")

_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar("clipkit_trust_remote_code", default=False)


def remote_code_allowed() -> bool:
    """Whether the caller of the current build allowed repositories' own code to run."""
    return _allowed.get() or os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def caller_trust(allowed: bool) -> Iterator[None]:
    """The caller's decision, for the towers and tokenizers built inside the ``with`` block."""
    token = _allowed.set(bool(allowed))
    try:
        yield
    finally:
        _allowed.reset(token)


def remote_code_requests(cfg: Any) -> List[str]:
    """Key paths at which a model config asks for ``trust_remote_code`` (requests only: see the module)."""
    found: List[str] = []
    if not isinstance(cfg, Mapping):
        return found
    for section in ("vision_cfg", "text_cfg"):
        tower = cfg.get(section)
        if not isinstance(tower, Mapping):
            continue
        if tower.get("trust_remote_code"):
            found.append(f"{section}.trust_remote_code")
        kwargs = tower.get("tokenizer_kwargs")
        if isinstance(kwargs, Mapping) and kwargs.get("trust_remote_code"):
            found.append(f"{section}.tokenizer_kwargs.trust_remote_code")
    return found


def ignored_request_message(paths: List[str], where: str) -> str:
    """The warning for a config asking for remote code without the caller's opt-in."""
    return (f"{where}: {', '.join(paths)}: a config may only ask to run a repository's own code; it runs only "
            f"when the caller opts in ({OPT_IN})")


def warn_ignored_requests(cfg: Any, where: str, allowed: bool) -> None:
    """Log that a config's ``trust_remote_code`` is a request the caller (``allowed``) has not granted."""
    paths = remote_code_requests(cfg)
    if paths and not (allowed or remote_code_allowed()):
        logger.warning(ignored_request_message(paths, where))


def is_custom_code_error(exc: BaseException) -> bool:
    """``transformers``' refusal to import a repository's code without ``trust_remote_code=True``."""
    return isinstance(exc, ValueError) and "trust_remote_code" in str(exc)


def custom_code_error(what: str, name: str) -> ClipkitError:
    """The one-line error for a repository that needs its own code when the caller has not opted in."""
    return ClipkitError(f"{what} {name!r} contains custom code (its own Python), which clipkit runs only when the "
                        f"caller opts in: {OPT_IN}; a config's trust_remote_code does not count")


@contextlib.contextmanager
def hf_loading(what: str, name: str, unreadable: Callable[[str], str],
               also: Tuple[Type[Exception], ...] = ()) -> Iterator[None]:
    """Around a ``transformers`` ``from_pretrained``: a repository that needs its own code is
    :func:`custom_code_error`; an ``OSError`` (or one of ``also``: not found, offline, missing files) is a
    ``ClipkitError`` worded by ``unreadable(first line of the reason)``. Other errors pass."""
    unreadable_kinds: Tuple[Type[Exception], ...] = (OSError, *also)
    caught: Tuple[Type[Exception], ...] = (ValueError, *unreadable_kinds)
    try:
        yield
    except caught as exc:
        if is_custom_code_error(exc):
            raise custom_code_error(what, name) from None
        if not isinstance(exc, unreadable_kinds):
            raise
        raise ClipkitError(unreadable(str(exc).splitlines()[0] if str(exc) else repr(exc))) from exc
