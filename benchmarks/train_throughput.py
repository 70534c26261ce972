"""Training throughput and peak memory: clipkit-train against OpenCLIP 3.3.0's trainer.

    python benchmarks/train_throughput.py [--model PATH_OR_NAME] [--batch-size 32] [--steps 30]
        [--warmup-steps 5] [--threads 1] [--workers 1] [--device cpu|cuda] [--precision fp32]
        [--log-every N] [--peak-tflops T] [--only clipkit|openclip] [--repeat N] [--openclip-venv DIR]
        [--json FILE] [--keep] [--dry-run]

On a GPU (ViT-B-32, batch 256, bf16):

    python benchmarks/train_throughput.py --device cuda --model ViT-B-32 --batch-size 256 \
        --precision amp_bf16 --workers 8 --threads 8 --steps 120 --warmup-steps 20 --log-every 10

Both trainers run in fresh processes on synthetic data with the same model config, batch size,
step count, data workers, thread count (OMP_NUM_THREADS, MKL_NUM_THREADS and
torch.set_num_threads), seed, precision and Adam settings (beta2/eps are passed explicitly: each
trainer would otherwise pick them from the model's name), logging every step. Reported per trainer:

- samples/s (wall): batch size x steps / time between the step log lines as this script receives
  them, after the first --warmup-steps steps. Measured the same way for both trainers.
- samples/s (self): the same window from each trainer's own per-step numbers (a cross-check).
- data ms: each trainer's own mean per-step wait for data (shows when the loader is the bottleneck).
- peak RSS main: the trainer process's peak resident memory (exact, from wait4's rusage).
- peak PSS tree: the peak proportional set size of the trainer and its data workers together,
  sampled every 0.5 s (PSS splits pages the forked workers share, so they are not counted twice).
- peak CUDA: torch.cuda.max_memory_allocated() at exit, with --device cuda.
- MFU (model FLOPs utilisation), with --device cuda: the FLOPs of one training step of the model
  at the batch size (forward and backward of both towers and the contrastive logits, counted by
  torch.utils.flop_counter.FlopCounterMode on the meta device, so no memory is used and attention
  is counted as its two matrix products), times steps/s (wall), over the device's peak dense bf16
  FLOP/s (PEAK_BF16_TFLOPS by device name, or --peak-tflops). --dry-run prints the FLOP count and
  the peak without training.

Both trainers log every --log-every steps (default 1; on a GPU use more, e.g. 10: a trainer reads
its loss from the device on log steps, and measuring should not add synchronisations).

The data differ by design: OpenCLIP's synthetic dataset is one constant black image with one
caption, clipkit's makes a varied, learnable image per sample. Both are generated in the data
workers, so with the data time near zero what is compared is the training step on the model.

The default model is a small ViT config written to a temporary JSON file: clipkit-train takes
the path with --model; OpenCLIP's --model takes a registered name, so its process registers the
file with open_clip.add_model_config first. A builtin name (e.g. ViT-B-32) is passed to both as is.

OpenCLIP's trainer runs in this interpreter: with the synthetic dataset it needs neither shards
nor webdataset<=0.2.86, and it imports fine with webdataset 1.x. Its data module imports pandas
(for CSV data only); without pandas installed, a stand-in module is put in its place. To run
OpenCLIP exactly as it pins its dependencies instead, --openclip-venv DIR creates (once) a venv
that reuses this environment's packages (torch, timm, ...) through a .pth file and installs
open-clip-torch==3.3.0, 'webdataset<=0.2.86' and pandas into it (needs network access; this
environment is not modified).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# small enough for a 2-core CPU, a real ViT and text transformer otherwise; "vit" in the name gives
# both trainers the same Adam betas and eps (they pick them by name)
DEFAULT_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 4, "width": 256, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}
DEFAULT_MODEL_NAME = "bench-vit-tiny"

# Runs in each trainer's process: threads, OpenCLIP's config registration and pandas stand-in,
# and the CUDA peak printed at exit. Settings come from BENCH_* environment variables.
WRAPPER = r"""
import atexit, os, sys
import torch
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))

def _cuda_peak():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print("BENCH_CUDA_PEAK_BYTES=%d" % torch.cuda.max_memory_allocated(), file=sys.stderr, flush=True)
atexit.register(_cuda_peak)

