import warnings

import pytest

import clipkit
from clipkit.config import validate_model_config
from clipkit.errors import ConfigError, PluginError
from clipkit.registry import PluginWarning, registry


def test_builtins_register_through_hooks_with_provenance():
    entry = registry.get("vision_tower", "vit")
    assert entry.plugin.distribution == "clipkit-torch" and entry.plugin.builtin
    assert entry.plugin.module == "clipkit.builtin.vit"
    assert {"hf", "transformer"} <= set(registry.names("text_tower"))
    assert {"vit", "transformer"} <= set(registry.names("freezer"))


def test_lazy_factory_imports_on_first_use():
    entry = registry.get("vision_tower", "vit")
    factory = entry.load()
    assert factory.__module__ == "clipkit.builtin.vit.model" and callable(factory)


def test_in_process_plugin_adds_a_tower(plugin_module, tiny_cfg):
    from clipkit.builtin.vit import ViTCfg

    @clipkit.hookimpl
    def register_vision_towers(register):
        register("vit2", "clipkit.builtin.vit.model:build_vit", config=ViTCfg)

    plugin_module("myplug", register_vision_towers=register_vision_towers)
    assert registry.get("vision_tower", "vit2").plugin.name == "myplug"
    tiny_cfg["vision_cfg"]["type"] = "vit2"
    model = clipkit.create_model(_add(tiny_cfg))
    assert model.vision_type == "vit2"


def _add(cfg, name="reg_tiny"):
    import json
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_failing_hook_is_warned_skipped_and_named(plugin_module, tiny_cfg):
    @clipkit.hookimpl
    def register_vision_towers(register):
        register("boomtower", "x:y")
        raise RuntimeError("boom")

    with pytest.warns(PluginWarning, match="boomplug.*raised RuntimeError"):
        plugin_module("boomplug", register_vision_towers=register_vision_towers)
    info = {p.name: p for p in registry.plugins()}["boomplug"]
    assert info.status == "failed" and "boom" in info.error
    assert not registry.has("vision_tower", "boomtower")  # nothing half-registered
    tiny_cfg["vision_cfg"] = {"type": "boomplug"}
    with pytest.raises(ConfigError, match="plugin .*boomplug.* failed to load"):
        validate_model_config(tiny_cfg)
    assert registry.has("vision_tower", "vit")  # everything else still works


def test_misspelled_hook_gets_did_you_mean(plugin_module):
    @clipkit.hookimpl
    def register_vision_tower(register):
        pass

    with pytest.warns(PluginWarning, match="unknown hook 'register_vision_tower' \\(did you mean 'register_vision_towers'\\?\\)"):
        plugin_module("typoplug", register_vision_tower=register_vision_tower)
    assert {p.name: p for p in registry.plugins()}["typoplug"].status == "failed"


