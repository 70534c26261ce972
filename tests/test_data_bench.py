"""``clipkit data bench``: the trainer's data pipeline timed per worker count, through the console script."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _train_support import synthetic_samples, write_dataset, write_model, write_tar
from clipkit.cli import main
from clipkit.train.data_bench import BenchRow, advice, parse_counts

CLIPKIT = str(Path(sys.executable).parent / "clipkit")


def _clipkit(*args):
    # warnings off: a plugin installed beside clipkit may warn on stderr, which is not what is tested
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([CLIPKIT, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def _damaged_shard(path: Path) -> None:
    """Two good samples, an undecodable image and an empty one."""
    good = list(synthetic_samples(2, seed=3))
    members = [(s["__key__"], ext, s[ext]) for s in good for ext in ("png", "txt")]
    members += [("garbage", "png", b"not an image"), ("garbage", "txt", "a caption"),
                ("empty", "png", b""), ("empty", "txt", "a caption")]
    write_tar(path, members)


@pytest.mark.slow
def test_bench_prints_a_row_per_worker_count_with_the_counts(tmp_path):
    write_dataset(tmp_path / "data", shards=3, per_shard=16)
    _damaged_shard(tmp_path / "data" / "00003.tar")
    model = write_model(tmp_path)
    # more samples than the data holds: every sample is read, so the counts are exact for any worker count
    done = _clipkit("data", "bench", f"{tmp_path}/data/{{00000..00003}}.tar", "--model", model, "--workers", "0,2",
                    "--batch-size", "8", "--samples", "1000")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path}/data/{{00000..00003}}.tar: up to 1000 samples in batches of 8, decoded "
                               f"and transformed for {model} (32 px) as clipkit-train does")
    assert lines[1].split() == ["workers", "samples", "batches", "bad", "first", "batch", "s", "samples/s", "bad",
                                "kinds"]
    rows = [re.match(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(.*)$", line) for line in lines[2:4]]
    assert all(rows), lines
    # 50 good samples: 6 whole batches of 8 on one worker, and on two (32 + 18 samples: 4 + 2 batches)
    assert [(int(r[1]), int(r[2]), int(r[3]), int(r[4]), r[7]) for r in rows] == [
        (0, 48, 6, 2, "bad_image 1, empty_image 1"), (2, 48, 6, 2, "bad_image 1, empty_image 1")]
    assert all(float(r[6]) > 0 for r in rows)
    assert re.fullmatch(r"fastest: --workers [02] at [\d.]+ samples/s; .*", lines[4])
    assert len(lines) == 5


def test_bench_of_missing_shards_is_one_line(tmp_path, capsys):
    spec = f"{tmp_path}/nowhere/{{00000..00001}}.tar"
    assert main(["data", "bench", spec, "--model", write_model(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"clipkit data bench: SHARDS: '{spec}': 2 shard(s) not found, e.g. "
                            f"{tmp_path}/nowhere/00000.tar\n")


def test_worker_counts_and_the_closing_advice():
    assert parse_counts("0,1,2,4") == [0, 1, 2, 4]
    for bad in ("", "1,-1", "two"):
        with pytest.raises(ValueError, match="expected worker counts such as 0,1,2,4"):
            parse_counts(bad)
    rows = [BenchRow(0, 64, 8, seconds=1.4), BenchRow(2, 64, 8, seconds=0.7), BenchRow(4, 8, 1)]
    assert [r.samples_per_s for r in rows] == [40.0, 80.0, None]
    assert advice(rows).startswith("fastest: --workers 2 at 80.0 samples/s")
    assert advice([BenchRow(1, 8, 1)]) == "too few batches to measure a rate: raise --samples"


def test_fewer_samples_than_a_batch_is_one_line(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", shards=1, per_shard=8)
    assert main(["data", "bench", data, "--model", write_model(tmp_path), "--batch-size", "8", "--samples", "4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "clipkit data bench: --samples 4 is less than one batch (--batch-size 8)\n"
