"""Committed reference outputs: a numeric drift between clipkit versions fails here.

If a change is meant to alter numerics (initialisation order, a kernel), regenerate with
``python tests/golden/make_golden.py`` and say why in the commit message.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import make_golden  # noqa: E402

GOLDEN = json.loads((Path(__file__).parent / "golden" / "outputs.json").read_text())


@pytest.mark.parametrize("name", sorted(make_golden.CONFIGS))
def test_outputs_match_committed_reference(name, tmp_path):
    got = make_golden.compute(name, tmp_path)
    assert got["tokens"] == GOLDEN[name]["tokens"]
    for key in ("image", "text"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(GOLDEN[name][key]), rtol=1e-5, atol=1e-6)