if os.environ["BENCH_TRAINER"] == "openclip":
    try:
        import pandas  # noqa: F401  (only OpenCLIP's CSV dataset uses it)
    except ImportError:
        import importlib.machinery, types
        stub = types.ModuleType("pandas")
        stub.__spec__ = importlib.machinery.ModuleSpec("pandas", None)
        sys.modules["pandas"] = stub
        print("BENCH_NOTE=pandas is not installed: a stand-in module replaces it (synthetic data never uses it)",
              file=sys.stderr, flush=True)
    import open_clip
    if os.environ.get("BENCH_CONFIG"):
        open_clip.add_model_config(os.environ["BENCH_CONFIG"])
    from open_clip_train.main import main
    main(sys.argv[1:])
else:
    from clipkit.train import main
    sys.exit(main(sys.argv[1:]))
"""

# step lines: "epoch 1 [12/16 (75%)] loss ... | 98.6 samples/s, data 0.007 s, batch 0.162 s"
CLIPKIT_STEP = re.compile(r"\bepoch \d+ \[(\d+)/\d+ .*\| ([\d.]+) samples/s, data ([\d.]+) s, batch ([\d.]+) s")
# "Train Epoch: 0 [160/256 (62%)] Data (t): 0.006 Batch (t): 0.190, 84.2505/s, 84.2505/s/gpu LR: ..."
OPENCLIP_STEP = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), "
                           r"([\d.eE+-]+)/s,")
CUDA_PEAK = re.compile(r"BENCH_CUDA_PEAK_BYTES=(\d+)")

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' datasheets, matched against
# torch.cuda.get_device_name() in this order (the first name contained in it wins)
PEAK_BF16_TFLOPS: Tuple[Tuple[str, Optional[float]], ...] = (
    ("H200", 989.0),       # SXM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),       # SXM (HBM3)
    ("GH200", 989.0),
    ("A100", 312.0),       # SXM and PCIe
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", None),        # AWS's A10 variant: no published figure, give --peak-tflops
    ("A10", 125.0),
    ("RTX 4090", 165.0),   # with fp32 accumulation
)


@dataclass
class Result:
    trainer: str
    run: int = 1
    ok: bool = False
    timed_out: bool = False
    returncode: Optional[int] = None
    steps_logged: int = 0
    steps_measured: int = 0
    samples_per_s_wall: Optional[float] = None
    samples_per_s_self: Optional[float] = None
    median_step_ms: Optional[float] = None
    data_ms: Optional[float] = None
    peak_rss_main_mib: Optional[float] = None
    peak_pss_tree_mib: Optional[float] = None
    peak_cuda_mib: Optional[float] = None
    mfu: Optional[float] = None
    wall_s: Optional[float] = None
    first_step_s: Optional[float] = None
    command: List[str] = field(default_factory=list)
    log: str = ""


# -- model FLOPs utilisation ------------------------------------------------------------------------
def peak_tflops(device_name: str, override: Optional[float] = None) -> Optional[float]:
    """The device's peak dense bf16 TFLOP/s: ``override`` if given, else from :data:`PEAK_BF16_TFLOPS`."""
    if override is not None:
        return override
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_name), None)


def step_flops(model: str, batch_size: int, device: str = "meta", backward: bool = True) -> int:
    """FLOPs of one training step of ``model`` (a name or a config file) on a batch: both towers forward,
    the contrastive logits and loss, and (``backward``) their backward pass, as FlopCounterMode counts
    them (matrix products and convolutions). On the meta device nothing is allocated, and attention runs
    as its two batched matrix products, which is what a fused attention kernel computes too."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    import clipkit

    net = clipkit.create_model(model, device=device, load_weights=False)
    size = net.visual.image_size
    height, width = (size, size) if isinstance(size, int) else size
    images = torch.randn(batch_size, 3, height, width, device=device)
    texts = torch.zeros(batch_size, net.context_length, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        image_features, text_features, scale = net(images, texts)[:3]
        logits = scale * image_features @ text_features.T
        labels = torch.arange(batch_size, device=device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        if backward:
            loss.backward()
    return int(counter.get_total_flops())


def mfu(flops_per_step: float, samples_per_s: float, batch_size: int, peak_tflops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: the FLOP/s the step's counted FLOPs at this rate amount to, over the peak."""
    return flops_per_step * (samples_per_s / batch_size) / (peak_tflops * 1e12 * devices)


