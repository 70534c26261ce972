"""``python -m clipkit.train.consolidate DIR OUT.pt``: one checkpoint file from a ``--fsdp`` checkpoint folder.

The file has clipkit's usual layout (``epoch``, ``name``, ``state_dict`` in OpenCLIP's key layout, the
optimizer state), so ``create_model_and_transforms(model, pretrained="OUT.pt")`` loads it, ``--resume OUT.pt``
continues the run, and OpenCLIP reads its weights. It runs in one process, without a GPU or a process group.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

USAGE = "usage: python -m clipkit.train.consolidate CHECKPOINT_DIR OUT.pt"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or any(a in ("-h", "--help") for a in argv):
        print(USAGE, file=sys.stderr if len(argv) != 2 else sys.stdout)
        return 0 if any(a in ("-h", "--help") for a in argv) else 2
    from ..errors import ClipkitError
    from .checkpointer import consolidate

    src, out = Path(argv[0]), Path(argv[1])
    try:
        payload = consolidate(src, out)
    except ClipkitError as exc:
        print(f"clipkit.train.consolidate: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {len(payload['state_dict'])} tensors, epoch {payload.get('epoch')}, "
          f"step {payload.get('clipkit', {}).get('step')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
