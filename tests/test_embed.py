"""clipkit.embed_images / embed_texts and ``clipkit embed``: values, ids, skipped inputs, resume, errors."""
import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipkit
from _train_support import TINY_MODEL, png, subprocess_env, write_model
from clipkit.cli import main as cli_main
from clipkit.train.shards import write_shards


def _image(seed: int, size=(40, 52)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    path = write_model(folder, "tiny-embed", TINY_MODEL)
    model, _, preprocess = clipkit.create_model_and_transforms(path)
    return path, model.eval(), preprocess


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Nine images in nested folders, one file that is not an image, and a text file that is ignored."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(9):
        folder = root / ("cats" if i % 3 else "dogs/big")
        folder.mkdir(parents=True, exist_ok=True)
        _image(i).save(folder / f"{i:02d}.png")
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def _expected(model, preprocess, images) -> np.ndarray:
    with torch.no_grad():
        batch = torch.stack([preprocess(image.convert("RGB")) for image in images])
        return model.encode_image(batch, normalize=True).numpy()


def test_embed_images_folder_ids_values_and_skips(tiny, photos):
    _, model, preprocess = tiny
    rows, ids, skipped = clipkit.embed_images(model, preprocess, photos, batch_size=4)
    expected_ids = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.png"))
    assert ids == expected_ids and ids[0] == "cats/01.png"
    assert skipped == {"bad_image": 1}  # broken.jpg: counted, not silently dropped; notes.txt is no image
    assert rows.dtype == np.float32 and rows.shape == (9, 32)
    np.testing.assert_allclose(rows, _expected(model, preprocess, [Image.open(photos / i) for i in ids]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)

    raw, _, _ = clipkit.embed_images(model, preprocess, photos, batch_size=4, normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), rows, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)

    # two decoding processes: the same rows in the same order
    parallel, parallel_ids, parallel_skipped = clipkit.embed_images(model, preprocess, photos, batch_size=4,
                                                                    workers=2)
    assert parallel_ids == ids and parallel_skipped == skipped
    np.testing.assert_array_equal(parallel, rows)


def test_embed_images_shards_and_csv(tiny, tmp_path):
    _, model, preprocess = tiny
    samples = [{"__key__": f"s{i:03d}", "png": png(_image(100 + i)), "txt": "x"} for i in range(5)]
    samples.append({"__key__": "s999", "png": b"", "txt": "an empty image member"})
    write_shards(samples, tmp_path / "shards", per_shard=3)
    spec = f"{tmp_path}/shards/{{00000..00001}}.tar"
    rows, ids, skipped = clipkit.embed_images(model, preprocess, spec, batch_size=2)
    shard0, shard1 = f"{tmp_path}/shards/00000.tar", f"{tmp_path}/shards/00001.tar"
    assert ids == [f"{shard0}:s000", f"{shard0}:s001", f"{shard0}:s002", f"{shard1}:s003", f"{shard1}:s004"]
    assert skipped == {"empty_image": 1}
    np.testing.assert_allclose(rows, _expected(model, preprocess, [_image(100 + i) for i in range(5)]),
                               rtol=1e-5, atol=1e-6)

    (tmp_path / "pics").mkdir()
    for i in range(3):
        _image(200 + i).save(tmp_path / "pics" / f"{i}.png")
    table = tmp_path / "pics.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["title", "path"])
        for name in ("pics/2.png", "pics/0.png", "pics/gone.png", "pics/1.png"):
            writer.writerow(["a caption", name])
    rows, ids, skipped = clipkit.embed_images(model, preprocess, table, csv_img_key="path", csv_separator=",")
    assert ids == ["pics/2.png", "pics/0.png", "pics/1.png"]  # relative to the CSV's folder, as written
    assert skipped == {"missing_image": 1}
    np.testing.assert_allclose(rows, _expected(model, preprocess, [_image(202), _image(200), _image(201)]),
                               rtol=1e-5, atol=1e-6)


def test_embed_precision(tiny, photos):
    _, model, preprocess = tiny
    full, ids, _ = clipkit.embed_images(model, preprocess, photos, batch_size=4)
    autocast, autocast_ids, _ = clipkit.embed_images(model, preprocess, photos, batch_size=4, precision="amp")
    assert autocast_ids == ids and autocast.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(autocast, axis=1), 1.0, rtol=1e-5)  # normalised in fp32
    assert 0 < np.abs(autocast - full).max() < 0.05  # bf16 autocast on the CPU: close, not equal
    with pytest.raises(clipkit.ClipkitError, match="precision must be one of amp, amp_bf16, amp_bfloat16, bf16, fp16, "
                                                   "pure_bf16, pure_fp16, fp32, got 'fp64'"):
        clipkit.embed_images(model, preprocess, photos, precision="fp64")


