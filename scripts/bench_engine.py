#!/usr/bin/env python
"""moelocal's engine against a bare llama.cpp decode loop: same model, same library, same placement.

Both run in one process, in interleaved repetitions (the order alternates, so drift and warm caches
favour neither), on the same loaded model and context by default, so that only the code around
llama_decode differs; --bare-own-copy has the bare loop load its own copy with plain llama_cpp calls
and the plan's parameters instead (then two copies of the weights compete for caches and pages). Prints
prompt-processing and generation tokens/s for each and the ratio engine / bare; the goal is >= 0.98.
With --parallel N it also measures batch throughput: the same requests through llama.cpp's parallel
sequences, N at a time, against one at a time.

Examples:

  python scripts/bench_engine.py model.gguf --reps 7 --prompt 256 --gen 64 --threads 2

  python scripts/bench_engine.py model.gguf --n-cpu-moe 4 --extra-bufts off

  python scripts/bench_engine.py model.gguf --parallel 4 --requests 8 --gen 32
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelocal import layout, native  # noqa: E402
from moelocal.engine import Engine, SamplingParams  # noqa: E402
from moelocal.plan import Placement, Plan, Prediction, RunOptions  # noqa: E402

TEXT = (
    "The experts of a mixture-of-experts model sit in system memory while attention runs on the GPU; "
    "each token reads only the experts its router picks, so the cost per token stays small. "
)


def make_plan(args: argparse.Namespace) -> Plan:
    gpus = [f"gpu{i}" for i in range(len(native.gpu_devices()))] if args.ngl else []
    if args.cpu_moe:
        overrides = layout.cpu_moe_overrides()
    elif args.n_cpu_moe:
        overrides = layout.n_cpu_moe_overrides(args.n_cpu_moe)
    else:
        overrides = ()
    placement = Placement(n_gpu_layers=args.ngl if gpus else 0, n_cpu_moe=args.n_cpu_moe,
                          tensor_overrides=overrides, devices=tuple(gpus))
    options = RunOptions(n_ctx=args.ctx, n_ubatch=args.ubatch, n_batch=args.batch, n_seq=args.parallel or 1,
                         n_threads=args.threads, flash_attn=args.flash_attn)
    return Plan(placement=placement, options=options, memory={}, budget={}, predicted=Prediction(0, 0), fits=True)


# ---- the bare loop: llama.cpp's low-level API and nothing else -------------------------------


class _Override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class Bare:
    """The bare decode loop on llama_cpp's low-level API. By default it runs on the engine's own model and
    context (the very same weights in memory: only the Python around llama_decode differs); with
    ``own_copy`` it loads its own with plain llama_cpp calls and the plan's parameters."""

    def __init__(self, path: str, plan: Plan, extra_bufts: bool, engine: Engine | None = None) -> None:
        import llama_cpp as lc

        self.lc = lc
        self.owned = engine is None
        if engine is not None:
            self.model, self.ctx = engine.model, engine.ctx
            self.vocab = lc.llama_model_get_vocab(self.model)
            self.n_batch = lc.llama_n_batch(self.ctx)
            return
        p, o = plan.placement, plan.options
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = p.n_gpu_layers
        mp.use_extra_bufts = extra_bufts
        self.keep = []
        if p.tensor_overrides:
            arr = (_Override * (len(p.tensor_overrides) + 1))()
            for i, (pattern, dev) in enumerate(p.tensor_overrides):
                raw = ctypes.create_string_buffer(pattern.encode())
                self.keep.append(raw)
                arr[i].pattern = ctypes.cast(raw, ctypes.c_char_p)
                arr[i].buft = native.buffer_type(dev)
            self.keep.append(arr)
            mp.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
        devs = (ctypes.c_void_p * (len(p.devices) + 1))(*[native.device_handle(d) for d in p.devices], None)
        self.keep.append(devs)
        mp.devices = ctypes.cast(devs, ctypes.c_void_p)
        if (p.devices and p.tensor_overrides) or (not p.devices and extra_bufts):
            mp.load_mode = lc.LLAMA_LOAD_MODE_NONE  # as the engine does (see Engine.load)
        self.model = lc.llama_model_load_from_file(path.encode(), mp)
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = o.n_ctx, max(o.n_batch, o.n_ubatch), o.n_ubatch, o.n_seq
        cp.n_threads = cp.n_threads_batch = o.n_threads
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if o.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.type_k = cp.type_v = native.GGML_TYPES[o.kv_type]
        cp.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_batch = lc.llama_n_batch(self.ctx)

    def run(self, prompt: list[int], n_gen: int, clock=time.perf_counter) -> tuple[float, float]:
        """(prompt tokens/s, generation tokens/s) for one greedy completion of exactly n_gen tokens."""
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), False)
        smpl = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(smpl, lc.llama_sampler_init_greedy())
        piece = ctypes.create_string_buffer(256)
        t0 = clock()
        for i in range(0, len(prompt), self.n_batch):
            part = prompt[i : i + self.n_batch]
            arr = (lc.llama_token * len(part))(*part)
            assert lc.llama_decode(self.ctx, lc.llama_batch_get_one(arr, len(part))) == 0
        tok = lc.llama_sampler_sample(smpl, self.ctx, -1)
        lc.llama_token_to_piece(self.vocab, tok, piece, 256, 0, False)
        t1 = clock()
        one = (lc.llama_token * 1)()
        batch = lc.llama_batch_get_one(one, 1)
        for _ in range(n_gen - 1):
            one[0] = tok
            assert lc.llama_decode(self.ctx, batch) == 0
            tok = lc.llama_sampler_sample(smpl, self.ctx, -1)
            lc.llama_token_to_piece(self.vocab, tok, piece, 256, 0, False)
        t2 = clock()
        lc.llama_sampler_free(smpl)
        return len(prompt) / (t1 - t0), (n_gen - 1) / (t2 - t1)

    def close(self) -> None:
        if self.owned:
            self.lc.llama_free(self.ctx)
            self.lc.llama_model_free(self.model)


