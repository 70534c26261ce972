import json
import subprocess
import sys

import pytest

from clipkit.cli import main


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "clipkit", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("command", [["models"], ["config", "check", "ViT-B-32"], ["config", "show", "ViT-B-32"],
                                     ["config", "schema"]])
def test_static_commands_import_no_torch(command):
    code = ("import sys; from clipkit.cli import main; rc = main(%r); "
            "assert 'torch' not in sys.modules, 'torch imported'; raise SystemExit(rc)" % (command,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_models_lists_builtins(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert "ViT-B-32" in names and "ViT-bigG-14" in names
    assert main(["models", "--json"]) == 0
    sources = {row["name"]: row["source"] for row in json.loads(capsys.readouterr().out)}
    assert sources["ViT-B-32"].endswith("clipkit/model_configs/ViT-B-32.json")


def test_config_check_exit_codes_and_lines(tmp_path, tiny_cfg, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(tiny_cfg))
    tiny_cfg["vision_cfg"]["widht"] = 64
    tiny_cfg["text_cfg"]["heads"] = 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tiny_cfg))
    assert main(["config", "check", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: ok"
    assert main(["config", "check", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{bad}: vision_cfg.widht: unknown key for vision tower type 'vit' (did you mean 'width'?)",
                   f"{bad}: text_cfg.heads: must be > 0, got 0"]
    assert main(["config", "check", "ViT-B-32"]) == 0
    assert main(["config", "check", "ViT-B-99"]) == 2
    assert "unknown model 'ViT-B-99' (did you mean" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert main(["config", "check", str(tmp_path / "broken.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["config", "check", str(tmp_path / "missing.json")]) == 2


def test_config_check_usage_error_exit_2():
    assert run("config", "check").returncode == 2


def test_config_show_full_writes_defaults(capsys):
    assert main(["config", "show", "ViT-B-32", "--full"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["vision_cfg"]["type"] == "vit" and cfg["vision_cfg"]["mlp_ratio"] == 4.0
    assert cfg["text_cfg"]["type"] == "transformer" and cfg["text_cfg"]["pool_type"] == "argmax"
    assert cfg["quick_gelu"] is False


def test_config_schema_reflects_registered_types(capsys):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "vision_tower.vit" in schema["$defs"] and "text_tower.transformer" in schema["$defs"]
    vit = schema["$defs"]["vision_tower.vit"]["properties"]
    assert vit["layers"]["exclusiveMinimum"] == 0 and vit["pool_type"]["enum"] == ["tok", "avg", "none"]
    assert schema["required"] == ["embed_dim", "vision_cfg", "text_cfg"]


def test_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    assert plugins["vit"]["registers"]["vision_tower"] == ["vit"]
    assert plugins["vit"]["distribution"] == "clipkit-torch" and plugins["vit"]["status"] == "active"


def test_every_openclip_config_passes_or_fails_in_one_line_per_problem():
    """All 144 configs of OpenCLIP 3.3.0 validate: builtin, timm and HF towers, and the ResNet and CoCa
    plugins that the test setup installs (without a plugin: tests/test_config.py, the plugins' tests)."""
    from pathlib import Path

    import open_clip

    from clipkit.config import validate_model_config
    from clipkit.errors import ConfigError

    folder = Path(open_clip.__file__).parent / "model_configs"
    files = sorted(folder.glob("*.json"))
    assert len(files) == 144
    ok, rejected = [], []
    for file in files:
        try:
            validate_model_config(json.loads(file.read_text()), source=str(file))
            ok.append(file.stem)
        except ConfigError as exc:
            rejected.append(f"{file.stem}: {exc}")
    assert rejected == []
    assert len(ok) == 144

def test_schema_bounds_sit_on_numbers(capsys):
    assert main(["config", "schema"]) == 0
    image_size = json.loads(capsys.readouterr().out)["$defs"]["vision_tower.vit"]["properties"]["image_size"]
    integer, pair = image_size["anyOf"]
    assert integer == {"type": "integer", "exclusiveMinimum": 0}
    assert all(item["exclusiveMinimum"] == 0 for item in pair["prefixItems"]) and "exclusiveMinimum" not in pair


def test_config_check_goes_on_after_a_bad_target_and_reads_local_dirs(tmp_path, tiny_cfg, capsys):
    assert main(["config", "check", "ViT-B-99", "ViT-B-32"]) == 2
    captured = capsys.readouterr()
    assert "ViT-B-32.json: ok" in captured.out and "unknown model 'ViT-B-99'" in captured.err
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_cfg}))
    assert main(["config", "check", f"local-dir:{folder}"]) == 0
    assert main(["config", "check", f"local-dir:{tmp_path / 'nope'}"]) == 2
    assert main(["config", "check", "hf-hub:acme/not-cached"]) == 2
    assert "only the huggingface_hub cache was searched" in capsys.readouterr().err
