"""clipkit.testing as a pytest plugin: loaded by its entry point into every pytest run, light to import,
and its fixture leaves the registry as it found it."""
import subprocess
import sys
import textwrap

import clipkit
from clipkit.builtin.vit import ViTCfg
from clipkit.registry import registry
from clipkit.testing import PluginSandbox, contract_cases

HEAVY = ("torch", "timm", "transformers", "numpy")


def test_importing_it_and_listing_cases_imports_nothing_heavy():
    code = ("import sys; import clipkit.testing as t; cases = t.contract_cases('resnet'); "
            f"print(len(cases), [m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    count, heavy = done.stdout.split(" ", 1)
    assert int(count) > 10 and heavy.strip() == "[]"


def test_pytest_loads_it_through_the_entry_point_without_torch(tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import sys

        def test_fixture_available_and_nothing_heavy(clipkit_plugins, pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("clipkit")
            assert not [m for m in ("torch", "timm", "transformers") if m in sys.modules]
    """))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_sandbox_registers_then_restores_the_registry():
    @clipkit.hookimpl
    def register_vision_towers(register):
        register("sandboxed", "clipkit.builtin.vit.model:build_vit", config=ViTCfg)

    before = {kind: registry.names(kind) for kind in ("vision_tower", "model_config")}
    sandbox = PluginSandbox()
    sandbox.module("sandboxplug", register_vision_towers=register_vision_towers)
    assert registry.get("vision_tower", "sandboxed").plugin.name == "sandboxplug"
    assert "sandboxplug" in sys.modules
    assert [str(c) for c in contract_cases("sandboxplug")][:2] == ["plugin:sandboxplug:loads",
                                                                   "vision_tower:sandboxed:builds"]
    sandbox.close()
    assert {kind: registry.names(kind) for kind in before} == before
    assert "sandboxplug" not in sys.modules and not registry.has("vision_tower", "sandboxed")


def test_cases_of_one_plugin_and_their_ids():
    ids = [str(case) for case in contract_cases("clipkit-plugin-resnet")]  # by distribution name too
    assert ids[:3] == ["plugin:resnet:loads", "plugin:resnet:imports-without-torch", "vision_tower:resnet:builds"]
    assert "vision_tower:resnet:freezer" in ids and "freezer:resnet:freezer" not in ids  # checked with its tower
    assert sum(i.startswith("model_config:") for i in ids) == 10
