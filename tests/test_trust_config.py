"""What configs and plugins may make clipkit do: no repository code without the caller's opt-in, no file
or plugin that takes down every command, no config that builds until memory runs out."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

import clipkit
from _helpers import TINY, write_config
from clipkit import cli
from clipkit.config import MAX_CONFIG_BYTES, _store
from clipkit.errors import ClipkitError, ConfigError, PluginWarning
from clipkit.registry import registry

VISION = {"image_size": 32, "patch_size": 8, "layers": 1, "width": 32, "head_width": 16}

# a repository with its own code, as on the hub: its modules write a marker when imported
EVIL_CONFIG = {"model_type": "clipkit-evil", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
               "pad_token_id": 0, "auto_map": {"AutoConfig": "evil_model.EvilConfig",
                                               "AutoModel": "evil_model.EvilModel"}}
EVIL_MODEL = '''
import os

open(os.environ["EVIL_MARKER"], "a").write("model\\n")

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput


class EvilConfig(PretrainedConfig):
    model_type = "clipkit-evil"

    def __init__(self, vocab_size=64, hidden_size=16, num_hidden_layers=2, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers


class EvilModel(PreTrainedModel):
    config_class = EvilConfig

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(nn.Linear(config.hidden_size, config.hidden_size)
                                    for _ in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden = torch.tanh(layer(hidden))
        return BaseModelOutput(last_hidden_state=hidden)
'''
EVIL_TOKENIZER = 'import os\nopen(os.environ["EVIL_MARKER"], "a").write("tokenizer\\n")\n'


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """A saved model folder whose config asks for remote code, and the same config as a JSON file."""
    root = tmp_path_factory.mktemp("evil")
    repo = root / "repo"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps(EVIL_CONFIG))
    (repo / "evil_model.py").write_text(EVIL_MODEL)
    (repo / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}}))
    (repo / "evil_tok.py").write_text(EVIL_TOKENIZER)
    model_cfg = {"embed_dim": 8, "vision_cfg": VISION,
                 "text_cfg": {"hf_model_name": str(repo), "hf_model_pretrained": False, "hf_tokenizer_name": str(repo),
                              "context_length": 8, "trust_remote_code": True,
                              "tokenizer_kwargs": {"trust_remote_code": True}}}
    (repo / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    (repo / "open_clip_model.safetensors").write_bytes(b"")  # found, never read: the build stops first
    (root / "evil.json").write_text(json.dumps(model_cfg))
    return root


def _python(code, env=None, timeout=240):
    """Run code in a child with stdin closed: a [y/N] prompt fails the test instead of waiting."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=env, timeout=timeout)


