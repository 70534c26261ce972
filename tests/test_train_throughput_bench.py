"""benchmarks/train_throughput.py's MFU: the FLOPs it counts for a step, the peaks it knows, the arithmetic."""
import importlib.util
import sys
from pathlib import Path

import pytest

from _train_support import TINY_MODEL, write_model

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _forward_flops(batch: int) -> int:
    """TINY_MODEL's forward FLOPs, by hand: 2 per multiply-add of every matrix product."""
    v, t = TINY_MODEL["vision_cfg"], TINY_MODEL["text_cfg"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    flops = 2 * batch * patches * 3 * v["patch_size"] ** 2 * v["width"]  # patch embedding
    for tokens, width, layers in ((patches + 1, v["width"], v["layers"]), (t["context_length"], t["width"], t["layers"])):
        # q, k, v, out (4 w^2) and the MLP (8 w^2) per token; attention's two products (2 s^2 w)
        flops += layers * 2 * batch * (12 * tokens * width ** 2 + 2 * tokens ** 2 * width)
    embed = TINY_MODEL["embed_dim"]
    flops += 2 * batch * (v["width"] + t["width"]) * embed  # the projections
    return flops + 2 * batch * batch * embed  # the logits


def test_step_flops_count_every_matrix_product(bench, tmp_path):
    model = write_model(tmp_path)
    forward = bench.step_flops(model, 4, backward=False)
    assert forward == _forward_flops(4)
    # backward: two products per forward one (input and weight gradients), except the input gradient of the
    # patch embedding (images need none)
    patch = 2 * 4 * 16 * 3 * 8 * 8 * 64
    assert bench.step_flops(model, 4) == 3 * forward - patch


def test_peaks_by_device_name(bench):
    assert bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("NVIDIA L4") == 121.0 and bench.peak_tflops("NVIDIA L40S") == 362.0
    assert bench.peak_tflops("NVIDIA A10") == 125.0 and bench.peak_tflops("NVIDIA A10G") is None
    assert bench.peak_tflops("cpu") is None
    assert bench.peak_tflops("NVIDIA H200", override=500.0) == 500.0


def test_mfu_arithmetic(bench):
    # 1 TFLOP a step, 512 samples/s at batch 256: 2 steps/s, 2 TFLOP/s of a 989 TFLOP/s peak
    assert bench.mfu(1e12, 512.0, 256, 989.0) == pytest.approx(2 / 989)
    assert bench.mfu(1e12, 512.0, 256, 989.0, devices=2) == pytest.approx(1 / 989)


def test_dry_run_prints_the_count_and_the_peak(bench, tmp_path, capsys):
    model = write_model(tmp_path)
    assert bench.main(["--dry-run", "--model", model, "--batch-size", "4", "--peak-tflops", "100"]) == 0
    out = capsys.readouterr().out
    assert f"FLOPs per step (forward + backward, batch 4): {bench.step_flops(model, 4) / 1e9:.1f} GFLOP" in out
    assert "peak: 100 TFLOP/s" in out


def test_rates_from_log_lines_every_n_steps(bench):
    from types import SimpleNamespace

    args = SimpleNamespace(batch_size=256, warmup_steps=20)
    # clipkit's lines every 10 steps, 0.1 s a step; OpenCLIP's at steps 1, 11, 21, ...: both measured from
    # the last line at or before step 20 to the last line
    for lines in ([(1.0 * k, 10 * k, 0.1, 0.001) for k in range(1, 7)],
                  [(0.1 + 1.0 * k, 10 * k + 1, 0.1, 0.001) for k in range(0, 6)]):
        result = bench.Result("t")
        bench.measure(result, lines, 0.0, True, args)
        assert result.ok and result.steps_measured == 40
        assert result.samples_per_s_wall == pytest.approx(2560.0)
        assert result.samples_per_s_self == pytest.approx(2560.0)
    short = bench.Result("t")
    bench.measure(short, [(1.0, 10, 0.1, 0.0), (2.0, 20, 0.1, 0.0), (3.0, 30, 0.1, 0.0)], 0.0, True, args)
    assert not short.ok  # one line after the warm-up is not a rate


def test_utilisation_sets_and_reports_mfu(bench):
    from types import SimpleNamespace

    args = SimpleNamespace(batch_size=256, precision="amp_bf16", device="cuda")
    rows = {"clipkit": bench.Result("clipkit", samples_per_s_wall=8000.0),
            "openclip": bench.Result("openclip", samples_per_s_wall=6000.0)}
    lines = bench.utilisation(rows, int(11.2899e12), 989.0, args)
    assert lines == ["FLOPs per step (forward + backward, batch 256): 11289.9 GFLOP",
                     "MFU against 989 TFLOP/s: clipkit 35.7%, openclip 26.8%"]
    assert rows["clipkit"].mfu == pytest.approx(11.2899e12 * 8000 / 256 / 989e12)
