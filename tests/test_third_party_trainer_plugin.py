"""A third-party distribution (own pyproject, entry points) registering an objective, a data source and a
reporter, installed with pip, then selected by flags of the ``clipkit-train`` console script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from _helpers import install_plugin, plugin_env
from _train_support import subprocess_env, write_model

# pip installs a throwaway distribution and trains with its parts
pytestmark = [pytest.mark.slow, pytest.mark.install]

PLUGIN_DIR = Path(__file__).parent / "plugins" / "clipkit-plugin-trainparts"
CLIPKIT_TRAIN = Path(sys.executable).parent / "clipkit-train"
SAMPLES, BATCH = 24, 8


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The distribution pip-installed (offline) into its own folder (see _helpers.install_plugin)."""
    return install_plugin(PLUGIN_DIR, tmp_path_factory)


def _env(site):
    return plugin_env(site, base=subprocess_env())


def _pairs(folder: Path) -> Path:
    """``SAMPLES`` captioned images listed in a JSON Lines file with the extension nothing else claims."""
    lines = []
    for i in range(SAMPLES):
        Image.new("RGB", (32, 32), (10 * i, 255 - 10 * i, 128)).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a square of shade {i}"}))
    path = folder / "train.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_installed_plugin_lists_its_three_trainer_parts(plugin_site):
    done = subprocess.run([sys.executable, "-m", "clipkit", "plugins", "--json"], capture_output=True, text=True,
                          env=_env(plugin_site))
    assert done.returncode == 0, done.stderr
    plugins = {p["name"]: p for p in json.loads(done.stdout)["plugins"]}
    assert plugins["trainparts"]["status"] == "active"
    assert plugins["trainparts"]["registers"] == {"objective": ["clip_centred"], "data_source": ["pairlist"],
                                                  "reporter": ["scalarfile"]}


def test_installed_plugin_passes_its_contract_cases(plugin_site):
    """Every contract case of the three parts (and the plugin's own: it loads without torch), and the
    extension the data source declares selects it under ``--dataset-type auto``."""
    code = ("from clipkit.testing import check_plugin, contract_cases\n"
            "from clipkit.train.data_sources import infer\n"
            "check_plugin('trainparts')\n"
            "kinds = {case.kind for case in contract_cases('trainparts')}\n"
            "print(','.join(sorted(kinds)), infer('data/train.pairs'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(plugin_site))
    assert done.returncode == 0, done.stderr[-3000:]
    kinds, inferred = done.stdout.split()
    assert kinds == "data_source,objective,plugin,reporter" and inferred == "pairlist"


def test_trains_with_the_three_parts_selected_by_flags(plugin_site, tmp_path):
    data = _pairs(tmp_path)
    model = write_model(tmp_path)
    logs = tmp_path / "logs"
    done = subprocess.run(
        [str(CLIPKIT_TRAIN), "--model", model, "--train-data", str(data), "--dataset-type", "pairlist",
         "--objective", "clip_centred", "--objective-opt", "weight=2", "--report-to", "scalarfile",
         "--batch-size", str(BATCH), "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--workers", "1",
         "--precision", "fp32", "--device", "cpu", "--logs", str(logs), "--name", "run", "--log-every-n-steps", "1",
         "--seed", "0"], capture_output=True, text=True, env=_env(plugin_site), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = logs / "run"

    # the data source: every line read exactly once in the one epoch
    read = (tmp_path / "train.txt.read").read_text().split()
    assert sorted(read) == sorted(f"line{i}" for i in range(SAMPLES))

    # the reporter: one line per optimizer step, holding the objective's terms, their sum and the rate
    lines = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/loss" in line["values"]]
    assert [line["step"] for line in train] == [1, 2, 3]
    for line in train:
        values = line["values"]
        assert {"train/contrastive_loss", "train/centring", "train/lr"} <= set(values)
        assert values["train/centring"] > 0
        assert values["train/loss"] == pytest.approx(values["train/contrastive_loss"] + values["train/centring"],
                                                     rel=1e-5)

    # the trainer counted the source's units by their own name, and the run saved a checkpoint
    assert f"train data: {SAMPLES} samples (one per line)" in (run / "out.log").read_text()
    assert (run / "checkpoints" / "epoch_1.pt").is_file()
    assert not (run / "tensorboard").exists()  # --report-to named only the plugin's reporter
