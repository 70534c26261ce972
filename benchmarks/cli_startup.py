"""Wall time of the static `clipkit` commands (target: `clipkit models` < 0.3 s; no torch import, docs/design.md).

    python benchmarks/cli_startup.py [--runs 15]

Runs each command in a fresh interpreter, as a user's shell does, and prints the median and the
fastest run. `python -c pass` is measured too: the floor any Python command pays.
"""
import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "clipkit --help": [sys.executable, "-m", "clipkit", "--help"],
    "clipkit models": [sys.executable, "-m", "clipkit", "models"],
    "clipkit config check ViT-B-32": [sys.executable, "-m", "clipkit", "config", "check", "ViT-B-32"],
    "clipkit plugins": [sys.executable, "-m", "clipkit", "plugins"],
    "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
}


def measure(cmd, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    print(f"{'command':40s} {'median':>8s} {'best':>8s}")
    for name, cmd in COMMANDS.items():
        median, best = measure(cmd, args.runs)
        print(f"{name:40s} {median * 1000:7.0f}ms {best * 1000:7.0f}ms")


if __name__ == "__main__":
    main()
