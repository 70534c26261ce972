"""The one exception hierarchy of clipkit.

Every error a user can cause by bad input derives from :class:`ClipkitError`, so callers can catch
one type, and every message says what is wrong, where, and what to do about it.
"""
from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Type


class ClipkitError(Exception):
    """Base class of every clipkit error."""

    #: set by clipkit-train once the error is in its log, so that its entry point does not print it again
    logged: bool = False


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (``path``, a dotted key path) and what (``message``)."""

    path: str
    message: str
    source: Optional[str] = None

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.source}: {where}{self.message}" if self.source else f"{where}{self.message}"


class ConfigError(ClipkitError, ValueError):
    """A model config is invalid. Holds every problem found, one line each."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class UnknownModelError(ClipkitError, KeyError):
    """A model name that no config, plugin or prefix provides."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginError(ClipkitError):
    """A plugin failed to load, conflicts with another, or broke the plugin contract."""


class TowerContractError(PluginError, TypeError):
    """A tower factory returned something that does not honour the tower protocol."""


class ContractError(PluginError, AssertionError):
    """A registered part broke the plugin contract (``clipkit.testing``): the message names the part, the
    plugin and distribution that registered it, and the rule it broke. An ``AssertionError``, so pytest
    reports it as a failed test."""


class CheckpointError(ClipkitError):
    """A checkpoint cannot be read or does not fit the model."""


class PluginWarning(UserWarning):
    """A plugin was skipped because it failed to load or broke the contract."""


class UnknownPartError(ClipkitError, LookupError):
    """A name no installed plugin registered (tower type, tokenizer, pooler, freezer)."""

    def __str__(self) -> str:
        return str(self.args[0])


class PreprocessError(ClipkitError, ValueError):
    """A preprocessing or augmentation setting that clipkit cannot honour."""


class ArgsError(ClipkitError):
    """A ``clipkit-train`` flag (or settings-file key), or a combination of them, that cannot work."""


class DataError(ClipkitError):
    """Data that cannot be read as asked: a bad path, wrong CSV columns, mostly broken shards."""


class TrainingError(ClipkitError):
    """The run cannot go on (a non-finite loss, a run folder in the way)."""


class RunStopped(TrainingError):
    """A stop signal ended the run at a step boundary, after saving a checkpoint."""

    #: sysexits' EX_TEMPFAIL ("try again later"): stopped on request with a checkpoint, to be continued
    exit_code = 75


class RunFolderInUse(ClipkitError):
    """Another live process trains in this run folder."""


class ExportError(ClipkitError):
    """A model that a format cannot express, a missing package, or an export that failed its check."""


class JSONBoundError(ValueError):
    """A config file over ``clipkit.config.MAX_CONFIG_BYTES`` or nested deeper than ``MAX_CONFIG_DEPTH``.

    Not a :class:`ClipkitError`: it never reaches a user. It is the JSON reader's signal, and its callers
    turn it into a ``ClipkitError`` naming the file, or a warning naming it when the file is one of a
    config folder's.
    """


def suggest(name: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` (up to ``n`` close ``choices``, most alike first) to end a message
    about an unknown ``name``, or ``""`` when nothing is close enough (``cutoff`` as in difflib)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=cutoff)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


@contextlib.contextmanager
def explain_os_error(where: str, error: Type[ClipkitError] = ClipkitError, doing: str = "read") -> Iterator[None]:
    """Turn an ``OSError`` raised inside (a missing file, no permission, a full disk) into ``error``'s one
    line ``WHERE: cannot DOING: REASON``; ``where`` names the file as the user gave it (``--out x.jsonl``)."""
    try:
        yield
    except OSError as exc:
        raise error(f"{where}: cannot {doing}: {exc.strerror or exc}") from exc
