"""A real plugin distribution, installed with pip, selected from JSON by "type"; then uninstalled."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import install_plugin, plugin_env

# pip installs a throwaway distribution
pytestmark = [pytest.mark.slow, pytest.mark.install]

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


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The plugin pip-installed into its own folder (see _helpers.install_plugin)."""
    return install_plugin(PLUGIN_DIR, tmp_path_factory)


def _run(code, *args, env=None):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


def _clipkit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "clipkit", *args], capture_output=True, text=True, env=env)


def test_installed_plugin_tower_selected_by_type_then_uninstalled(plugin_site, tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(CONFIG))
    done = _run(BUILD, str(path), env=plugin_env(plugin_site))
    assert done.returncode == 0, done.stderr
    module, provider, shipped = done.stdout.strip().splitlines()
    assert module == "clipkit_plugin_toyvision.model (2, 16)"
    assert provider == "clipkit-plugin-toyvision 0.0.1 (plugin 'toyvision')"
    assert shipped == "True"

    listing = _clipkit("plugins", "--json", env=plugin_env(plugin_site))
    plugins = {p["name"]: p for p in json.loads(listing.stdout)["plugins"]}
    assert plugins["toyvision"]["registers"] == {"vision_tower": ["toyvision"], "model_config": ["toy-clip"]}

    disabled = _clipkit("config", "check", str(path), env=plugin_env(plugin_site, CLIPKIT_DISABLE_PLUGINS="toyvision"))
    assert disabled.returncode == 1
    assert "is disabled by CLIPKIT_DISABLE_PLUGINS and may provide it" in disabled.stderr

    check = _clipkit("config", "check", str(path), env=plugin_env())  # not installed
    assert check.returncode == 1
    line = check.stderr.strip()
    assert line.startswith(f"{path}: vision_cfg.type: unknown vision tower type 'toyvision'; installed: ")
    assert "vit" in line.split("installed: ")[1].split(", ") and "\n" not in line


def test_broken_installed_plugin_is_isolated(plugin_site, tmp_path):
    """Break the installed plugin's import: warned, shown as failed, everything else works."""
    shadow = tmp_path / "shadow"
    (shadow / "clipkit_plugin_toyvision").mkdir(parents=True)
    (shadow / "clipkit_plugin_toyvision" / "__init__.py").write_text("import no_such_dependency_xyz\n")
    env = plugin_env(plugin_site)
    env["PYTHONPATH"] = f"{shadow}{os.pathsep}{plugin_site}"
    listing = _clipkit("plugins", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    plugins = {p["name"]: p for p in json.loads(listing.stdout)["plugins"]}
    assert plugins["toyvision"]["status"] == "failed"
    assert "No module named 'no_such_dependency_xyz'" in plugins["toyvision"]["error"]
    assert "clipkit plugin skipped: clipkit-plugin-toyvision 0.0.1" in listing.stderr
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(CONFIG))
    check = _clipkit("config", "check", str(path), "ViT-B-32", env=env)
    assert check.returncode == 1
    assert "plugin clipkit-plugin-toyvision 0.0.1 (plugin 'toyvision') failed to load and may provide it" in check.stderr
    assert "ViT-B-32.json: ok" in check.stdout
    strict = _clipkit("models", env={**env, "CLIPKIT_STRICT_PLUGINS": "1"})
    assert strict.returncode == 1 and "CLIPKIT_STRICT_PLUGINS is set and plugins failed" in strict.stderr
