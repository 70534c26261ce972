"""A real plugin distribution, installed with pip, selected from JSON by "type"; then uninstalled."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).parent / "plugins" / "clipkit-plugin-toyvision"
CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"type": "toyvision", "image_size": 32, "channels": 6},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
BUILD = """
import sys, torch, clipkit
from clipkit.registry import registry
model = clipkit.create_model(sys.argv[1])
print(type(model.visual).__module__, tuple(model.encode_image(torch.randn(2, 3, 32, 32)).shape))
print(registry.get("vision_tower", "toyvision").plugin.label)
print("toy-clip" in clipkit.list_models())
"""


def _pip(*args):
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    _pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(PLUGIN_DIR))
    yield
    _pip("uninstall", "--yes", "--quiet", "clipkit-plugin-toyvision")


def _run(code, *args):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)


def test_installed_plugin_tower_selected_by_type_then_uninstalled(installed_plugin, tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(CONFIG))
    done = _run(BUILD, str(path))
    assert done.returncode == 0, done.stderr
    module, provider, shipped = done.stdout.strip().splitlines()
    assert module == "clipkit_plugin_toyvision.model (2, 16)"
    assert provider == "clipkit-plugin-toyvision 0.0.1 (plugin 'toyvision')"
    assert shipped == "True"

    listing = subprocess.run([sys.executable, "-m", "clipkit", "plugins", "--json"], capture_output=True, text=True)
    plugins = {p["name"]: p for p in json.loads(listing.stdout)["plugins"]}
    assert plugins["toyvision"]["registers"] == {"vision_tower": ["toyvision"], "model_config": ["toy-clip"]}

    disabled = subprocess.run([sys.executable, "-m", "clipkit", "config", "check", str(path)],
                              capture_output=True, text=True,
                              env={**__import__("os").environ, "CLIPKIT_DISABLE_PLUGINS": "toyvision"})
    assert disabled.returncode == 1
    assert "is disabled by CLIPKIT_DISABLE_PLUGINS and may provide it" in disabled.stderr

    _pip("uninstall", "--yes", "--quiet", "clipkit-plugin-toyvision")
    try:
        check = subprocess.run([sys.executable, "-m", "clipkit", "config", "check", str(path)],
                               capture_output=True, text=True)
        assert check.returncode == 1
        assert check.stderr.strip() == (f"{path}: vision_cfg.type: unknown vision tower type 'toyvision'; "
                                        f"installed: {check.stderr.split('installed: ')[1].strip()}")
        assert "vit" in check.stderr.split("installed: ")[1]
    finally:
        _pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(PLUGIN_DIR))


def test_broken_installed_plugin_is_isolated(installed_plugin, tmp_path, monkeypatch):
    """Break the installed plugin's import: warned, shown as failed, everything else works."""
    broken = tmp_path / "shadow"
    broken.mkdir()
    (broken / "clipkit_plugin_toyvision").mkdir()
    (broken / "clipkit_plugin_toyvision" / "__init__.py").write_text("import no_such_dependency_xyz\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(broken)}
    listing = subprocess.run([sys.executable, "-m", "clipkit", "plugins", "--json"], capture_output=True,
                             text=True, env=env)
    assert listing.returncode == 0, listing.stderr
    plugins = {p["name"]: p for p in json.loads(listing.stdout)["plugins"]}
    assert plugins["toyvision"]["status"] == "failed"
    assert "No module named 'no_such_dependency_xyz'" in plugins["toyvision"]["error"]
    assert "clipkit plugin skipped: clipkit-plugin-toyvision 0.0.1" in listing.stderr
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(CONFIG))
    check = subprocess.run([sys.executable, "-m", "clipkit", "config", "check", str(path), "ViT-B-32"],
                           capture_output=True, text=True, env=env)
    assert check.returncode == 1
    assert "plugin clipkit-plugin-toyvision 0.0.1 (plugin 'toyvision') failed to load and may provide it" in check.stderr
    assert "ViT-B-32.json: ok" in check.stdout
    strict = subprocess.run([sys.executable, "-m", "clipkit", "models"], capture_output=True, text=True,
                            env={**env, "CLIPKIT_STRICT_PLUGINS": "1"})
    assert strict.returncode == 1 and "CLIPKIT_STRICT_PLUGINS is set and plugins failed" in strict.stderr
