"""The type check's promise to users: the names ``import clipkit`` exports lazily have their real types."""
import re

import pytest
from mypy import api

import clipkit

# mypy reads the project's [tool.mypy] settings and its cache (CI runs `mypy` first, so it is warm there)
pytestmark = pytest.mark.slow


def _revealed(tmp_path, names):
    snippet = tmp_path / "uses_clipkit.py"
    snippet.write_text("import clipkit\n" + "".join(f"reveal_type(clipkit.{name})\n" for name in names))
    out, err, _ = api.run([str(snippet)])
    found = dict(re.findall(r"uses_clipkit\.py:(\d+): note: Revealed type is \"(.*)\"", out))
    assert len(found) == len(names), out + err
    return {name: found[str(line)] for line, name in enumerate(names, start=2)}


def test_every_lazily_exported_name_has_its_real_type_not_any(tmp_path):
    # the module __getattr__ returns Any: a name missing from the TYPE_CHECKING block would show as Any
    revealed = _revealed(tmp_path, list(clipkit.__all__))
    untyped = {name: t for name, t in revealed.items() if t == "Any" or t.endswith("-> Any")}
    assert not untyped


MODEL = r"(clipkit\.model\.ClipModel|torch\.nn\.modules\.module\.Module)"
TRANSFORM = r"def \(Any\) -> torch\._tensor\.Tensor"


def test_the_factory_functions_return_models_and_transforms(tmp_path):
    revealed = _revealed(tmp_path, ["create_model", "create_model_and_transforms", "load_checkpoint"])
    assert re.search(rf"-> {MODEL}$", revealed["create_model"])
    assert re.search(rf"-> tuple\[{MODEL}, {TRANSFORM}, {TRANSFORM}\]$", revealed["create_model_and_transforms"])
    # decorated (clipkit._provenance.names_missing_parts), and still typed through the decorator
    assert revealed["load_checkpoint"].endswith("-> dict[str, list[str]]")
