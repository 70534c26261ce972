"""The one exception hierarchy of clipkit.

Every error a user can cause by bad input derives from :class:`ClipkitError`, so callers can catch
one type, and every message says what is wrong, where, and what to do about it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional


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
