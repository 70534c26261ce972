"""The first-party plugin clipkit-plugin-coca, pip-installed into its own folder: it installs as a
distribution whose package data (OpenCLIP's four CoCa configs) and entry point clipkit finds. (CI also
installs it into the environment and runs its own suite, plugins/clipkit-plugin-coca/tests, which checks
the model against OpenCLIP and a clipkit without the plugin.)"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# pip installs the plugin into a throwaway site
pytestmark = [pytest.mark.slow, pytest.mark.install]

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "plugins" / "clipkit-plugin-coca"
CHECK = """
import json, clipkit, clipkit_plugin_coca
from clipkit.registry import registry
plugin = registry.find_plugin("clipkit-plugin-coca")
print(json.dumps({"file": clipkit_plugin_coca.__file__, "status": plugin.status,
                  "registers": plugin.as_dict()["registers"],
                  "config": clipkit.get_model_config("coca_ViT-B-32"),
                  "tags": clipkit.list_pretrained_tags_by_model("coca_ViT-L-14")}))
"""


def test_installs_as_a_distribution_clipkit_finds(tmp_path):
    site, src = tmp_path / "site", tmp_path / "src"
    # building writes build/ and egg-info beside the sources; leave out any a developer left there
    shutil.copytree(PLUGIN_DIR, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert Path(report["file"]).is_relative_to(site) and report["status"] == "active"
    assert report["registers"] == {"model_family": ["coca"], "objective": ["coca"], "model_config": [
        "coca_base", "coca_ViT-B-32", "coca_ViT-L-14", "coca_roberta-ViT-B-32"]}
    assert report["config"]["multimodal_cfg"]["layers"] == 12
    assert report["tags"] == ["laion2b_s13b_b90k", "mscoco_finetuned_laion2b_s13b_b90k"]
    assert (site / "clipkit_plugin_coca" / "model_configs" / "coca_roberta-ViT-B-32.json").is_file()
    assert any(p.name.startswith("clipkit_plugin_coca-0.1.0") for p in site.glob("*.dist-info"))
