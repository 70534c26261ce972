"""``clipkit-train`` and ``python -m clipkit.train``: train a CLIP-style model with OpenCLIP's flags.

Parsing imports no torch; the run (``clipkit.train.trainer``) does.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the trainer; errors clipkit can explain end the process with one line and exit code 1, a run
    stopped by a signal after saving its checkpoint with exit code 75."""
    from ..errors import ClipkitError
    from .args import parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = parse_args(argv)
        from .trainer import run

        run(settings, argv)
    except ClipkitError as exc:
        if not getattr(exc, "logged", False):
            print(f"clipkit-train: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print("clipkit-train: interrupted", file=sys.stderr)
        return 130
    return 0
