"""The training data pipeline: coverage, determinism, exact mid-epoch resume, bad samples, sources."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from _train_support import png, synthetic_samples, write_dataset, write_tar
from clipkit.train import shards as wds
from clipkit.train.data import (
    CsvSource,
    DataError,
    EpochStream,
    Loader,
    Progress,
    ShardSource,
    SyntheticSource,
    read_list,
    train_loader,
)
from clipkit.train.settings import DataSettings
from clipkit.train.shards import write_shards

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _tokens(texts):
    return torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])


def _pixels(image):
    return torch.tensor([image.size[0], image.getpixel((0, 0))[0]], dtype=torch.float32)


def _loader(source, workers=2, batch=4, rank=0, world=1, train=True, num_batches=None, seed=0):
    stream = EpochStream(source, batch_size=batch, transform=_pixels, tokenizer=_tokens, train=train, seed=seed,
                         rank=rank, world=world)
    return Loader(stream, workers, 0, num_batches)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, write_dataset(root / "six", shards=6, per_shard=10)


def _keys(loader, epoch=0, progress=None):
    return [k for item in loader.epoch(epoch, progress) for k in item["keys"]]


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(shards):
    _, pattern = shards
    seen, dropped = [], []
    for rank in (0, 1):
        loader = _loader(ShardSource(pattern), rank=rank, world=2)
        seen += _keys(loader)
        dropped += list(loader.progress.dropped.values())
    assert len(seen) == len(set(seen))  # no duplicates
    assert len(seen) + sum(dropped) == 60  # no gaps, except the counted partial batches
    assert len(dropped) == 4 and all(d < 4 for d in dropped)  # at most one partial batch per worker


def test_order_is_seeded_and_changes_per_epoch(shards):
    _, pattern = shards
    first = _keys(_loader(ShardSource(pattern)), epoch=0)
    assert first == _keys(_loader(ShardSource(pattern)), epoch=0)
    assert first != _keys(_loader(ShardSource(pattern)), epoch=1)
    assert first != _keys(_loader(ShardSource(pattern), seed=1), epoch=0)
    again = _loader(ShardSource(pattern))
    assert len(set(first) & set(_keys(again, epoch=1))) > 40  # the same data (partial batches differ)


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.slow
def test_resume_from_any_position_continues_the_same_batches(shards, workers):
    _, pattern = shards
    full = [(item["keys"], item["images"], item["texts"]) for item in _loader(ShardSource(pattern), workers).epoch(0)]
    for stop in range(len(full) + 1):
        loader = _loader(ShardSource(pattern), workers)
        head = []
        for item in loader.epoch(0):
            head.append(item["keys"])
            if len(head) == stop:
                break
        state = Progress.from_state(json.loads(json.dumps(loader.progress.as_state())))  # as saved
        rest = [(item["keys"], item["images"], item["texts"]) for item in _loader(ShardSource(pattern), workers).epoch(0, state)]
        assert head + [r[0] for r in rest] == [f[0] for f in full], f"stopped after {stop}"
        for (_, img, txt), (_, img2, txt2) in zip(rest, full[stop:]):
            assert torch.equal(img, img2) and torch.equal(txt, txt2)


def test_fewer_shards_than_workers_does_not_hang(tmp_path):
    pattern = write_dataset(tmp_path, shards=1, per_shard=12)
    keys = _keys(_loader(ShardSource(pattern), workers=3))
    assert sorted(keys) == sorted(f"{tmp_path}/00000.tar:s{i:06d}" for i in range(12))


def _bad_shard(path: Path, truncate: bool = False) -> None:
    good = list(synthetic_samples(6))
    members = [(s["__key__"], ext, s[ext]) for s in good[:3] for ext in ("png", "txt")]
    members += [("garbage", "png", b"this is not an image"), ("garbage", "txt", "a caption"),
                ("empty", "png", b""), ("empty", "txt", "a caption"),
                ("nocaption", "png", good[3]["png"]), ("nocaption", "json", "{}"),
                ("pickle", "png", good[4]["png"]), ("pickle", "txt", "fine"), ("pickle", "pyd", b"\x80\x04K\x01.")]
    write_tar(path, members)
    if truncate:
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) * 2 // 3])


def test_bad_samples_are_skipped_and_counted_by_kind(tmp_path):
    _bad_shard(tmp_path / "bad.tar")
    loader = _loader(ShardSource(str(tmp_path / "bad.tar")), workers=0, batch=1)
    keys = _keys(loader)
    assert sorted(k.rsplit(":", 1)[1] for k in keys) == ["pickle", "s000000", "s000001", "s000002"]
    assert loader.progress.skipped() == {"bad_image": 1, "empty_image": 1, "missing_caption": 1}


def test_truncated_shard_keeps_its_complete_samples_and_counts_it(tmp_path):
    _bad_shard(tmp_path / "cut.tar", truncate=True)
    loader = _loader(ShardSource(str(tmp_path / "cut.tar")), workers=0, batch=1)
    assert len(_keys(loader)) >= 1
    assert loader.progress.skipped()["bad_shard"] == 1


def test_pipe_and_multiple_sources(shards, tmp_path):
    root, _ = shards
    spec = f"pipe:cat {root}/six/{{00000..00001}}.tar::{root}/six/00002.tar"
    keys = _keys(_loader(ShardSource(spec), workers=0, batch=5, train=False))
    assert len(keys) == 30


def test_sample_count_from_sizes_json_len_file_or_counting(tmp_path):
    pattern = write_dataset(tmp_path / "a", shards=2, per_shard=7)
    assert wds.count_samples(pattern) == (14, "sizes.json/__len__")
    (tmp_path / "a" / "sizes.json").unlink()
    n, how = wds.count_samples(pattern)
    assert n == 14 and how.startswith("counted")
    (tmp_path / "a" / "__len__").write_text("14\n")
    assert wds.count_samples(pattern)[0] == 14


def test_resampled_upsampling_factors_weight_the_sources(tmp_path):
    a = write_dataset(tmp_path / "a", shards=2, per_shard=4)
    b = write_dataset(tmp_path / "b", shards=2, per_shard=4, seed=1)
    source = ShardSource(f"{a}::{b}", weights=[1.0, 3.0])
    stream = EpochStream(source, batch_size=4, transform=_pixels, tokenizer=_tokens, train=True, resampled=True)
    loader = Loader(stream, 0, 0, 200)
    keys = _keys(loader)
    from_b = sum("/b/" in k for k in keys) / len(keys)
    assert 0.65 < from_b < 0.85  # 3:1


def test_csv_wrong_separator_names_the_columns_found(tmp_path):
    (tmp_path / "x.png").write_bytes(png(Image.new("RGB", (8, 8))))
    (tmp_path / "d.csv").write_text("filepath,title\nx.png,a black square\n")
    with pytest.raises(DataError) as err:
        CsvSource(str(tmp_path / "d.csv"), "filepath", "title", "\t")
    msg = str(err.value)
    assert "column(s) 'filepath', 'title' not found" in msg and "['filepath,title']" in msg
    assert "pass --csv-separator ','" in msg
    with pytest.raises(DataError, match="'caption' not found"):
        CsvSource(str(tmp_path / "d.csv"), "filepath", "caption", ",")
    source = CsvSource(str(tmp_path / "d.csv"), "filepath", "title", ",")
    keys = _keys(_loader(source, workers=0, batch=1, train=False))
    assert keys == [f"{tmp_path / 'd.csv'}:2"]


def test_synthetic_pairs_are_varied_and_deterministic():
    source = SyntheticSource(50, seed=0)
    captions = {source.sample(i)[1] for i in range(50)}
    assert len(captions) > 8  # OpenCLIP's synthetic data has a single caption
    a, b = source.sample(3)[0], SyntheticSource(50, seed=0).sample(3)[0]
    assert a.tobytes() == b.tobytes()


def test_lists_read_json_or_lines(tmp_path):
    (tmp_path / "a.json").write_text('["cat", "dog"]')
    (tmp_path / "b.txt").write_text("a photo of a {}.\n\nan image of {c}\n")
    assert read_list(str(tmp_path / "a.json"), "class names") == ["cat", "dog"]
    assert read_list(str(tmp_path / "b.txt"), "templates") == ["a photo of a {}.", "an image of {c}"]
    (tmp_path / "c.txt").write_text("\n")
    with pytest.raises(DataError, match="no templates"):
        read_list(str(tmp_path / "c.txt"), "templates")


def test_too_few_samples_for_a_batch_is_a_clear_error(tmp_path):
    pattern = write_dataset(tmp_path, shards=1, per_shard=3)
    data = DataSettings(dataset_type="webdataset", train_data=pattern, batch_size=8, workers=0)
    with pytest.raises(DataError, match="3 samples are fewer than one global batch"):
        train_loader(data, 0, _pixels, _tokens, 0, 1, 32)


def test_oversized_member_is_counted_once(tmp_path, monkeypatch):
    samples = list(synthetic_samples(3))
    cap = max(len(s["png"]) for s in samples) + 10
    monkeypatch.setattr(wds, "MAX_MEMBER_BYTES", cap)
    samples[1]["png"] = samples[1]["png"] + b"\0" * cap  # over the cap
    write_shards(samples, tmp_path, per_shard=3)
    loader = _loader(ShardSource(str(tmp_path / "00000.tar")), workers=0, batch=1)
    keys = _keys(loader)
    assert loader.progress.skipped() == {"too_large": 1} and len(keys) == 2
