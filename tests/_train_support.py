"""Shared pieces of the trainer tests: a tiny model config, learnable shards, and ways to run clipkit-train."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from clipkit.train.data import SyntheticSource
from clipkit.train.shards import write_shards

TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def synthetic_samples(n: int, seed: int = 0, start: int = 0):
    """Learnable pairs (a coloured shape on noise, captioned with colour and shape) as shard samples."""
    source = SyntheticSource(n + start, seed, size=32)
    for i in range(start, start + n):
        image, caption = source.sample(i)
        yield {"__key__": f"s{i:06d}", "png": png(image), "txt": caption}


def write_tar(path: Path, members) -> None:
    """A tar of ``(key, ext, value)`` members as written (str values as UTF-8), damaged ones included:
    what the trainer's shard writer would refuse to write."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, ext, value in members:
            data = value.encode() if isinstance(value, str) else value
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_dataset(folder: Path, shards: int = 4, per_shard: int = 32, seed: int = 0, sizes: bool = True) -> str:
    """``shards`` tar files of learnable samples; returns the brace pattern."""
    write_shards(synthetic_samples(shards * per_shard, seed), folder, per_shard=per_shard)
    if not sizes:
        (folder / "sizes.json").unlink()
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def write_model(folder: Path, name: str = "tiny-train", cfg=None) -> str:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg or TINY_MODEL))
    return str(path)


def base_args(model: str, data: str, logs: Path, name: str, *extra: str) -> list:
    """A small, fast run: fp32 on the CPU, one data worker, frequent logging."""
    return ["--model", model, "--train-data", data, "--batch-size", "8", "--epochs", "2", "--lr", "2e-3",
            "--warmup", "2", "--wd", "0.1", "--workers", "1", "--precision", "fp32", "--device", "cpu",
            "--logs", str(logs), "--name", name, "--log-every-n-steps", "1", "--seed", "0", *extra]


def torchrun(args, processes: int = 2) -> subprocess.CompletedProcess:
    """clipkit-train under torchrun on this machine, ``processes`` ranks on a free port."""
    from _helpers import free_port

    args = ["--logs-dir" if a == "--logs" else a for a in args]  # torchrun takes --logs for its --logs-specs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "clipkit.train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())


def run_inprocess(argv) -> int:
    from clipkit.train import main

    return main([str(a) for a in argv])


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_train(argv, env=None, wrapper: str = "") -> subprocess.Popen:
    """clipkit-train in a child process (optionally after ``wrapper`` code runs in it)."""
    code = wrapper + "\nimport sys\nfrom clipkit.train import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], env=env or subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_scalars(run_dir: Path, tag: str) -> list:
    """``[(step, value)]`` of one TensorBoard scalar, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
