"""The first-party plugin clipkit-plugin-resnet, pip-installed into its own folder: listed, its
configs check, RN50 builds with OpenCLIP's parameter layout; without it, OpenCLIP's RN50.json says
which package to install. (CI also installs it into the environment, as a user would, and runs
its own suite, plugins/clipkit-plugin-resnet/tests, and the contract tests over its tower.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest

from _helpers import install_plugin, plugin_env

# pip installs the plugin into a throwaway site
pytestmark = [pytest.mark.slow, pytest.mark.install]

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "plugins" / "clipkit-plugin-resnet"
OPENCLIP_RN50 = Path(open_clip.__file__).parent / "model_configs" / "RN50.json"
SHIPPED = [f"{m}{s}" for m in ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64") for s in ("", "-quickgelu")]
META_BUILD = """
import json, torch, open_clip, clipkit
model = clipkit.create_model("RN50", device="meta")
with torch.device("meta"):
    ref = open_clip.model.CLIP(**open_clip.get_model_config("RN50"))
layout = lambda m: [[k, list(v.shape)] for k, v in m.state_dict().items()]
print(json.dumps({"module": type(model.visual).__module__, "meta": all(p.is_meta for p in model.parameters()),
                  "ours": layout(model), "openclip": layout(ref)}))
"""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The plugin pip-installed into its own folder (see _helpers.install_plugin)."""
    return install_plugin(PLUGIN_DIR, tmp_path_factory)


def _run(*args, env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_listed_by_clipkit_plugins(plugin_site):
    done = _run("-m", "clipkit", "plugins", "--json", env=plugin_env(plugin_site))
    assert done.returncode == 0, done.stderr
    plugins = {p["name"]: p for p in json.loads(done.stdout)["plugins"]}
    resnet = plugins["resnet"]
    assert (resnet["distribution"], resnet["version"], resnet["status"], resnet["builtin"]) == \
        ("clipkit-plugin-resnet", "0.1.0", "active", False)
    assert resnet["registers"] == {"vision_tower": ["resnet"], "freezer": ["resnet"], "model_config": SHIPPED}


def test_shipped_configs_and_openclips_file_check(plugin_site):
    done = _run("-m", "clipkit", "config", "check", *SHIPPED, str(OPENCLIP_RN50), env=plugin_env(plugin_site))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(SHIPPED) + 1 and all(line.endswith(": ok") for line in lines)
    assert lines[0].endswith(os.path.join("clipkit_plugin_resnet", "model_configs", "RN50.json: ok"))


def test_rn50_builds_on_meta_with_openclips_parameter_layout(plugin_site):
    done = _run("-c", META_BUILD, env=plugin_env(plugin_site))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["module"] == "clipkit_plugin_resnet.model" and out["meta"]
    assert dict(map(tuple, out["ours"])) == dict(map(tuple, out["openclip"]))
    visual = [item for item in out["ours"] if item[0].startswith("visual.")]
    assert visual == [item for item in out["openclip"] if item[0].startswith("visual.")]  # same order too
    assert ["visual.attnpool.positional_embedding", [50, 2048]] in visual


# a process in which the distribution is not installed, even where CI installed it for real
WITHOUT_PLUGIN = """
import sys
from importlib import metadata
import clipkit.registry
real = metadata.entry_points
clipkit.registry.metadata.entry_points = lambda **kw: [
    ep for ep in real(**kw) if ep.dist is None or ep.dist.metadata["Name"] != "clipkit-plugin-resnet"]
from clipkit.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_without_the_plugin_openclips_rn50_json_names_the_package():
    done = _run("-c", WITHOUT_PLUGIN, "config", "check", str(OPENCLIP_RN50), env=plugin_env())
    assert done.returncode == 1
    line = done.stderr.strip()
    assert line.startswith(f"{OPENCLIP_RN50}: vision_cfg.type: unknown vision tower type 'resnet' "
                           f"(inferred from a list of layers); installed: ")
    assert line.endswith("it is provided by a plugin: pip install clipkit-plugin-resnet") and "\n" not in line
    named = _run("-c", WITHOUT_PLUGIN, "config", "check", "RN50", env=plugin_env())
    assert named.returncode == 2 and "pip install clipkit-plugin-resnet" in named.stderr
