#!/usr/bin/env python
"""The planner's speed prediction against measurements on this machine, CPU only.

Writes a few qwen3moe-shaped models with random weights that are big enough (100-400 MB) for weight
reads to dominate the per-token overheads, in Q8_0 and Q4_K, beside the tiny test models; then for
each one makes the CPU-only plan `fit` would price on this machine (hardware.detect(), default thread
count), loads it with that plan through moelocal's engine, and measures prompt processing (a 256-token
prompt) and decoding (64 tokens, end-of-generation ignored). Repetitions are interleaved across the
models and the medians are reported, so a busy moment of a shared machine favours none.

Decoding samples at temperature 1 with a fixed seed: with random weights greedy decoding repeats one
token, the router then picks the same experts every time and they stay in the CPU's caches, which real
text does not allow. The prediction is taken at the mean KV depth of the measured decode.

Examples:

  python scripts/bench_speed_model.py                      # models in a temporary folder
  python scripts/bench_speed_model.py --dir /tmp/speedmodels --reps 7   # keep them for the next run
  python scripts/bench_speed_model.py --json
  python scripts/bench_speed_model.py --published          # no measuring: fit's predictions for the published
                                                           # runs in tests/data/published_speeds.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelocal import gguf_model, hardware, memory, native, planner, speed, testmodels  # noqa: E402
from moelocal.engine import Engine, SamplingParams  # noqa: E402
from moelocal.plan import CPU, Placement, Plan, RunOptions  # noqa: E402

TEXT = (
    "The experts of a mixture-of-experts model sit in system memory while attention runs on the GPU; "
    "each token reads only the experts its router picks, so the cost per token stays small. "
)
MiB = 1 << 20

# Larger models of the qwen3moe architecture (q/k norms, no shared expert). Same expert bytes, two
# shapes: few wide layers, and three times as many narrower ones (more per-layer work per byte).
# Rows are multiples of 256 so K-quants apply everywhere; a quarter of the expert bytes is active.
BIG_SPECS = (
    testmodels.Spec("moe-8x1024", "qwen3moe", n_layer=8, n_embd=1024, n_head=8, n_head_kv=2, head_dim=128,
                    n_ff=1536, n_expert=8, n_expert_used=2, expert_ff=1536, qk_norm=True, tokenizer_pre="qwen2",
                    rope_freq_base=1000000.0),
    testmodels.Spec("moe-24x512", "qwen3moe", n_layer=24, n_embd=512, n_head=4, n_head_kv=2, head_dim=128,
                    n_ff=1024, n_expert=8, n_expert_used=2, expert_ff=1024, qk_norm=True, tokenizer_pre="qwen2",
                    rope_freq_base=1000000.0),
)
BIG_QUANTS = ("q8_0", "q4_k")
TINY = ("qwen3moe-q8_0", "qwen3moe-q4_k", "gpt-oss-q8_0")


def write_big(spec: testmodels.Spec, path: Path, seed: int = 0) -> Path:
    """An F16 model of ``spec`` with random weights: testmodels' tensor names, shapes and metadata
    (testmodels.write_model only writes its own fixed specs)."""
    import numpy as np
    from gguf import GGUFWriter

    tmp = path.with_name(path.name + ".partial")
    writer = GGUFWriter(tmp, spec.arch)
    testmodels._write_metadata(writer, spec, "f16")
    rng = np.random.default_rng(seed)
    for name, shape in testmodels.tensor_shapes(spec):
        dims = tuple(reversed(shape))
        if name.endswith("norm.weight"):
            data = np.ones(dims, dtype=np.float32)
        else:
            data = rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02)
        if not testmodels._keeps_f32(name, shape):
            data = data.astype(np.float16)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def build_models(directory: Path) -> dict[str, Path]:
    """name -> path of every model measured; files already in ``directory`` are kept."""
    out: dict[str, Path] = {}
    for spec in BIG_SPECS:
        targets = {q: directory / f"{spec.name}-{q}.gguf" for q in BIG_QUANTS}
        missing = [q for q, p in targets.items() if not p.is_file()]
        if missing:
            src = directory / f"{spec.name}-f16.gguf"
            t = time.perf_counter()
            if not src.is_file():
                write_big(spec, src)
            for q in missing:
                testmodels.quantize(src, targets[q], q)
            src.unlink()  # only the quantized files are measured; the F16 one is twice their size
            print(f"wrote {spec.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        out.update({f"{spec.name}-{q}": p for q, p in targets.items()})
    tiny = testmodels.build_all(directory / "tiny", quants=("q8_0", "q4_k"), archs=("qwen3moe", "gpt-oss"))
    out.update({name: tiny[name] for name in TINY})
    return out


@dataclass
class Subject:
    name: str
    path: Path
    summary: gguf_model.ModelSummary
    plan: Plan
    engine: Engine
    prompt: list[int]
    runs: list[tuple[float, float]]  # (prompt tok/s, generation tok/s) per repetition


def measure(s: Subject, n_gen: int, seed: int) -> tuple[float, float]:
    s.engine.reset()
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=n_gen,
                            ignore_eos=True)
    last = None
    for chunk in s.engine.generate(s.prompt, params):
        last = chunk
    assert last is not None and last.completion_tokens == n_gen, last
    return last.prompt_tps, last.generation_tps


def active_bytes(summary: gguf_model.ModelSummary) -> float:
    """Weight bytes one decoded token reads (the routed experts' active share), as the planner counts them."""
    frac = summary.n_expert_used / summary.n_expert if summary.n_expert else 1.0
    return sum(t.n_bytes * (frac if t.role == "routed_experts" else 1.0) for t in summary.tensors
               if t.role != "embeddings")


def read_bytes(summary: gguf_model.ModelSummary, options: RunOptions) -> float:
    """Bytes one decoded token reads: the active weights and the KV cache at the predicted depth."""
    depth = min(speed.DECODE_DEPTH, options.n_ctx // 2)
    kv = sum(memory.kv_bytes_per_token(summary, il, options.kv_type) * depth for il in range(summary.n_layer))
    return active_bytes(summary) + kv


def implied(rows: list[dict], hw: hardware.Hardware, options: RunOptions) -> dict:
    """What the larger models say the CPU constants are here: effective bandwidth and per-layer time
    by least squares over decode times (t = bytes / bandwidth + layers * overhead), and the FLOP/s
    that would make each prefill prediction exact (geometric mean)."""
    import numpy as np

    big = [r for r in rows if r["size_mib"] >= 64]
    if len(big) < 2:
        return {}
    x = np.array([[r["read_bytes"], r["n_layer"]] for r in big])
    t = np.array([1 / r["measured_decode"] for r in big])
    (inv_bw, overhead), *_ = np.linalg.lstsq(x, t, rcond=None)
    _, flops = speed._device_speed(hw, CPU, options.n_threads)
    ratios = [r["measured_prefill"] / r["predicted_prefill"] for r in big]
    threads = min(options.n_threads or hw.cpu_cores, hw.cpu_cores)
    return {
        "bandwidth": 1 / inv_bw,
        "bw_efficiency": 1 / inv_bw / hw.cpu_bandwidth,
        "layer_overhead_s": overhead,
        "gflops_per_thread": flops * statistics.geometric_mean(ratios) / threads / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, help="where the models are written and kept (default: a temporary folder)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=64, help="generated tokens")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the engine's default)")
    ap.add_argument("--only", default="", help="comma-separated model names to measure (default: all)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--published", action="store_true", help="print the published runs against fit's predictions")
    args = ap.parse_args()
    if args.published:
        published_table(args.json)
        return
    native.install_log()  # keep llama.cpp's log off the terminal
    with tempfile.TemporaryDirectory(prefix="moelocal-speed-") as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        paths = build_models(directory)
        if args.only:
            wanted = args.only.split(",")
            paths = {k: v for k, v in paths.items() if k in wanted}
        result = run(args, paths)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


def run(args: argparse.Namespace, paths: dict[str, Path]) -> dict:
    t_probe = time.perf_counter()
    hw = hardware.detect()
    t_probe = time.perf_counter() - t_probe
    # the prediction at the mean depth of the measured decode (planner: depth = n_ctx // 2)
    # flash attention on, as the run commands and fit default to
    options = RunOptions(n_ctx=2 * (args.prompt + args.gen // 2), n_threads=args.threads, flash_attn=True)
    subjects: list[Subject] = []
    for name, path in paths.items():
        summary = gguf_model.read_summary(path)
        plan = planner.make_plan(summary, Placement(), options, hw)
        engine = Engine.load(path, plan)
        prompt = engine.tokenize(TEXT * (args.prompt // 10 + 1), add_special=False)[: args.prompt]
        subjects.append(Subject(name, path, summary, plan, engine, prompt, []))
        measure(subjects[-1], 8, seed=0)  # warm-up: first-touch pages, thread pool, allocator
    for rep in range(args.reps):
        k = rep % len(subjects)
        for s in subjects[k:] + subjects[:k]:  # each model takes every position in turn
            s.runs.append(measure(s, args.gen, seed=rep))
    rows = []
    for s in subjects:
        s.engine.close()
        pp = statistics.median(r[0] for r in s.runs)
        tg = statistics.median(r[1] for r in s.runs)
        pred = s.plan.predicted
        rows.append({
            "model": s.name,
            "size_mib": s.path.stat().st_size / MiB,
            "active_mib": active_bytes(s.summary) / MiB,
            "read_bytes": read_bytes(s.summary, options),
            "n_layer": s.summary.n_layer,
            "predicted_decode": pred.decode_tps,
            "measured_decode": tg,
            "decode_ratio": pred.decode_tps / tg,
            "decode_spread": (max(r[1] for r in s.runs) - min(r[1] for r in s.runs)) / tg,
            "predicted_prefill": pred.prefill_tps,
            "measured_prefill": pp,
            "prefill_ratio": pred.prefill_tps / pp,
            "prefill_spread": (max(r[0] for r in s.runs) - min(r[0] for r in s.runs)) / pp,
            "runs": s.runs,
        })
    return {
        "cpu": hw.cpu_name,
        "cores": hw.cpu_cores,
        "threads": subjects[0].engine.n_threads if subjects else None,
        "extra_bufts": subjects[0].engine.extra_bufts if subjects else None,
        "cpu_bandwidth": hw.cpu_bandwidth,
        "cpu_flops": hw.cpu_flops,
        "detect_seconds": t_probe,
        "prompt_tokens": args.prompt,
        "gen_tokens": args.gen,
        "reps": args.reps,
        "constants": {**{k: getattr(speed, k) for k in dir(speed) if k.startswith("CPU_")},
                      "CPU_GFLOPS_PER_CORE": hardware.CPU_GFLOPS_PER_CORE},
        "implied": implied(rows, hw, options),
        "rows": rows,
    }


def print_table(r: dict) -> None:
    print(f"{r['cpu']}: {r['cores']} cores, {r['threads']} threads, extra buffer types "
          f"{'on' if r['extra_bufts'] else 'off'}; probe {r['cpu_bandwidth'] / 1e9:.1f} GB/s, "
          f"{r['cpu_flops'] / 1e9:.0f} GFLOP/s (detect {r['detect_seconds']:.2f} s)")
    print(f"{r['prompt_tokens']}-token prompt, {r['gen_tokens']} generated tokens, median of {r['reps']} "
          "interleaved repetitions; ratio = predicted / measured, spread = (max - min) / median")
    head = (f"{'model':20} {'MiB':>5} {'act':>5} {'decode pred':>11} {'meas':>7} {'ratio':>6} {'spread':>6}"
            f" {'prefill pred':>12} {'meas':>7} {'ratio':>6} {'spread':>6}")
    print(head)
    for row in r["rows"]:
        print(f"{row['model']:20} {row['size_mib']:5.0f} {row['active_mib']:5.0f} {row['predicted_decode']:11.1f}"
              f" {row['measured_decode']:7.1f} {row['decode_ratio']:6.2f} {row['decode_spread']:6.0%}"
              f" {row['predicted_prefill']:12.1f} {row['measured_prefill']:7.1f} {row['prefill_ratio']:6.2f}"
              f" {row['prefill_spread']:6.0%}")
    c, imp = r["constants"], r["implied"]
    print("constants: " + ", ".join(f"{k} {v:g}" for k, v in c.items()))
    if imp:
        print(f"implied by the models of 64 MiB or more: {imp['bandwidth'] / 1e9:.1f} GB/s effective "
              f"(CPU_BW_EFFICIENCY {imp['bw_efficiency']:.2f}), {imp['layer_overhead_s'] * 1e6:.0f} us per layer, "
              f"{imp['gflops_per_thread']:.0f} GFLOP/s per thread in prompt processing")


def published_table(as_json: bool) -> None:
    """Each published run (tests/data/published_speeds.json) beside what fit predicts for it: the machine
    as its rated figures describe it, the placement the run used."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import published

    rows = []
    for r in published.rows():
        p = published.plan(r).predicted
        where = f"--n-cpu-moe {r['n_cpu_moe']}" if r.get("vram") and r.get("n_cpu_moe") else ""
        if r.get("ngl") is not None and r.get("vram"):
            where = f"-ngl {r['ngl']} " + where
        rows.append({"model": r["model"], "quant": r["quant"], "machine": r.get("gpu") if r.get("vram") else "CPU only",
                     "ram": r.get("ram_spec") or r["ram_bw_rated"], "placement": where.strip() or "-",
                     "measured": r["decode_tps"], "predicted": p.decode_tps, "low": p.decode_low, "high": p.decode_high,
                     "error": p.decode_tps / r["decode_tps"] - 1, "source": r.get("url", "")})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print("| model | quant | GPU | RAM | placement | measured | predicted (range) | error | source |")
    print("|---|---|---|---|---|--:|--:|--:|---|")
    for x in rows:
        print(f"| {x['model']} | {x['quant']} | {x['machine']} | {x['ram']} | {x['placement']} | {x['measured']:.1f} | "
              f"{x['predicted']:.1f} ({x['low']:.0f}-{x['high']:.0f}) | {x['error']:+.0%} | {x['source']} |")
    errors = sorted(abs(x["error"]) for x in rows)
    inside = sum(x["low"] <= x["measured"] <= x["high"] for x in rows)
    print(f"\nmedian |error| {statistics.median(errors):.1%}; within 25%: {sum(e <= 0.25 for e in errors)}/"
          f"{len(errors)}; measured inside the range: {inside}/{len(rows)}")


if __name__ == "__main__":
    main()
