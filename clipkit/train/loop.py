"""The names this module had before the trainer became :mod:`clipkit.train.trainer`, kept for old imports:
the errors live in :mod:`clipkit.errors`, the stop exit code in :mod:`clipkit.train.session`."""
from ..errors import RunStopped, TrainingError
from .session import STOPPED_EXIT_CODE

__all__ = ["STOPPED_EXIT_CODE", "RunStopped", "TrainingError"]