def engine_run(engine: Engine, prompt: list[int], n_gen: int, clock=time.perf_counter) -> tuple[float, float]:
    """The same measurement through moelocal's stream: the first chunk comes when the bare loop's t1 is
    taken (prompt decoded, first token sampled and turned into text)."""
    engine.reset()
    last = None
    t0 = clock()
    t1 = None
    for chunk in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=n_gen, ignore_eos=True)):
        if t1 is None:
            t1 = clock()
        last = chunk
    t2 = clock()
    assert last is not None and t1 is not None and last.completion_tokens == n_gen, last
    return len(prompt) / (t1 - t0), (n_gen - 1) / (t2 - t1)


def bench_single(args: argparse.Namespace, plan: Plan) -> dict:
    engine = Engine.load(args.model, plan, extra_bufts=args.extra_bufts)
    bare = Bare(args.model, plan, engine.extra_bufts, engine=None if args.bare_own_copy else engine)
    prompt = engine.tokenize(TEXT * (args.prompt // 10 + 1), add_special=False)[: args.prompt]
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    for _ in range(args.warmup):
        engine_run(engine, prompt, 8)
        bare.run(prompt, 8)
    # A second bare run per repetition measures the noise floor: two identical loops differ by this much.
    rows: dict[str, list[tuple[float, float]]] = {"engine": [], "bare": [], "bare again": []}
    turns = ("engine", "bare", "bare again")
    for rep in range(args.reps):
        for who in turns[rep % 3 :] + turns[: rep % 3]:  # each takes every position in turn
            r = engine_run(engine, prompt, args.gen, clock) if who == "engine" else bare.run(prompt, args.gen, clock)
            rows[who].append(r)
    bare.close()
    engine.close()
    best = {who: (max(r[0] for r in v), max(r[1] for r in v)) for who, v in rows.items()}

    def ratio(a: str, b: str, i: int) -> float:
        # within a repetition the runs are back to back: their ratio cancels slow drift in machine load
        return statistics.median(x[i] / y[i] for x, y in zip(rows[a], rows[b], strict=True))

    return {
        "prompt_tokens": len(prompt),
        "gen_tokens": args.gen,
        "reps": args.reps,
        "extra_bufts": engine.extra_bufts,
        "bare_own_copy": args.bare_own_copy,
        "engine": {"prompt_tps": best["engine"][0], "gen_tps": best["engine"][1]},
        "bare": {"prompt_tps": best["bare"][0], "gen_tps": best["bare"][1]},
        "ratio_prompt": ratio("engine", "bare", 0),
        "ratio_gen": ratio("engine", "bare", 1),
        "ratio_prompt_best": best["engine"][0] / best["bare"][0],
        "ratio_gen_best": best["engine"][1] / best["bare"][1],
        "noise_prompt": ratio("bare again", "bare", 0),
        "noise_gen": ratio("bare again", "bare", 1),
        "per_rep": [dict(zip(rows, r, strict=True)) for r in zip(*rows.values(), strict=True)],
    }


def bench_extra_bufts(args: argparse.Namespace, plan: Plan) -> dict:
    """llama.cpp's extra CPU buffer types (weight repacking) off against on, interleaved like the rest."""
    engines = {False: Engine.load(args.model, plan, extra_bufts=False),
               True: Engine.load(args.model, plan, extra_bufts=True)}
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    prompt = engines[False].tokenize(TEXT * (args.prompt // 10 + 1), add_special=False)[: args.prompt]
    rows: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for rep in range(args.reps):
        for on in ((False, True) if rep % 2 == 0 else (True, False)):
            rows[on].append(engine_run(engines[on], prompt, args.gen, clock))
    buffers = {on: sorted({b.name for b in e.report.buffers if b.kind == "model"}) for on, e in engines.items()}
    for e in engines.values():
        e.close()
    pairs = list(zip(rows[True], rows[False], strict=True))
    return {
        "off": {"prompt_tps": max(r[0] for r in rows[False]), "gen_tps": max(r[1] for r in rows[False]),
                "model_buffers": buffers[False]},
        "on": {"prompt_tps": max(r[0] for r in rows[True]), "gen_tps": max(r[1] for r in rows[True]),
               "model_buffers": buffers[True]},
        "ratio_prompt": statistics.median(a[0] / b[0] for a, b in pairs),
        "ratio_gen": statistics.median(a[1] / b[1] for a, b in pairs),
    }


def bench_parallel(args: argparse.Namespace, plan: Plan) -> dict:
    """Throughput of the same requests one at a time and ``--parallel`` at a time."""
    engine = Engine.load(args.model, plan, extra_bufts=args.extra_bufts)
    prompts = [f"Request {i}: " + TEXT for i in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True)
    out = {}
    for rep in range(args.reps):
        for width in ((1, args.parallel) if rep % 2 == 0 else (args.parallel, 1)):
            t = time.perf_counter()
            n = 0
            for c in engine.generate_many(((p, params) for p in prompts), parallel=width):
                n += c.done and c.completion_tokens
            out.setdefault(width, []).append(n / (time.perf_counter() - t))
    engine.close()
    seq, par = max(out[1]), max(out[args.parallel])
    return {"requests": args.requests, "gen_tokens": args.gen, "parallel": args.parallel,
            "sequential_tps": seq, "parallel_tps": par, "speedup": par / seq}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=64, help="generated tokens")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--ngl", type=int, default=0)
    ap.add_argument("--n-cpu-moe", type=int, default=0)
    ap.add_argument("--cpu-moe", action="store_true")
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--extra-bufts", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--bare-own-copy", action="store_true",
                    help="the bare loop loads its own copy of the model (default: it runs on the engine's)")
    ap.add_argument("--ab-extra-bufts", action="store_true",
                    help="also measure extra buffer types on against off (both through the engine)")
    ap.add_argument("--parallel", type=int, default=0, help="also measure batch throughput, N sequences at a time")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time, which a busy shared machine does not distort (with --threads 1 "
                    "llama.cpp computes on the calling thread)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.extra_bufts = {"auto": None, "on": True, "off": False}[args.extra_bufts]
    native.install_log()  # keep llama.cpp's log off the terminal
    plan = make_plan(args)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures the calling thread: use it with --threads 1")
    result = {"model": Path(args.model).name, "threads": args.threads, "clock": args.clock,
              "single": bench_single(args, plan)}
    if args.parallel > 1:
        result["batch"] = bench_parallel(args, plan)
    if args.ab_extra_bufts:
        result["extra_bufts"] = bench_extra_bufts(args, plan)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    s = result["single"]
    print(f"{result['model']}: {s['prompt_tokens']} prompt tokens, {s['gen_tokens']} generated, "
          f"{s['reps']} reps, {args.threads} threads, extra buffer types {'on' if s['extra_bufts'] else 'off'}, "
          f"{args.clock} clock" + (", bare loop on its own copy" if args.bare_own_copy else ""))
    print(f"  {'best of':8} {'prompt tok/s':>13} {'gen tok/s':>10}")
    for who in ("engine", "bare"):
        print(f"  {who:8} {s[who]['prompt_tps']:13.1f} {s[who]['gen_tps']:10.1f}")
    print(f"  {'ratio':8} {s['ratio_prompt']:13.3f} {s['ratio_gen']:10.3f}   (median of paired repetitions)")
    print(f"  {'ratio':8} {s['ratio_prompt_best']:13.3f} {s['ratio_gen_best']:10.3f}   (best of each)")
    print(f"  {'noise':8} {s['noise_prompt']:13.3f} {s['noise_gen']:10.3f}   (bare against itself, paired)")
    if "extra_bufts" in result:
        x = result["extra_bufts"]
        print(f"extra buffer types: off {x['off']['prompt_tps']:.1f} / {x['off']['gen_tps']:.1f} tok/s "
              f"(model buffers {', '.join(x['off']['model_buffers'])}), on {x['on']['prompt_tps']:.1f} / "
              f"{x['on']['gen_tps']:.1f} tok/s ({', '.join(x['on']['model_buffers'])}); on/off "
              f"{x['ratio_prompt']:.3f} prompt, {x['ratio_gen']:.3f} generation")
    if "batch" in result:
        b = result["batch"]
        print(f"batch of {b['requests']} x {b['gen_tokens']} tokens: one at a time {b['sequential_tps']:.1f} tok/s, "
              f"{b['parallel']} at a time {b['parallel_tps']:.1f} tok/s ({b['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
