"""`clipkit plugin new`: every kind of plugin it writes installs with pip, passes its own tests, is listed
by `clipkit plugins` and builds from its JSON config; and it is gone again afterwards.

The plugins are pip-installed offline into a folder of their own, as in test_third_party_plugin.py:
what puts it on its path (PYTHONPATH, or sys.path for a while) has them installed; the shared
environment is never modified.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

import clipkit
from clipkit._scaffold import kinds as scaffold_kinds
from clipkit.cli import main
from clipkit.registry import registry

NAMES = {"vision": "acmevision", "text": "acmetext", "pooler": "acmepool", "tokenizer": "acmetok",
         "freezer": "acme-freeze", "objective": "acmeobj", "reporter": "acme-rep", "data_source": "acmejsonl",
         "family": "acmefam"}
#: the kinds whose parts go into model configs: their plugins ship an example config
CONFIG_KINDS = ("vision", "text", "pooler", "tokenizer", "freezer", "family")


def test_every_kind_with_a_template_is_scaffolded_here():
    assert set(NAMES) == set(scaffold_kinds())


def _env(site=None):
    # one thread: the models are tiny, and threads fight over a busy machine's cores
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return env


def _run(*args, site=None, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(site), cwd=cwd)


@pytest.fixture(scope="module")
def scaffolded(tmp_path_factory):
    """One plugin of each kind, written by the command and pip-installed into their own folder."""
    root = tmp_path_factory.mktemp("scaffold")
    for kind, name in NAMES.items():
        assert main(["plugin", "new", name, "--kind", kind, "--output", str(root)]) == 0
    site = tmp_path_factory.mktemp("site")
    done = _run("-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                "--target", str(site), *(str(root / f"clipkit-plugin-{name}") for name in NAMES.values()))
    assert done.returncode == 0, done.stdout + done.stderr
    yield root, site
    shutil.rmtree(site)  # "uninstalled": nothing outside these folders knew about the plugins
    shutil.rmtree(root)


@pytest.mark.slow
@pytest.mark.install
@pytest.mark.parametrize("kind", NAMES)
def test_generated_tests_pass_out_of_the_box(scaffolded, kind):
    root, site = scaffolded
    done = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", f"clipkit-plugin-{NAMES[kind]}", site=site, cwd=root)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "warning" not in summary, summary


@contextlib.contextmanager
def _installed(site):
    """This process sees the plugins in ``site`` as installed, until the block ends."""
    sys.path.insert(0, str(site))
    registry.reload()
    try:
        yield
    finally:
        sys.path.remove(str(site))
        for module in [m for m in sys.modules if m.startswith("clipkit_plugin_acme")]:
            del sys.modules[module]
        registry.reload()


def _embed(path):
    model = clipkit.create_model(str(path)).eval()
    tokenizer = clipkit.get_tokenizer(str(path))
    size = model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        image = model.encode_image(torch.randn(2, 3, h, w))
        text = model.encode_text(tokenizer(["a photo of a cat", "a dog"]))
    return [model.model_config.family, model.vision_type, model.text_type, list(image.shape), list(text.shape)]


def test_listed_by_clipkit_plugins_and_built_from_their_json_configs(scaffolded, tmp_path, capsys):
    root, site = scaffolded
    configs = {kind: root / f"clipkit-plugin-{name}" / f"clipkit_plugin_{name.replace('-', '_')}" / "model_configs"
               / f"{name}-example.json" for kind, name in NAMES.items() if kind in CONFIG_KINDS}
    # the pooler's config names all-MiniLM-L6-v2 on the hub; offline, a tiny random BERT stands in
    encoder = tmp_path / "encoder"
    transformers.BertConfig(vocab_size=49408, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64).save_pretrained(encoder)
    pooler = json.loads(configs["pooler"].read_text())
    pooler["text_cfg"].update(hf_model_name=str(encoder), hf_model_pretrained=False)
    del pooler["text_cfg"]["hf_tokenizer_name"]
    configs["pooler"] = tmp_path / "pooler-local.json"
    configs["pooler"].write_text(json.dumps(pooler))
    with _installed(site):
        built = {kind: _embed(path) for kind, path in configs.items()}
        assert main(["plugins", "--json"]) == 0
        plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
        assert main(["plugins"]) == 0
        assert "acmevision  clipkit-plugin-acmevision 0.1.0  [active]" in capsys.readouterr().out
    assert built == {
        "vision": ["clip", "acmevision", "transformer", [2, 64], [2, 64]],
        "text": ["clip", "vit", "acmetext", [2, 64], [2, 64]],
        "pooler": ["clip", "vit", "hf", [2, 64], [2, 64]],
        "tokenizer": ["clip", "vit", "transformer", [2, 64], [2, 64]],
        "freezer": ["clip", "acme-freeze", "transformer", [2, 64], [2, 64]],
        "family": ["acmefam", "vit", "transformer", [2, 64], [2, 64]],
    }
    for kind, name in NAMES.items():
        plugin = plugins[name]
        assert (plugin["distribution"], plugin["version"], plugin["status"]) == (f"clipkit-plugin-{name}", "0.1.0",
                                                                                "active")
        assert plugin["registers"][scaffold_kinds()[kind].name] == [name]
        if kind in CONFIG_KINDS:
            assert plugin["registers"]["model_config"] == [f"{name}-example"]
        else:  # the trainer's kinds ship no model config
            assert set(plugin["registers"]) == {scaffold_kinds()[kind].name}
    assert not set(NAMES.values()) & {p.name for p in registry.plugins()}  # gone again


def test_what_is_written(tmp_path, capsys):
    assert main(["plugin", "new", "clipkit-plugin-my-tower", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "clipkit-plugin-my-tower"
    assert f"pip install -e {root}" in out and f"pytest {root}" in out
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "clipkit-plugin-my-tower"
    assert project["project"]["dependencies"] == ["clipkit-torch>=0.1,<0.2"]
    assert project["project"]["entry-points"]["clipkit"] == {"my-tower": "clipkit_plugin_my_tower"}
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [".gitignore", "README.md", "clipkit_plugin_my_tower/__init__.py", "clipkit_plugin_my_tower/model.py",
                     "clipkit_plugin_my_tower/model_configs/my-tower-example.json", "pyproject.toml",
                     "tests/test_my_tower.py"]
    assert "$" not in (root / "clipkit_plugin_my_tower" / "model.py").read_text()
    assert "class MyTowerTower(nn.Module)" in (root / "clipkit_plugin_my_tower" / "model.py").read_text()


@pytest.mark.parametrize("args,error", [
    (["vit"], "vision tower type 'vit' is already registered by clipkit-torch"),
    (["Tiny Conv"], "plugin name 'Tiny Conv': use lowercase letters and digits"),
    (["clip", "--kind", "tokenizer"], "tokenizer 'clip' is already registered"),
])
def test_bad_names_are_usage_errors(tmp_path, capsys, args, error):
    assert main(["plugin", "new", *args, "-o", str(tmp_path)]) == 2
    assert error in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_existing_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "clipkit-plugin-dup").mkdir()
    assert main(["plugin", "new", "dup", "-o", str(tmp_path)]) == 2
    assert "clipkit-plugin-dup already exists" in capsys.readouterr().err


def test_scaffolding_imports_no_torch(tmp_path):
    code = ("import sys; from clipkit.cli import main; rc = main(['plugin', 'new', 'notorch', '--kind', 'text', "
            f"'-o', {str(tmp_path)!r}]); assert 'torch' not in sys.modules, 'torch imported'; raise SystemExit(rc)")
    done = _run("-c", code)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "clipkit-plugin-notorch" / "clipkit_plugin_notorch" / "model.py").is_file()


def test_cli_lists_every_kind_without_importing_the_scaffold(capsys):
    with pytest.raises(SystemExit):
        main(["plugin", "new", "--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(scaffold_kinds()) + "}" in out  # the --kind choices
    assert all(f"\n  {short} " in out for short in scaffold_kinds())  # and each one explained
