"""clipkit.errors: the one place for exception classes and the helpers that word their messages."""
import importlib
import warnings

import pytest

from clipkit import errors
from clipkit.errors import DataError, explain_os_error, suggest


def test_suggest_names_the_closest_choices_or_nothing():
    assert suggest("clp", ["clip", "siglip", "distill"]) == " (did you mean 'clip'?)"
    assert suggest("ViT-B-3", ["ViT-B-32", "ViT-B-16", "RN50"], n=3) == " (did you mean 'ViT-B-32', 'ViT-B-16'?)"
    assert suggest("zzz", ["clip", "siglip"]) == ""
    # a stricter cutoff drops a far match that the default keeps
    assert suggest("widht", ["width"], cutoff=0.7) == " (did you mean 'width'?)"
    assert suggest("lyr", ["layers"]) == " (did you mean 'layers'?)" and suggest("lyr", ["layers"], cutoff=0.7) == ""


def test_explain_os_error_is_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError) as info, explain_os_error(str(missing), DataError):
        missing.read_text()
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(errors.ClipkitError, match=r"^--out x: cannot write: Is a directory$"), \
            explain_os_error("--out x", doing="write"):
        open(tmp_path, "a")
    # other errors pass through untouched
    with pytest.raises(ValueError, match="not mine"), explain_os_error("f"):
        raise ValueError("not mine")


@pytest.mark.parametrize("module, name", [
    ("clipkit.train.session", "RunStopped"), ("clipkit.train.loop", "RunStopped"),
    ("clipkit.train._runlock", "RunFolderInUse"), ("clipkit.config", "JSONBoundError"),
])
def test_moved_exceptions_still_import_from_their_old_modules(module, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # internal names move silently
        assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_export_error_at_its_old_plugin_facing_place_warns_naming_the_new_one():
    with pytest.warns(DeprecationWarning, match=r"clipkit\.errors\.ExportError"):
        from clipkit.exporters import ExportError
    assert ExportError is errors.ExportError
    with pytest.raises(AttributeError, match="NoSuchName"):
        getattr(importlib.import_module("clipkit.exporters"), "NoSuchName")  # noqa: B009 - the lookup is the test


def test_hf_loading_words_unreadable_repositories_and_custom_code_in_one_line():
    from clipkit._trust import hf_loading

    with pytest.raises(errors.ClipkitError, match=r"^x 'n': gone \(no such file\)$"), \
            hf_loading("x", "n", lambda reason: f"x 'n': gone ({reason})"):
        raise OSError("no such file\nthe rest of transformers' explanation")
    with pytest.raises(errors.ClipkitError, match=r"^x 'n' contains custom code"), hf_loading("x", "n", str):
        raise ValueError("the repository needs trust_remote_code=True")
    with pytest.raises(ValueError, match="^a bug$"), hf_loading("x", "n", str):
        raise ValueError("a bug")
    with pytest.raises(errors.ClipkitError, match="^bad config$"), hf_loading("x", "n", str, also=(ValueError,)):
        raise ValueError("bad config")
