"""How fast `fit` answers, and that it never loads llama.cpp.

    python scripts/bench_fit.py [MODEL.gguf] [--repeat 7]

Times, interleaved in one run: reading the header alone (`read_summary`), a full `fit` of the same
file (header, hardware, every placement priced), and a `fit` of a Qwen3-30B-A3B-sized summary
(48 layers, 128 experts) for a 12 GiB GPU, reporting medians and the fit/read ratio. Also runs
`moelocal fit` as a subprocess (what a user waits for, interpreter start included) and checks that
llama_cpp was never imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="a .gguf file (default: the bundled demo model)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    from synthetic import qwen3moe_summary

    from moelocal import hardware, planner
    from moelocal.gguf_model import read_summary
    from moelocal.plan import RunOptions
    from moelocal.source import demo_model_path

    path = Path(args.model) if args.model else demo_model_path()
    hw = hardware.detect()
    big = qwen3moe_summary()
    big_hw = hardware.with_overrides(hw, vram=["12GiB"], ram="64GiB")
    times: dict[str, list[float]] = {"read header": [], "fit file": [], "fit 30B-A3B summary": []}
    for i in range(args.repeat):
        t = time.perf_counter()
        s = read_summary(path)
        times["read header"].append(time.perf_counter() - t)
        t = time.perf_counter()
        s = read_summary(path)
        planner.fit(s, hw, RunOptions(n_ctx=planner.default_ctx(s) + i), ctx_requested=False)
        times["fit file"].append(time.perf_counter() - t)
        t = time.perf_counter()
        planner.fit(big, big_hw, RunOptions(n_ctx=8192 + 256 * i))  # a new padded context: no cache hits
        times["fit 30B-A3B summary"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>22}: {v * 1000:8.1f} ms (median of {args.repeat})")
    print(f"{'fit / read ratio':>22}: {med['fit file'] / med['read header']:8.1f}x")
    print(f"{'llama_cpp imported':>22}: {'llama_cpp' in sys.modules}")

    with tempfile.TemporaryDirectory() as home:
        cmd = [sys.executable, "-c",
               "import sys; from moelocal.cli import main\n"
               "try:\n    main(['fit', sys.argv[1], '--json'])\nexcept SystemExit:\n    pass\n"
               "print('llama_cpp' in sys.modules, file=sys.stderr)", str(path)]
        env = {"MOELOCAL_HOME": home, "PATH": "/usr/bin:/bin"}
        subprocess.run(cmd, capture_output=True, env=env)  # warm the probe cache and the OS file cache
        walls = []
        for _ in range(3):
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            walls.append(time.perf_counter() - t)
        print(f"{'`moelocal fit` process':>22}: {statistics.median(walls) * 1000:8.1f} ms "
              f"(llama_cpp imported: {proc.stderr.strip().splitlines()[-1]})")


if __name__ == "__main__":
    main()
