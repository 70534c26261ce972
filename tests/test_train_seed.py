"""The seed document's training commands, with clipkit-train for python -m open_clip_train.main.

They parse and validate exactly as written; then each runs end to end with local shards in place of
S3, a tiny RoBERTa standing in for roberta-base in a local HuggingFace cache, and small batch and
sample counts.
"""
import shlex
import subprocess
import sys

import pytest

from _train_support import subprocess_env, write_dataset
from clipkit.train.args import parse_args

SEED = [
    """--model "roberta-ViT-B-32" --hf-tokenizer-name "roberta-base" --train-data "/path/to/train_data.tar"
       --dataset-type webdataset --batch-size 256 --epochs 10 --lr 5e-4""",
    """--model "roberta-ViT-B-32" --hf-tokenizer-name "roberta-base" --lock-text --lock-text-unlocked-layers 10
       --train-data "/path/to/train_data.tar" --batch-size 256 --epochs 10""",
    """--train-data "pipe:aws s3 cp s3://bucket/data/{00000..00329}.tar -" --train-num-samples 3000000
       --dataset-type webdataset --batch-size 256 --warmup 2000 --epochs 10 --lr 5e-4 --precision amp --workers 6
       --model "roberta-ViT-B-32" --hf-tokenizer-name "roberta-base" --lock-text --lock-text-unlocked-layers 10
       --name "custom-clip" --report-to "tensorboard\"""",
]


def _argv(command: str) -> list:
    return shlex.split(command)


@pytest.mark.parametrize("command", SEED, ids=["hf-text", "lock-text", "full"])
def test_seed_command_parses_as_written(command):
    settings = parse_args(_argv(command))
    assert settings.model.model == "roberta-ViT-B-32" and settings.model.hf_tokenizer_name == "roberta-base"
    assert settings.data.dataset_type == "webdataset" and settings.data.batch_size == 256


def _byte_level_alphabet():
    """The 256 characters byte-level BPE uses for bytes: printable Latin-1 as itself, the rest moved past 255."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    moved = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(moved)) for b in range(256)]


@pytest.fixture(scope="module")
def roberta_cache(tmp_path_factory):
    """A huggingface_hub cache whose 'roberta-base' is a 12-layer RoBERTa 32 wide, with a byte-level tokenizer."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    root = tmp_path_factory.mktemp("hf")
    repo = root / "cache" / "models--roberta-base"
    snapshot = repo / "snapshots" / "5eed5eed"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("5eed5eed")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in _byte_level_alphabet():
        vocab.setdefault(char, len(vocab))
    vocab["<mask>"] = len(vocab)
    RobertaTokenizerFast(vocab=vocab, merges=[]).save_pretrained(str(snapshot))
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=12, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=80, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2)
    RobertaModel(config).save_pretrained(str(snapshot))
    data = write_dataset(root / "shards", shards=4, per_shard=4)
    return root, str(root / "cache"), data


@pytest.mark.parametrize("command", SEED, ids=["hf-text", "lock-text", "full"])
@pytest.mark.slow
def test_seed_command_runs_end_to_end(command, roberta_cache, tmp_path):
    root, cache, data = roberta_cache
    argv = _argv(command)
    train = argv.index("--train-data") + 1
    argv[train] = f"pipe:cat {root}/shards/{{00000..00003}}.tar" if argv[train].startswith("pipe:") else data
    small = [("--batch-size", "2"), ("--epochs", "1"), ("--train-num-samples", "4")]
    if "--precision" not in argv:
        # the default, amp, is bf16 autocast on a CPU: ~30x slower than fp32 on CPUs without native bf16.
        # The command that asks for amp runs with it, one step
        small.append(("--precision", "fp32"))
    else:
        small[-1] = ("--train-num-samples", "2")
    for flag, value in small:
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    proc = subprocess.run([sys.executable, "-m", "clipkit.train", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=subprocess_env(HF_HUB_CACHE=cache, HF_HUB_OFFLINE=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "logs").iterdir())
    assert (run / "checkpoints" / "epoch_1.pt").is_file()
    log = (run / "out.log").read_text()
    n = int(argv[argv.index("--train-num-samples") + 1])
    assert f"epoch 1 data: {n} samples in {n // 2} batches" in log
    if "--lock-text" in argv:
        # RoBERTa's last 10 of 12 layers and the new projection train; embeddings and 2 layers do not
        import re

        total, trainable = map(float, re.search(r"([\d.]+)M parameters, ([\d.]+)M trainable", log).groups())
        assert 0 < total - trainable < 88.5  # the ViT trains; the locked embeddings and first 2 layers do not
    if "custom-clip" in argv:
        assert run.name == "custom-clip" and (run / "tensorboard").is_dir()
