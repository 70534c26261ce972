"""Data sources as registered parts (kind data_source): a plugin's source trains when named by
--dataset-type or selected by the extension it declares, a source that cannot resume exactly says so,
unknown names get one line, the builtins' inference is what it was, and the contract checks catch
broken sources."""
import json
import re
import signal
from pathlib import Path

import pytest

import clipkit
from _train_support import base_args, run_inprocess, synthetic_samples, write_model
from clipkit.errors import ArgsError, ContractError, DataError
from clipkit.plugin import DataSource
from clipkit.testing import Case, contract_cases
from clipkit.train import data_sources, main
from clipkit.train.args import build_parser, infer_dataset_type, parse_args

_STOP = {"at": None, "read": 0}  # the N-th sample read sends this process SIGTERM (a run stopped mid-epoch)


class PairsSource(DataSource):
    """Lines ``image-file<TAB>caption`` of a text file, images beside it."""

    unit = "line"

    def __init__(self, spec):
        self.path = Path(spec)
        self.rows = [line.split("\t") for line in self.path.read_text().splitlines()]

    def units(self):
        return list(range(len(self.rows)))

    def read(self, units, counts):
        for i in units:
            _STOP["read"] += 1
            if _STOP["read"] == _STOP["at"]:
                signal.raise_signal(signal.SIGTERM)
            image, caption = self.rows[i]
            try:
                data = (self.path.parent / image).read_bytes()
            except OSError:
                data = None
            yield {"__key__": f"{self.path.name}:{i}", "image": data, "text": caption, "label": None}


def write_pairs(folder: Path, n: int = 32, name: str = "train.pairs") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for sample in synthetic_samples(n):
        (folder / f"{sample['__key__']}.png").write_bytes(sample["png"])
        lines.append(f"{sample['__key__']}.png\t{sample['txt']}")
    (folder / name).write_text("\n".join(lines) + "\n")
    return str(folder / name)


def _example(folder):
    return write_pairs(folder, n=6)


@clipkit.hookimpl
def register_data_sources(register):
    register("pairs", lambda spec, ctx: PairsSource(spec), extensions=("pairs",), example=_example)
    register("stream", lambda spec, ctx: PairsSource(spec), extensions=("stream",), exact_resume=False,
             example=_example)


@pytest.fixture
def pairs_plugin(clipkit_plugins):
    _STOP.update(at=None, read=0)
    yield clipkit_plugins.module("pairsplug", register_data_sources=register_data_sources)
    _STOP.update(at=None, read=0)


def _log(logs, name):
    return (logs / name / "out.log").read_text()