def test_embed_texts_and_text_files(tiny, tmp_path):
    _, model, _ = tiny
    tokenizer = clipkit.get_tokenizer(tiny[0])
    texts = ["a photo of a cat", "a dog", "two birds on a wire"]
    rows = clipkit.embed_texts(model, tokenizer, texts, batch_size=2)
    with torch.no_grad():
        expected = model.encode_text(tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)

    from clipkit.embed import read_texts

    (tmp_path / "t.txt").write_text("a photo of a cat\n\na dog\n")
    assert read_texts(tmp_path / "t.txt") == (["1", "3"], ["a photo of a cat", "a dog"], {"empty_text": 1})
    (tmp_path / "t.jsonl").write_text('{"caption": "a dog", "uid": "d1"}\n{"uid": "x"}\n{"caption": "a cat", "uid": 7}\n')
    assert read_texts(tmp_path / "t.jsonl", text_key="caption", id_key="uid") == \
        (["d1", "7"], ["a dog", "a cat"], {"missing_text": 1})
    (tmp_path / "t.csv").write_text("title,uid\na dog,d1\n   ,d2\n")
    assert read_texts(tmp_path / "t.csv", csv_separator=",") == (["2"], ["a dog"], {"empty_text": 1})


def _files(out: Path) -> dict:
    return {name: (out / name).read_bytes() for name in ("embeddings.npy", "ids.txt", "meta.json")}