# -- memory -----------------------------------------------------------------------------------------
def _children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> List[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    try:  # no smaps_rollup: resident pages, shared ones counted in every process
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return 0


class TreeMemory(threading.Thread):
    """Polls the peak summed PSS of a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        if not os.path.isdir("/proc"):
            return
        while not self.done.is_set():
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in _tree(self.pid)))
            self.done.wait(self.interval)


# -- running one trainer --------------------------------------------------------------------------
def _common_flags(args, logs: Path, model_name: str) -> List[str]:
    # both trainers pick Adam's beta2/eps by whether "vit" is in the model's name, and clipkit sees a
    # path where OpenCLIP sees a name: give both the values explicitly
    vit = "vit" in model_name.lower()
    return ["--beta2", "0.98" if vit else "0.999", "--eps", "1e-6" if vit else "1e-8",
            "--dataset-type", "synthetic", "--train-num-samples", str(args.batch_size * args.steps),
            "--batch-size", str(args.batch_size), "--epochs", "1", "--workers", str(args.workers),
            "--precision", args.precision, "--device", args.device, "--seed", "0", "--lr", "5e-4",
            "--warmup", "1", "--log-every-n-steps", str(args.log_every), "--logs", str(logs), "--name", "run"]


def _run(trainer: str, python: str, model_flag: str, config: Optional[Path], args, work: Path,
         model_name: str) -> Result:
    work.mkdir(parents=True, exist_ok=True)
    logs = work / f"logs-{trainer}"
    cmd = [python, "-c", WRAPPER, "--model", model_flag, *_common_flags(args, logs, model_name)]
    env = dict(os.environ, BENCH_TRAINER=trainer, BENCH_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("BENCH_CONFIG", None)
    if trainer == "openclip" and config is not None:
        env["BENCH_CONFIG"] = str(config)
    result = Result(trainer, command=["python", "-c", "<wrapper>", *cmd[3:]])
    lines: List[Tuple[float, str]] = []
    start = time.monotonic()
    # its own process group, so that a timeout ends the trainer and its data workers together
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", cwd=work, start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    memory = TreeMemory(proc.pid)
    memory.start()
    rusage = None
    while True:  # wait4 instead of proc.wait(): it also returns the child's peak RSS
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() - start > args.timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, rusage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            result.timed_out = True
            lines.append((time.monotonic(), f"[benchmark] killed after --timeout {args.timeout} s"))
            break
        time.sleep(0.05)
    result.wall_s = time.monotonic() - start
    memory.done.set()
    memory.join()
    reader.join(timeout=10)
    result.returncode = proc.returncode
    result.log = "\n".join(text for _, text in lines)
    # Linux reports ru_maxrss in KiB, macOS in bytes
    result.peak_rss_main_mib = rusage.ru_maxrss / (1024 if sys.platform != "darwin" else 1024 * 1024)
    result.peak_pss_tree_mib = memory.peak_kib / 1024 or None
    for _, text in lines:
        m = CUDA_PEAK.search(text)
        if m:
            result.peak_cuda_mib = int(m.group(1)) / 2 ** 20

    # (arrival time, step, seconds per step as the trainer measured it, data seconds)
    steps: List[Tuple[float, int, float, float]] = []
    for t, text in lines:
        if trainer == "clipkit":
            m = CLIPKIT_STEP.search(text)
            if m:
                sps = float(m.group(2))
                steps.append((t, int(m.group(1)), args.batch_size / sps if sps else float(m.group(4)),
                              float(m.group(3))))
        else:
            m = OPENCLIP_STEP.search(text)
            if m:
                # OpenCLIP logs samples seen, not the step; its rate has 6 significant digits
                steps.append((t, int(m.group(1)) // args.batch_size, args.batch_size / float(m.group(4)),
                              float(m.group(2))))
    measure(result, steps, start, proc.returncode == 0, args)
    return result


def measure(result: Result, steps: List[Tuple[float, int, float, float]], start: float, exited_ok: bool,
            args) -> None:
    """Fills ``result``'s rates from the step lines ``(arrival time, step, seconds per step as the trainer
    measured it, data seconds)``: from the last line at or before ``--warmup-steps`` (or the first line)
    to the last one."""
    result.steps_logged = len(steps)
    if steps:
        result.first_step_s = steps[0][0] - start
    base = max((i for i, line in enumerate(steps) if line[1] <= args.warmup_steps), default=0)
    measured = steps[base + 1:]
    result.ok = exited_ok and len(measured) >= 2
    if len(measured) >= 2:
        (t0, step0, _, _), (t1, step1, _, _) = steps[base], measured[-1]
        result.steps_measured = step1 - step0
        result.samples_per_s_wall = args.batch_size * (step1 - step0) / max(t1 - t0, 1e-9)
        # each line's own seconds per step, weighted by the steps since the line before it
        covered = [line[1] - before[1] for before, line in zip(steps[base:], measured)]
        seconds = [s for _, _, s, _ in measured]
        result.samples_per_s_self = args.batch_size * sum(covered) / sum(n * s for n, s in zip(covered, seconds))
        result.median_step_ms = 1000 * statistics.median(seconds)
        result.data_ms = 1000 * statistics.mean(d for _, _, _, d in measured)


# -- OpenCLIP's own venv ----------------------------------------------------------------------------
def openclip_venv(folder: Path) -> str:
    """A venv with OpenCLIP's pinned data dependencies on top of this environment's packages."""
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    marker = folder / ".bench-ready"
    if marker.exists():
        return str(python)
    print(f"creating {folder} (open-clip-torch==3.3.0, webdataset<=0.2.86, pandas) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    import site as this_site

    # after the venv's own site-packages, so its webdataset 0.2.x shadows this environment's 1.x;
    # pip leaves packages outside the venv alone ("Not uninstalling ... outside environment")
    parents = [p for p in this_site.getsitepackages() if os.path.isdir(p)]
    Path(site, "_bench_parent_env.pth").write_text("\n".join(parents) + "\n", encoding="utf-8")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "open-clip-torch==3.3.0",
                    "webdataset<=0.2.86", "pandas"], check=True)
    marker.write_text("ok\n", encoding="utf-8")
    return str(python)


# -- report -------------------------------------------------------------------------------------------
def _fmt(value: Optional[float], spec: str) -> str:
    """``format(value, spec)``, or a dash as wide as the number would have been."""
    if value is not None:
        return format(value, spec)
    return "-".rjust(int(re.match(r"\d*", spec).group() or 0))


def _load() -> Optional[Tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def _machine(args) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = ""
    if args.device.startswith("cuda") and torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}){gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def _median(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(results: List[Result], trainer: str) -> Optional[Result]:
    """One row per trainer: the medians of its successful runs (peaks: the largest)."""
    ok = [r for r in results if r.trainer == trainer and r.ok]
    if not ok:
        return None
    if len(ok) == 1:
        return ok[0]
    out = Result(trainer, run=0, ok=True, returncode=0, steps_logged=ok[0].steps_logged,
                 steps_measured=ok[0].steps_measured)
    for name in ("samples_per_s_wall", "samples_per_s_self", "median_step_ms", "data_ms", "wall_s", "first_step_s"):
        setattr(out, name, _median([getattr(r, name) for r in ok]))
    for name in ("peak_rss_main_mib", "peak_pss_tree_mib", "peak_cuda_mib"):
        values = [getattr(r, name) for r in ok if getattr(r, name) is not None]
        setattr(out, name, max(values) if values else None)
    return out


def device_name(device: str) -> str:
    """What the device calls itself (``torch.cuda.get_device_name``), or ``device`` for a CPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return device