def test_strict_mode_makes_failures_errors(plugin_module, monkeypatch):
    @clipkit.hookimpl
    def register_poolers(register):
        raise ValueError("bad pooler")

    with pytest.warns(PluginWarning):
        plugin_module("strictplug", register_poolers=register_poolers)
    monkeypatch.setenv("CLIPKIT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="CLIPKIT_STRICT_PLUGINS.*strictplug.*bad pooler"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            registry.reload()
    monkeypatch.delenv("CLIPKIT_STRICT_PLUGINS")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        registry.reload()  # reported once already: a reload does not repeat the warning
    assert {p.name: p for p in registry.plugins()}["strictplug"].status == "failed"


def test_name_collision_names_both_distributions(plugin_module):
    @clipkit.hookimpl
    def register_vision_towers(register):
        register("vit", "clipkit.builtin.vit.model:build_vit")

    plugin_module("clashplug", register_vision_towers=register_vision_towers)
    with pytest.raises(PluginError, match="'vit' is registered by both clipkit-torch .* and clashplug"):
        registry.get("vision_tower", "vit")
    assert any("clashplug" in c for c in registry.conflicts())


def test_bad_lazy_target_is_a_plugin_error(plugin_module, tiny_cfg):
    @clipkit.hookimpl
    def register_vision_towers(register):
        register("ghost", "no_such_module_xyz:build")

    plugin_module("ghostplug", register_vision_towers=register_vision_towers)
    tiny_cfg["vision_cfg"] = {"type": "ghost"}
    with pytest.raises(PluginError, match="vision tower type 'ghost' from ghostplug.*cannot import 'no_such_module_xyz'"):
        clipkit.create_model(_add(tiny_cfg, "ghost_tiny"))


def test_tower_contract_checked_at_build(plugin_module, tiny_cfg):
    from torch import nn

    @clipkit.hookimpl
    def register_vision_towers(register):
        register("bare", lambda cfg, ctx: nn.Linear(2, 2))

    plugin_module("bareplug", register_vision_towers=register_vision_towers)
    tiny_cfg["vision_cfg"] = {"type": "bare"}
    with pytest.raises(clipkit.PluginError, match="vision tower type 'bare' from bareplug.*lacks output_dim, layer_groups"):
        clipkit.create_model(_add(tiny_cfg, "bare_tiny"))


def test_plugin_shipped_model_config(plugin_module, tiny_cfg):
    @clipkit.hookimpl
    def register_model_configs(register):
        register("shipped-tiny", tiny_cfg)

    plugin_module("cfgplug", register_model_configs=register_model_configs)
    assert "shipped-tiny" in clipkit.list_models()  # the config store follows registry reloads
    assert clipkit.create_model("shipped-tiny").embed_dim == 32


def test_register_callback_rejects_typos_and_duplicates(plugin_module):
    @clipkit.hookimpl
    def register_text_towers(register):
        register("t2", "clipkit.builtin.transformer.model:build_text_transformer", flat_state_dcit=True)

    with pytest.warns(PluginWarning, match="unknown keyword\\(s\\) flat_state_dcit"):
        plugin_module("metaplug", register_text_towers=register_text_towers)

    @clipkit.hookimpl
    def register_poolers(register):
        register("p", "x:y")
        register("p", "x:z")

    with pytest.warns(PluginWarning, match="registered pooler 'p' twice"):
        plugin_module("dupplug", register_poolers=register_poolers)
    assert not registry.has("pooler", "p")


def test_broken_config_class_is_a_config_problem(plugin_module, tiny_cfg):
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        size: int = 1

        def check(self):
            raise RuntimeError("check exploded")

    @clipkit.hookimpl
    def register_vision_towers(register):
        register("fragile", "clipkit.builtin.vit.model:build_vit", config=Cfg)
        register("notdc", "clipkit.builtin.vit.model:build_vit", config=int)

    plugin_module("fragileplug", register_vision_towers=register_vision_towers)
    for name in ("fragile", "notdc"):
        tiny_cfg["vision_cfg"] = {"type": name}
        with pytest.raises(ConfigError, match=f"vision_cfg.type: config class of vision tower type '{name}' from "
                                              f"fragileplug .* failed"):
            validate_model_config(tiny_cfg)


def test_strict_failure_leaves_a_consistent_registry(plugin_module, monkeypatch):
    @clipkit.hookimpl
    def register_poolers(register):
        raise ValueError("bad")

    with pytest.warns(PluginWarning):
        plugin_module("strict2", register_poolers=register_poolers)
    monkeypatch.setenv("CLIPKIT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        registry.reload()
    assert registry.get("vision_tower", "vit").plugin.name == "vit"  # no '@' duplicates, no false conflict
    assert not registry.conflicts()


def test_queries_during_reloads_see_whole_snapshots():
    import threading

    errors = []

    def query():
        for _ in range(200):
            try:
                assert registry.get("vision_tower", "vit").name == "vit"
                registry.names("text_tower")
            except Exception as exc:  # collected: the assertion below reports them
                errors.append(exc)

    threads = [threading.Thread(target=query) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(20):
        registry.reload()
    for thread in threads:
        thread.join()
    assert errors == []
