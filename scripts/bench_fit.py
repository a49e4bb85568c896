"""How fast `fit` answers, and that it never loads llama.cpp in its own process.

    python scripts/bench_fit.py [MODEL.gguf] [--repeat 7] [--before CHECKOUT]

Times, interleaved in one run: reading the header alone (`read_summary`), a full `fit` of the same
file (header, hardware, every placement priced), and a `fit` of a Qwen3-30B-A3B-sized summary
(48 layers, 128 experts) for a 12 GiB GPU, reporting medians and the fit/read ratio. Also runs
`moelocal fit` as a subprocess (what a user waits for, interpreter start included) and checks that
llama_cpp was never imported there.

Then `moelocal fit` on a header-only file shaped like Qwen3-30B-A3B (Q8_0, 152k vocabulary) for a
12 GiB GPU, as a subprocess: cold (an empty cache: llama.cpp's dry run runs, in a child) and warm
(the answer cached), median of --repeat. With ``--before CHECKOUT`` (another moelocal source tree,
e.g. ``git archive`` of the previous commit) the same commands run with that code too, interleaved.
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
    ap.add_argument("--before", help="another moelocal checkout to time side by side")
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
    bench_30b(args.repeat, args.before)


def bench_30b(repeat: int, before: str | None) -> None:
    """`moelocal fit` on a Qwen3-30B-A3B-shaped header-only file: cold and warm, this code and ``before``."""
    from dataclasses import replace

    from moelocal.testmodels import SPECS, write_header_only

    spec = replace(SPECS["qwen3moe"], n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_expert=128,
                   n_expert_used=8, expert_ff=768, n_vocab=151936, context_length=40960)
    trees = {"after": str(ROOT)} | ({"before": str(Path(before).resolve())} if before else {})
    with tempfile.TemporaryDirectory() as tmp:
        path = write_header_only(spec, Path(tmp) / "Qwen3-30B-A3B-shape.gguf")
        argv = ["fit", str(path), "--vram", "12GiB", "--ram", "64GiB", "--gpu-bw", "504GB/s", "--ctx", "16384",
                "--json"]
        code = "import sys; from moelocal.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass"
        times: dict[str, list[float]] = {f"{k} {w}": [] for k in trees for w in ("cold", "warm")}
        for i in range(repeat):
            for name, tree in trees.items():
                home = Path(tmp) / f"home-{name}-{i}"
                env = {"MOELOCAL_HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": tree}
                for when in ("cold", "warm"):  # the first run fills the cache the second reads
                    t = time.perf_counter()
                    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                                          env=env, cwd=tree)
                    times[f"{name} {when}"].append(time.perf_counter() - t)
                    if '"plans"' not in proc.stdout:
                        raise SystemExit(f"fit failed: {proc.stderr[-2000:]}")
    for k, v in times.items():
        print(f"{'30B-A3B fit ' + k:>22}: {statistics.median(v) * 1000:8.1f} ms (median of {repeat})")


if __name__ == "__main__":
    main()