def _run_killed(args, kill_after: str, times: int) -> subprocess.CompletedProcess:
    """``clipkit embed ARGS`` in a child that SIGKILLs itself right after its ``times``-th call of ``kill_after``."""
    wrapper = (f"import os, signal, sys\nimport clipkit.embed as e\nreal = e.{kill_after}\ncalls = []\n"
               f"def patched(*a, **k):\n    real(*a, **k)\n    calls.append(1)\n"
               f"    if len(calls) == {times}:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
               f"e.{kill_after} = patched\nfrom clipkit.cli import main\nsys.exit(main(['embed', *sys.argv[1:]]))\n")
    return subprocess.run([sys.executable, "-c", wrapper, *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_resume_after_sigkill_gives_identical_files(tiny, tmp_path):
    model_path, model, _ = tiny
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(16):
        _image(300 + i, size=(36, 36)).save(images / f"{i:02d}.png")
    (images / "07.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # one unreadable image among them
    common = [model_path, "--pretrained", str(weights), "--images", str(images), "--chunk-size", "2", "--batch-size", "2",
              "--device", "cpu"]

    whole = tmp_path / "whole"
    script = Path(sys.executable).with_name("clipkit")  # the installed console script
    done = subprocess.run([str(script), "embed", *common, "--out", str(whole), "--workers", "0"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 15 embeddings of dimension 32" in done.stdout and "bad_image 1" in done.stdout
    assert "skipped 1 input(s) that cannot be used: bad_image 1" in done.stderr  # the log line
    meta = json.loads((whole / "meta.json").read_text())
    assert (meta["count"], meta["dim"], meta["normalized"], meta["skipped"]) == (15, 32, True, {"bad_image": 1})
    assert meta["model"] == model_path and meta["pretrained"] == str(weights)
    assert sorted(p.name for p in whole.iterdir()) == ["embeddings.npy", "ids.txt", "meta.json"]
    rows = np.load(whole / "embeddings.npy")  # readable without clipkit
    assert rows.shape == (15, 32) and (whole / "ids.txt").read_text().splitlines()[7] == "08.png"

    out = tmp_path / "resumed"
    # killed after writing its third part file, before the progress record names it
    killed = _run_killed([*common, "--out", str(out), "--workers", "2"], "_write_part", 3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    progress = json.loads((out / "progress.json").read_text())
    assert len(progress["done"]) == 2
    # resumed, and killed again after recording three more chunks
    killed = _run_killed([*common, "--out", str(out), "--workers", "0"], "_write_json", 3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    progress = json.loads((out / "progress.json").read_text())
    assert len(progress["done"]) == 5  # continued, not started over
    # a recorded chunk whose part file is gone, and an entry that is not what clipkit writes: both redone
    first, second = sorted(progress["done"], key=int)[:2]
    (out / "parts" / f"{int(first):06d}.npy").unlink()
    progress["done"][second] = "garbage"
    (out / "progress.json").write_text(json.dumps(progress))
    assert cli_main(["embed", *common, "--out", str(out), "--workers", "0"]) == 0
    assert _files(out) == _files(whole)
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "ids.txt", "meta.json"]
    assert cli_main(["embed", *common, "--out", str(out), "--workers", "0"]) == 0  # finished: nothing to do
    assert _files(out) == _files(whole)


def _one_line_error(capsys, argv, status=1) -> str:
    assert cli_main(argv) == status
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_errors_are_one_line(tiny, photos, tmp_path, capsys):
    model_path = tiny[0]
    out = str(tmp_path / "out")
    assert "exactly one of --images SRC and --texts FILE" in _one_line_error(
        capsys, ["embed", model_path, "--out", out], status=2)
    assert "exactly one of" in _one_line_error(
        capsys, ["embed", model_path, "--images", str(photos), "--texts", "t.txt", "--out", out], status=2)
    assert f"{tmp_path / 'nowhere'}: not found" in _one_line_error(
        capsys, ["embed", model_path, "--images", str(tmp_path / "nowhere"), "--out", out])
    assert "texts.txt: cannot read" in _one_line_error(
        capsys, ["embed", model_path, "--texts", str(tmp_path / "texts.txt"), "--out", out])
    (tmp_path / "a-file").write_text("x")
    assert "a-file: --out is a file" in _one_line_error(
        capsys, ["embed", model_path, "--images", str(photos), "--out", str(tmp_path / "a-file")])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    assert "busy: --out is a folder that is not empty" in _one_line_error(
        capsys, ["embed", model_path, "--images", str(photos), "--out", str(tmp_path / "busy")])

    assert cli_main(["embed", model_path, "--images", str(photos), "--out", out, "--workers", "0"]) == 0
    # no weights: the same random initialisation every run, so a resumed run continues with the same model
    again = tmp_path / "again"
    assert cli_main(["embed", model_path, "--images", str(photos), "--out", str(again), "--workers", "0"]) == 0
    assert _files(Path(out)) == _files(again)
    capsys.readouterr()
    (tmp_path / "texts.txt").write_text("a cat\na dog\n")
    err = _one_line_error(capsys, ["embed", model_path, "--texts", str(tmp_path / "texts.txt"), "--out", out])
    assert "holds a finished embed run that differs (images" in err and "--force" in err
    err = _one_line_error(capsys, ["embed", model_path, "--images", str(photos), "--raw", "--out", out])
    assert "differs (normalized True, now False)" in err
    assert cli_main(["embed", model_path, "--texts", str(tmp_path / "texts.txt"), "--out", out, "--force"]) == 0
    assert (Path(out) / "ids.txt").read_text() == "1\n2\n"
    assert json.loads((Path(out) / "meta.json").read_text())["count"] == 2