def utilisation(summary: Dict[str, Result], flops: Optional[int], peak: Optional[float], args) -> List[str]:
    """Sets each summary row's MFU; the lines that report it."""
    if flops is None:
        return []
    lines = [f"FLOPs per step (forward + backward, batch {args.batch_size}): {flops / 1e9:.1f} GFLOP"]
    if peak is None:
        return lines + [f"MFU: no peak known for {device_name(args.device)!r}; give --peak-tflops"]
    parts = []
    for trainer, r in summary.items():
        if r.samples_per_s_wall:
            r.mfu = mfu(flops, r.samples_per_s_wall, args.batch_size, peak)
            parts.append(f"{trainer} {100 * r.mfu:.1f}%")
    dense = "" if args.precision in ("amp_bf16", "amp_bfloat16", "bf16", "pure_bf16") else \
        f" (the bf16 peak; --precision {args.precision} computes in another format)"
    return lines + [f"MFU against {peak:g} TFLOP/s{dense}: {', '.join(parts) or '-'}"]


def report(results: List[Result], args, model_desc: str) -> Dict[str, Result]:
    print()
    print(f"model {model_desc}, batch {args.batch_size}, {args.steps} steps (first {args.warmup_steps} not "
          f"measured), {args.threads} thread(s), {args.workers} data worker(s), device {args.device}, "
          f"precision {args.precision}")
    print(f"machine: {_machine(args)}")
    load = _load()
    if load is not None:
        print(f"load average at the end (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print()
    cuda = any(r.peak_cuda_mib is not None for r in results)
    head = (f"{'trainer':14s} {'samples/s':>10s} {'samples/s':>10s} {'step ms':>8s} {'data ms':>8s} "
            f"{'peak RSS':>9s} {'peak PSS':>9s} {'1st step':>8s} {'wall':>7s}")
    sub = (f"{'':14s} {'(wall)':>10s} {'(self)':>10s} {'median':>8s} {'mean':>8s} "
           f"{'main MiB':>9s} {'tree MiB':>9s} {'at s':>8s} {'s':>7s}")
    if cuda:
        head, sub = head + f" {'CUDA':>9s}", sub + f" {'peak MiB':>9s}"
    print(head)
    print(sub)

    def row(label: str, r: Result) -> None:
        line = (f"{label:14s} {_fmt(r.samples_per_s_wall, '10.1f')} {_fmt(r.samples_per_s_self, '10.1f')} "
                f"{_fmt(r.median_step_ms, '8.1f')} {_fmt(r.data_ms, '8.1f')} {_fmt(r.peak_rss_main_mib, '9.0f')} "
                f"{_fmt(r.peak_pss_tree_mib, '9.0f')} {_fmt(r.first_step_s, '8.1f')} {_fmt(r.wall_s, '7.1f')}")
        if cuda:
            line += f" {_fmt(r.peak_cuda_mib, '9.0f')}"
        print(line + ("" if r.ok else "   FAILED"))

    summary: Dict[str, Result] = {}
    for trainer in ("clipkit", "openclip"):
        runs = [r for r in results if r.trainer == trainer]
        for r in runs:
            row(trainer if args.repeat == 1 else f"{trainer} #{r.run}", r)
        best = summarise(results, trainer)
        if best is not None:
            summary[trainer] = best
            if args.repeat > 1:
                row(f"{trainer} median", best)
    if "clipkit" in summary and "openclip" in summary:
        a, b = summary["clipkit"], summary["openclip"]

        def ratio(x: Optional[float], y: Optional[float]) -> str:
            return f"{x / y:.2f}x" if x and y else "-"
        print()
        print(f"clipkit / openclip: samples/s {ratio(a.samples_per_s_wall, b.samples_per_s_wall)} (wall), "
              f"{ratio(a.samples_per_s_self, b.samples_per_s_self)} (self); peak RSS main "
              f"{ratio(a.peak_rss_main_mib, b.peak_rss_main_mib)}; peak PSS tree "
              f"{ratio(a.peak_pss_tree_mib, b.peak_pss_tree_mib)}"
              + (f"; peak CUDA {ratio(a.peak_cuda_mib, b.peak_cuda_mib)}" if a.peak_cuda_mib else ""))
    notes = set()
    for r in results:
        if not r.ok:
            why = ("killed after --timeout" if r.timed_out else f"exit code {r.returncode}" if r.returncode else
                   f"only {r.steps_logged} step lines for --warmup-steps {args.warmup_steps}")
            tail = "\n".join(r.log.splitlines()[-25:])
            print(f"\n{r.trainer} (run {r.run}) failed ({why}); last lines of its output:\n{tail}", file=sys.stderr)
        notes |= {f"note ({r.trainer}): {line.split('=', 1)[1]}" for line in r.log.splitlines()
                  if line.startswith("BENCH_NOTE=")}
    for note in sorted(notes):
        print(note)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python benchmarks/train_throughput.py --batch-size 32 --steps 30 --repeat 3")
    p.add_argument("--model", help=f"a model config JSON file or a name both trainers know (e.g. ViT-B-32); "
                                   f"default: a small ViT written to a temp file ({DEFAULT_MODEL_NAME})")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--steps", type=int, default=30, help="training steps per trainer (default: 30)")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps not measured (default: 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OpenMP threads in each trainer (default: 1; on a shared machine, more threads "
                        "than idle cores make OpenMP stall and the numbers meaningless)")
    p.add_argument("--workers", type=int, default=1, help="data loader workers (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu); with cuda, MFU is reported")
    p.add_argument("--log-every", type=int, default=1,
                   help="--log-every-n-steps for both trainers (default: 1; on a GPU e.g. 10, so that logging "
                        "adds no per-step synchronisation)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak dense TFLOP/s for MFU (default: from the table by device name)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the FLOPs per step and the device's peak, and train nothing")
    p.add_argument("--precision", default="fp32",
                   help="--precision for both (default: fp32; on CPU 'amp' differs: OpenCLIP autocasts to "
                        "fp16, clipkit to bf16, so compare amp_bf16 instead)")
    p.add_argument("--only", choices=("clipkit", "openclip"), help="run one trainer")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each trainer N times, alternating, and compare the medians (default: 1)")
    p.add_argument("--openclip-venv", type=Path,
                   help="run OpenCLIP in this venv, created on first use with its pinned webdataset (network)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per trainer before it is killed (default: 900)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the run folders and logs (printed at the end)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps + 2 * args.log_every:
        p.error(f"--steps must exceed --warmup-steps + 2 x --log-every ({args.warmup_steps + 2 * args.log_every}): "
                f"two log lines after the warm-up are measured")
    if args.precision == "amp" and not args.device.startswith("cuda"):
        print("warning: --precision amp on CPU is fp16 autocast in OpenCLIP and bf16 autocast in clipkit; "
              "use amp_bf16 to compare like with like", file=sys.stderr)

    load = _load()
    if load is not None and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: the machine is busy (load average {load[0]:.1f} on {os.cpu_count()} CPUs): timings will be "
              f"noisy; consider --repeat 3", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="clipkit-train-bench-"))
    try:
        if args.model is None:
            config: Optional[Path] = work / f"{DEFAULT_MODEL_NAME}.json"
            config.write_text(json.dumps(DEFAULT_MODEL, indent=1) + "\n", encoding="utf-8")
            model_desc = f"{DEFAULT_MODEL_NAME} ({json.dumps(DEFAULT_MODEL, separators=(',', ':'))})"
        elif args.model.endswith(".json") or os.path.isfile(args.model):
            config = work / Path(args.model).name  # a copy: OpenCLIP registers a file by its stem
            shutil.copyfile(args.model, config)
            model_desc = f"{config.stem} (from {args.model})"
        else:
            config, model_desc = None, args.model
        clipkit_model = str(config) if config is not None else args.model
        openclip_model = config.stem if config is not None else args.model

        flops = peak = None
        if args.device.startswith("cuda") or args.dry_run:
            flops = step_flops(clipkit_model, args.batch_size)
            peak = peak_tflops(device_name(args.device), args.peak_tflops)
        if args.dry_run:
            print(f"model {model_desc}, batch {args.batch_size}, device {device_name(args.device)}")
            print(utilisation({}, flops, peak, args)[0])
            print(f"peak: {f'{peak:g} TFLOP/s' if peak is not None else 'unknown (give --peak-tflops)'}")
            return 0
        trainers = [t for t in ("clipkit", "openclip") if not args.only or args.only == t]
        pythons = {t: sys.executable for t in trainers}
        if "openclip" in trainers and args.openclip_venv is not None:
            pythons["openclip"] = openclip_venv(args.openclip_venv.resolve())
        results: List[Result] = []
        for i in range(args.repeat):
            # alternate the order, so that a machine that slows down or warms up favours neither
            for trainer in (trainers if i % 2 == 0 else trainers[::-1]):
                print(f"running {trainer} ({args.steps} steps, run {i + 1} of {args.repeat}) ...", flush=True)
                result = _run(trainer, pythons[trainer], clipkit_model if trainer == "clipkit" else openclip_model,
                              config, args, work / f"run{i}", openclip_model)
                result.run = i + 1
                results.append(result)
        summary = report(results, args, model_desc)
        for line in utilisation(summary, flops, peak, args):
            print(line)
        if args.json is not None:
            def plain(r: Result) -> Dict[str, object]:
                return {k: v for k, v in asdict(r).items() if k != "log"}
            args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                             "machine": _machine(args), "flops_per_step": flops,
                                             "peak_tflops": peak, "runs": [plain(r) for r in results],
                                             "summary": {k: plain(v) for k, v in summary.items()}},
                                            indent=1) + "\n", encoding="utf-8")
        if args.keep:
            for r in results:
                (work / f"run{r.run - 1}" / f"{r.trainer}.log").write_text(r.log + "\n", encoding="utf-8")
            print(f"\nrun folders and logs kept in {work}")
        return 0 if results and all(r.ok for r in results) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
