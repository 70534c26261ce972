"""Helpers shared by the test files (no torch here): the tiny model config, model-config files, a free TCP
port for process groups, and plugin distributions pip-installed into a throwaway folder."""
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

#: A tiny builtin-tower model: 32-px images, 16-token texts, built in milliseconds.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 48, "heads": 4, "layers": 2},
}


def tiny() -> dict:
    """A fresh copy of :data:`TINY`, for a test to change."""
    return copy.deepcopy(TINY)


def write_config(folder: Path, cfg: dict, name: str = "tiny.json") -> str:
    """``cfg`` written as the model config file ``folder/name``; its path, as a model name."""
    path = Path(folder) / name
    path.write_text(json.dumps(cfg))
    return str(path)


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_plugin(source: Path, tmp_path_factory) -> Path:
    """The distribution at ``source`` pip-installed (offline, no build isolation) into a folder of its own;
    processes given that folder on PYTHONPATH (:func:`plugin_env`) see it installed, the others do not, so
    the shared environment is never modified."""
    site = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("build") / "src"
    # building writes build/ and egg-info beside the sources: build a copy, without any a developer left there
    shutil.copytree(source, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return site


def plugin_env(site=None, base=None, **extra) -> dict:
    """``base`` (default: this process's environment) with PYTHONPATH holding only ``site`` (none without
    it: the plugin is then not installed), plus ``extra`` variables."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    env.update(extra)
    return env