def _env(marker, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPKIT_")}
    env.update(EVIL_MARKER=str(marker), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def test_a_config_never_turns_on_remote_code(evil, tmp_path):
    marker = tmp_path / "marker"
    repo, config = evil / "repo", evil / "evil.json"
    code = f"""
    import json
    import clipkit
    from clipkit.train import main

    calls = {{
        "create_model(local-dir)": lambda: clipkit.create_model("local-dir:{repo}"),
        "create_model(json)": lambda: clipkit.create_model("{config}"),
        "create_model_and_transforms": lambda: clipkit.create_model_and_transforms("local-dir:{repo}"),
        "create_model_from_pretrained": lambda: clipkit.create_model_from_pretrained("local-dir:{repo}"),
        "get_tokenizer(local-dir)": lambda: clipkit.get_tokenizer("local-dir:{repo}"),
        "get_tokenizer(json)": lambda: clipkit.get_tokenizer("{config}"),
    }}
    for name, call in calls.items():
        try:
            call()
            print(name, "LOADED")
        except clipkit.ClipkitError as exc:
            print(name, "ERROR", json.dumps(str(exc)))
    status = main(["--model", "{config}", "--dataset-type", "synthetic", "--train-num-samples", "8",
                   "--batch-size", "4", "--epochs", "1", "--workers", "0", "--device", "cpu", "--logs", "{tmp_path}"])
    print("clipkit-train", status)
    """
    done = _python(code, env=_env(marker))
    assert not marker.exists(), f"repository code ran: {marker.read_text()}"
    assert "[y/N]" not in done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert len(lines) == 7, done.stdout + done.stderr
    for name, outcome in lines.items():
        if name == "clipkit-train":
            assert outcome != "0"
            continue
        kind, message = outcome.split(" ", 1)
        message = json.loads(message)
        assert kind == "ERROR" and "\n" not in message, (name, message)
        assert repr(str(repo)) in message and "contains custom code" in message
        assert "trust_remote_code=True" in message and "CLIPKIT_TRUST_REMOTE_CODE=1" in message
        assert "--trust-remote-code" in message
    # the trainer stops with the same one line, and the config's request is named as ignored
    assert f"text_cfg.hf_model_name {str(repo)!r} contains custom code" in done.stderr
    assert "text_cfg.trust_remote_code, text_cfg.tokenizer_kwargs.trust_remote_code: a config may only ask" \
        in done.stderr


def test_the_callers_opt_in_loads_the_repository(evil, tmp_path):
    marker = tmp_path / "marker"
    code = f"""
    import torch, clipkit
    model = clipkit.create_model("local-dir:{evil / 'repo'}", load_weights=False, trust_remote_code=True)
    print(tuple(model.encode_text(torch.randint(1, 60, (2, 8))).shape))
    try:
        clipkit.get_tokenizer("local-dir:{evil / 'repo'}", trust_remote_code=True)
    except clipkit.ClipkitError as exc:  # its module ran (the marker) but defines no tokenizer class
        print("has no attribute 'EvilTokenizer'" in str(exc))
    """
    done = _python(code, env=_env(marker))
    assert done.stdout.split() == ["(2,", "8)", "True"], done.stderr
    assert marker.read_text().split() == ["model", "tokenizer"]


class _Stop(Exception):
    pass


@pytest.fixture
def transformers_calls(monkeypatch):
    """What clipkit asks of transformers, recorded; every load stops there."""
    import transformers

    calls = []

    def record(what):
        def from_pretrained(name, **kwargs):
            calls.append((what, kwargs.get("trust_remote_code", "not given")))
            raise _Stop

        return from_pretrained

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record("AutoConfig"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("AutoTokenizer"))
    return calls


@pytest.mark.parametrize("env,argument,expected", [(None, False, False), (None, True, True), ("1", False, True),
                                                   ("0", False, False)])
def test_the_opt_in_is_what_reaches_transformers(evil, transformers_calls, monkeypatch, env, argument, expected):
    if env is not None:
        monkeypatch.setenv("CLIPKIT_TRUST_REMOTE_CODE", env)
    name = f"local-dir:{evil / 'repo'}"
    for call in (lambda: clipkit.create_model(name, trust_remote_code=argument),
                 lambda: clipkit.get_tokenizer(name, trust_remote_code=argument)):
        with pytest.raises(ClipkitError, match="_Stop"):
            call()
    # always explicit (None would let transformers prompt), and never the config's own True
    assert transformers_calls == [("AutoConfig", expected), ("AutoTokenizer", expected)]


def test_the_trainer_flag_reaches_transformers(evil, transformers_calls, tmp_path):
    from clipkit.train import main

    argv = ["--model", str(evil / "evil.json"), "--dataset-type", "synthetic", "--train-num-samples", "8",
            "--batch-size", "4", "--epochs", "1", "--workers", "0", "--device", "cpu", "--logs", str(tmp_path)]
    assert main(argv + ["--name", "without"]) != 0
    assert main(argv + ["--name", "with", "--trust-remote-code"]) != 0
    assert transformers_calls == [("AutoConfig", False), ("AutoConfig", True)]


def test_config_check_warns_when_a_config_asks_for_remote_code(evil, capsys):
    assert cli.main(["config", "check", f"local-dir:{evil / 'repo'}", str(evil / "evil.json")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    for line in err:
        assert line.startswith("warning: ")
        assert "text_cfg.trust_remote_code, text_cfg.tokenizer_kwargs.trust_remote_code: a config may only ask" in line
        assert "--trust-remote-code" in line and "CLIPKIT_TRUST_REMOTE_CODE=1" in line
    assert cli.main(["config", "check", "ViT-B-32"]) == 0
    assert capsys.readouterr().err == ""


# -- one file or plugin must not break every command -----------------------------------------------

def _clipkit(*args, env):
    return subprocess.run([sys.executable, "-m", "clipkit", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture
def bad_config_folder(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    big = dict(TINY, padding="x" * MAX_CONFIG_BYTES)
    (folder / "big.json").write_text(json.dumps(big))
    (folder / "mine.json").write_text(json.dumps(TINY))
    return folder


def test_a_deep_or_huge_json_file_is_skipped_with_a_warning(bad_config_folder, monkeypatch, caplog):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CLIPKIT_")},
           "CLIPKIT_MODEL_CONFIG_PATH": str(bad_config_folder)}
    for args in (["models"], ["config", "check", "ViT-B-32"], ["config", "check", "mine"]):
        done = _clipkit(*args, env=env)
        assert done.returncode == 0, done.stderr
        assert f"{bad_config_folder / 'deep.json'} skipped: nested more than 64 levels deep" in done.stderr
        assert f"{bad_config_folder / 'big.json'} skipped: larger than the 1 MiB limit" in done.stderr
        assert "Traceback" not in done.stderr
    assert "mine" in _clipkit("models", env=env).stdout.split()

    file = _clipkit("config", "check", str(bad_config_folder / "deep.json"), env=env)
    assert file.returncode == 2 and "nested more than 64 levels deep" in file.stderr and "Traceback" not in file.stderr

    monkeypatch.setenv("CLIPKIT_MODEL_CONFIG_PATH", str(bad_config_folder))
    _store.invalidate()
    with caplog.at_level(logging.WARNING, logger="clipkit"):
        assert clipkit.create_model("ViT-B-32", device="meta").embed_dim == 512
    assert any("deep.json skipped" in r.getMessage() for r in caplog.records)
    with pytest.raises(ClipkitError, match="big.json: larger than the 1 MiB limit of a model config file"):
        clipkit.create_model(str(bad_config_folder / "big.json"))


def test_a_plugin_shipping_a_deep_config_loses_only_that_config(plugin_module, tmp_path, caplog):
    deep_file = tmp_path / "deep.json"
    deep_file.write_text("{\"a\": " * 100_000 + "1" + "}" * 100_000)
    deep_dict = {}
    for _ in range(100_000):
        deep_dict = {"a": deep_dict}

    @clipkit.hookimpl
    def register_model_configs(register):
        register("deep-file", str(deep_file))
        register("deep-dict", deep_dict)
        register("fine", TINY)

    with caplog.at_level(logging.WARNING, logger="clipkit"):
        plugin_module("deepplug", register_model_configs=register_model_configs)
        names = clipkit.list_models()
    assert "fine" in names and "ViT-B-32" in names and "deep-file" not in names and "deep-dict" not in names
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "model config 'deep-file' from deepplug" in messages and "nested more than 64 levels deep" in messages
    assert "model config 'deep-dict' from deepplug" in messages
    assert clipkit.create_model("ViT-B-32", device="meta").embed_dim == 512


EXITING_PLUGIN = "import sys\nsys.exit('clipkit plugin quitting at import')\n"


@pytest.fixture
def exiting_plugin_site(tmp_path):
    """An installed distribution (its dist-info on PYTHONPATH) whose plugin module calls sys.exit()."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "exitplug.py").write_text(EXITING_PLUGIN)
    info = site / "clipkit_plugin_exitplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clipkit-plugin-exitplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[clipkit]\nexitplug = exitplug\n")
    return site


def test_a_plugin_calling_sys_exit_is_a_failed_plugin(exiting_plugin_site):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPKIT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(exiting_plugin_site), env.get("PYTHONPATH")) if p)
    plugins = _clipkit("plugins", "--json", env=env)
    assert plugins.returncode == 0, plugins.stderr
    info = {p["name"]: p for p in json.loads(plugins.stdout)["plugins"]}["exitplug"]
    assert info["status"] == "failed" and "SystemExit('clipkit plugin quitting at import')" in info["error"]
    for args in (["models"], ["config", "check", "ViT-B-32"], ["plugins"]):
        done = _clipkit(*args, env=env)
        assert done.returncode == 0, done.stderr
        assert "clipkit plugin skipped: clipkit-plugin-exitplug 0.1 (plugin 'exitplug') failed to load: SystemExit" \
            in done.stderr
    assert "ViT-B-32" in _clipkit("models", env=env).stdout.split()


def test_sys_exit_in_a_hook_or_a_lazy_factory_fails_only_that_plugin(plugin_module, tiny_cfg, tmp_path, monkeypatch):
    @clipkit.hookimpl
    def register_poolers(register):
        sys.exit(3)

    with pytest.warns(PluginWarning, match="exithook.*hook register_poolers raised SystemExit\\(3\\)"):
        plugin_module("exithook", register_poolers=register_poolers)
    assert {p.name: p for p in registry.plugins()}["exithook"].status == "failed"

    (tmp_path / "exitfactory_impl.py").write_text(EXITING_PLUGIN)  # the tower's module exits when imported
    monkeypatch.syspath_prepend(str(tmp_path))

    @clipkit.hookimpl
    def register_vision_towers(register):
        register("exittower", "exitfactory_impl:build")

    plugin_module("exitfactory", register_vision_towers=register_vision_towers)
    tiny_cfg["vision_cfg"] = {"type": "exittower"}
    with pytest.raises(ClipkitError, match="vision tower type 'exittower' from exitfactory.*cannot import "
                                           "'exitfactory_impl': SystemExit"):
        clipkit.create_model(write_config(tmp_path, tiny_cfg))
    assert clipkit.create_model("ViT-B-32", device="meta").embed_dim == 512


# -- sizes a config cannot talk past -----------------------------------------------------------------

HUGE = dict(TINY, vision_cfg=dict(TINY["vision_cfg"], layers=1_000_000, width=1_000_000_000, head_width=1000))


def test_config_check_reports_an_absurd_size(tmp_path, capsys, monkeypatch):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(HUGE))
    assert cli.main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"{path}: vision_cfg: width 1000000000 and layers 1000000 make the model about 1.2e+25 "
                   f"parameters (4.47e+16 GiB in fp32, 1.2e+25 in vision_cfg), over the limit of 2e+10; "
                   f"set CLIPKIT_MAX_PARAMS to build it anyway")
    monkeypatch.setenv("CLIPKIT_MAX_PARAMS", "1e26")
    assert cli.main(["config", "check", str(path)]) == 0
    monkeypatch.setenv("CLIPKIT_MAX_PARAMS", "lots")
    assert cli.main(["config", "check", str(path)]) == 1
    assert "CLIPKIT_MAX_PARAMS='lots' is not a number of parameters (e.g. 5e10)" in capsys.readouterr().err


def test_create_model_refuses_an_absurd_size_before_building(tmp_path, monkeypatch):
    huge_text = dict(TINY, text_cfg=dict(TINY["text_cfg"], vocab_size=10 ** 12))
    for cfg, where in ((HUGE, "vision_cfg"), (huge_text, "text_cfg")):
        path = tmp_path / "huge.json"
        path.write_text(json.dumps(cfg))
        with pytest.raises(ConfigError) as caught:
            clipkit.create_model(str(path))
        message = str(caught.value)
        assert "\n" not in message and f"huge.json: {where}: width" in message
        assert "over the limit of 2e+10; set CLIPKIT_MAX_PARAMS to build it anyway" in message
    monkeypatch.setenv("CLIPKIT_MAX_PARAMS", "1000")  # the bound applies to every model, builtin ones too
    with pytest.raises(ConfigError, match="about 1.51e\\+08 parameters .* over the limit of 1e\\+03"):
        clipkit.create_model("ViT-B-32", device="meta")


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-H-14-CLIPA", "tiny"])
def test_the_estimate_is_the_parameter_count_of_builtin_towers(name, tmp_path):
    from clipkit._size import tower_params

    model = clipkit.create_model(name if name != "tiny" else write_config(tmp_path, TINY), device="meta")
    config = model.model_config
    for tower, cfg in ((model.visual, config.vision), (model.text, config.text)):
        real = sum(p.numel() for p in tower.parameters())
        assert abs(tower_params(cfg, config.embed_dim) - real) <= real * 1e-4


# -- a plugin's config named like a builtin one ------------------------------------------------------

def test_a_plugin_config_replacing_a_builtin_one_is_named(plugin_module, capsys, caplog):
    @clipkit.hookimpl
    def register_model_configs(register):
        register("ViT-B-32", TINY)

    with caplog.at_level(logging.WARNING, logger="clipkit"):
        plugin_module("shadowplug", register_model_configs=register_model_configs)
        assert clipkit.create_model("ViT-B-32", device="meta").embed_dim == 32
    warned = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith("model config 'ViT-B-32' from shadowplug in-process (plugin 'shadowplug') replaces the "
                                "builtin config of that name (") and warned[0].endswith("model_configs/ViT-B-32.json)")
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "ViT-B-32  (from shadowplug in-process (plugin 'shadowplug'), replacing the builtin config)" in lines
    assert "ViT-B-16" in lines  # the others as before