@pytest.mark.slow
def test_a_plugin_source_trains_named_or_by_its_extension_and_reads_evaluation_data(pairs_plugin, tmp_path):
    model = write_model(tmp_path)
    data = write_pairs(tmp_path / "data")
    named = write_pairs(tmp_path / "data", name="train.txt")  # no extension any source declares
    logs = tmp_path / "logs"
    assert run_inprocess(base_args(model, named, logs, "named", "--dataset-type", "pairs", "--epochs", "1",
                                   "--workers", "2")) == 0
    assert run_inprocess(base_args(model, data, logs, "inferred", "--epochs", "1", "--val-data", data)) == 0
    for name in ("named", "inferred"):
        settings = json.loads((logs / name / "settings.json").read_text())
        assert settings["data"]["dataset_type"] == "pairs"
        log = _log(logs, name)
        assert "train data: 32 samples (one per line)" in log
        assert "epoch 1 data: 32 samples in 4 batches; skipped: none" in log
        assert "cannot resume exactly" not in log
        assert (logs / name / "checkpoints" / "epoch_1.pt").is_file()
    results = [json.loads(line)
               for line in (logs / "inferred" / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert results[-1]["num_samples"] == 32 and "image_to_text_R@1" in results[-1]


@pytest.mark.slow
def test_a_source_without_exact_resume_says_so_and_restarts_a_resumed_epochs_data(pairs_plugin, tmp_path, capsys):
    model = write_model(tmp_path)
    data = write_pairs(tmp_path / "data", name="train.stream")
    logs = tmp_path / "logs"
    args = base_args(model, data, logs, "live", "--epochs", "1", "--workers", "0")
    _STOP["at"] = 20  # read for the third batch of 8 (one process reads): the run stops after step 3 of 4, saved
    assert run_inprocess(args) == 75
    first = _log(logs, "live")
    assert first.count("data source 'stream' cannot resume exactly: a run resumed from a mid-epoch checkpoint "
                       "reads that epoch's data again from its beginning") == 1
    assert "stopped by SIGTERM at epoch 1 step 3" in first
    _STOP["at"] = None
    assert run_inprocess(args + ["--resume", "latest"]) == 0
    resumed = _log(logs, "live")[len(first):]
    assert ("data source 'stream' cannot resume exactly: the rest of epoch 1 is read from the beginning of its "
            "data, not from where the first run stopped (3 batches of it were trained on)") in resumed
    assert "epoch 1 data: 32 samples in 4 batches" in resumed  # 3 batches before the stop, 1 read again


def test_unknown_dataset_types_are_one_line_naming_what_is_installed(pairs_plugin, capsys):
    with pytest.raises(ArgsError) as info:
        parse_args(["--model", "m", "--train-data", "x.tar", "--dataset-type", "webdatset"])
    assert str(info.value) == ("--dataset-type webdatset: unknown data source 'webdatset' (did you mean "
                               "'webdataset'?); installed: csv, folder, pairs, stream, synthetic, webdataset")
    assert main(["--model", "m", "--train-data", "x.pairs", "--dataset-type", "pair"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown data source 'pair' (did you mean 'pairs'?)" in err
    assert "--dataset-type {auto,csv,folder,pairs,stream,synthetic,webdataset}" in build_parser().format_help()
    with pytest.raises(ArgsError, match=r"'data.parquet': cannot tell the dataset type from the extension \(.*"
                                        r"\.pairs -> pairs.*\); pass --dataset-type, one of csv, folder, pairs"):
        parse_args(["--model", "m", "--train-data", "data.parquet"])


@pytest.mark.parametrize("spec, expected", [
    ("shards/{00000..00329}.tar", "webdataset"),
    ("s3://bucket/train-{0000..0099}.tar?versionId=3", "webdataset"),
    ("pipe:aws s3 cp s3://bucket/shard-{000..009}.tar -", "webdataset"),
    ("a/{0..3}.tar::b/{0..1}.tar", "webdataset"),
    ("shards/{x,y}.{tar,tgz}", "webdataset"),
    ("pairs.csv", "csv"),
    ("pairs.TSV", "csv"),
    ("a.csv::b.tar", "csv"),  # the first source decides, as before
])
def test_the_builtins_inference_is_unchanged_and_a_plugin_cannot_take_their_extensions(spec, expected,
                                                                                      clipkit_plugins):
    assert infer_dataset_type(spec, "--train-data") == expected
    assert parse_args(["--model", "m", "--train-data", spec]).data.dataset_type == expected

    @clipkit.hookimpl
    def register_data_sources(register):
        register("grabby", lambda spec, ctx: None, extensions=("tar", "csv", "tsv"), prefixes=("pipe:",))

    clipkit_plugins.module("grabbyplug", register_data_sources=register_data_sources)
    assert infer_dataset_type(spec, "--train-data") == expected


def test_folders_are_the_class_folder_source_and_cannot_be_training_data(tmp_path):
    (tmp_path / "cat").mkdir()
    assert infer_dataset_type(str(tmp_path), "--val-data") == "folder"
    with pytest.raises(ArgsError, match="read by data source 'folder', whose samples have class labels, not captions"):
        parse_args(["--model", "m", "--train-data", str(tmp_path)])
    with pytest.raises(ArgsError, match="--dataset-type synthetic needs --train-num-samples"):
        parse_args(["--model", "m", "--dataset-type", "synthetic"])
    with pytest.raises(ArgsError, match="--train-data synthetic: no such data; generated data is --dataset-type "
                                        "synthetic --train-num-samples N"):
        parse_args(["--model", "m", "--train-data", "synthetic"])
    assert data_sources.choices()[0] == "auto"


def test_evaluation_data_must_carry_what_its_evaluation_reads(tmp_path):
    from clipkit.train.data import data_source
    from clipkit.train.settings import DataSettings

    (tmp_path / "cat").mkdir()
    (tmp_path / "pairs.csv").write_text("filepath\ttitle\n")
    with pytest.raises(DataError, match=f"--val-data '{tmp_path}': data source 'folder' gives samples without "
                                        f"captions"):
        data_source(str(tmp_path), "auto", DataSettings(), flag="--val-data")
    with pytest.raises(DataError, match="--zeroshot-data '.*pairs.csv': data source 'csv' gives samples without "
                                        "class labels, which zero-shot evaluation needs"):
        data_source(str(tmp_path / "pairs.csv"), "auto", DataSettings(), flag="--zeroshot-data", label=True)
    assert data_source(str(tmp_path), "auto", DataSettings(), flag="--zeroshot-data", label=True).classes == ["cat"]


def test_every_builtin_and_plugin_source_has_its_contract_cases(pairs_plugin):
    cases = [str(c) for c in contract_cases("pairsplug")]
    assert cases == ["plugin:pairsplug:loads"] + [f"data_source:{name}:{contract}" for name in ("pairs", "stream")
                                                   for contract in ("builds", "units", "samples", "counted-skips",
                                                                    "workers", "resume")]
    for case in contract_cases("pairsplug"):
        case.run()
    every = {str(c) for c in contract_cases()}
    assert {f"data_source:{name}:resume" for name in ("webdataset", "csv", "synthetic", "folder")} <= every


class _Broken(PairsSource):
    def read(self, units, counts):
        for raw in super().read(units, counts):
            if raw["image"] is None:
                raise OSError(f"cannot read {raw['__key__']}")  # should count it, not raise
            yield raw


class _Shuffled(PairsSource):
    def units(self):
        import random

        units = super().units()
        random.shuffle(units)
        return units


class _SameKeys(PairsSource):
    def read(self, units, counts):
        for raw in super().read(units, counts):
            yield {**raw, "__key__": "same"}


@pytest.mark.parametrize("cls, contract, message", [
    (_Broken, "counted-skips", "reading its example raised OSError"),
    (_Shuffled, "units", "units() differs between two calls or two builds"),
    (_SameKeys, "samples", "two samples of its example have the same '__key__'"),
])
def test_contract_checks_catch_broken_sources(clipkit_plugins, cls, contract, message):
    @clipkit.hookimpl
    def register_data_sources(register):
        register("broken", lambda spec, ctx: cls(spec), example=_example)
        register("noexample", lambda spec, ctx: cls(spec))

    clipkit_plugins.module("brokensources", register_data_sources=register_data_sources)
    with pytest.raises(ContractError, match=rf"data source 'broken' from brokensources .* breaks the contract "
                                            rf"'{contract}': {re.escape(message)}"):
        Case(data_sources._kind(), "broken", contract).run()
    with pytest.raises(ContractError, match="'builds': it registered no example="):
        Case(data_sources._kind(), "noexample", "builds").run()
