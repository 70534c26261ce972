import os

# no test may touch the network: hub lookups fail fast instead of retrying
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest

from _helpers import tiny, write_config
from clipkit.registry import registry


@pytest.fixture
def tiny_cfg():
    """A fresh copy of a tiny builtin-tower config (32-px images, 16-token texts): ``_helpers.TINY``."""
    return tiny()


@pytest.fixture
def tiny_model_path(tmp_path, tiny_cfg):
    """``tiny_cfg`` written as a model config file; its path, which ``create_model`` takes as a name."""
    return write_config(tmp_path, tiny_cfg)


@pytest.fixture(autouse=True)
def _isolated_state(monkeypatch):
    """No test sees another's environment switches or added model configs."""
    from clipkit.config import _store

    for name in ("CLIPKIT_DISABLE_PLUGINS", "CLIPKIT_STRICT_PLUGINS", "CLIPKIT_MODEL_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)
    added = list(_store.user_paths)
    yield
    _store.user_paths[:] = added
    _store.invalidate()


@pytest.fixture
def plugin_module(clipkit_plugins):
    """Make a throwaway plugin module from hook functions; registered in-process, removed afterwards
    (clipkit.testing's fixture, which pytest loads through clipkit's pytest11 entry point)."""
    return clipkit_plugins.module


@pytest.fixture
def without_plugins(monkeypatch):
    """Hide installed plugin distributions from clipkit, as if they were not installed."""
    from clipkit import registry as registry_module

    real = registry_module.metadata.entry_points

    def hide(*names):
        def entry_points(**kwargs):
            return [ep for ep in real(**kwargs) if getattr(ep, "dist", None) is None
                    or ep.dist.metadata["Name"] not in names]

        monkeypatch.setattr(registry_module.metadata, "entry_points", entry_points)
        registry.reload()

    yield hide
    monkeypatch.undo()
    registry.reload()
