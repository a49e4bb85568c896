"""`moelocal bench`: measure this machine, beside what `fit` predicts, and learn from it."""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from moelocal import _output
from moelocal.commands._common import JsonOpt, ModelArg
from moelocal.commands._run import (
    CpuMoeOpt,
    CtxOpt,
    NCpuMoeOpt,
    NglOpt,
    OverrideTensorOpt,
    PlacementFlags,
    ThreadsOpt,
    build_plan,
    note,
    resolve_model,
    runnable_hardware,
)
from moelocal.errors import UsageError

DEFAULT_DEPTHS = (0, 2048)  # a short context and a filled one
MAX_SWEEP = 4
# Repetitions that spread this much (stdev / median, with 3 or more) mean another program was using the
# cores: such a bench is shown but not recorded, since it would teach fit this machine's busy moments.
NOISY = 0.5


@dataclass(frozen=True)
class Result:
    """One test on one placement: tokens/s measured (the median of the repetitions, and their spread) and
    predicted. The median, not llama-bench's mean: one repetition slowed by another program moves it less."""

    placement: str
    test: str  # pp512, tg128, pp512 @ d2048 ...
    kind: str  # prompt | decode
    n_tokens: int
    depth: int
    tps: float
    stdev: float
    predicted: float

    @property
    def ratio(self) -> float:
        return self.tps / self.predicted if self.predicted > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"placement": self.placement, "test": self.test, "kind": self.kind, "n_tokens": self.n_tokens,
                "depth": self.depth, "tps": round(self.tps, 2), "stdev": round(self.stdev, 2),
                "predicted": self.predicted, "ratio": round(self.ratio, 3)}


def bench(
    model: ModelArg = None,
    n_prompt: Annotated[int, typer.Option("--n-prompt", "-p", help="Prompt tokens per prompt test (llama-bench "
                                          "-p).")] = 512,
    n_gen: Annotated[int, typer.Option("--n-gen", "-n", help="Tokens generated per decode test (llama-bench "
                                       "-n).")] = 128,
    depth: Annotated[list[int] | None, typer.Option("--depth", "-d", help="Tokens already in the context when a "
                                                    "test runs; repeat for several. Default: 0 and 2048 (less when "
                                                    "the model's context is smaller).")] = None,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Runs of each test (the median is "
                                             "shown).")] = 3,
    sweep: Annotated[bool, typer.Option("--sweep", help="Also measure a few placements around the plan "
                                        "(the ones `fit` shows beside it).")] = False,
    reset: Annotated[bool, typer.Option("--reset", help="Forget this machine's calibration, then stop.")] = False,
    no_record: Annotated[bool, typer.Option("--no-record", help="Measure only: leave the calibration as "
                                            "it is.")] = False,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    cpu_moe: CpuMoeOpt = False,
    n_cpu_moe: NCpuMoeOpt = None,
    ngl: NglOpt = None,
    override_tensor: OverrideTensorOpt = None,
    json: JsonOpt = False,
) -> None:
    """Measure prompt and decode speed on this machine, beside fit's predictions, and calibrate them.

    Runs llama-bench's tests (pp: a prompt of -p tokens; tg: generating -n tokens) with the plan
    `fit` recommends (or the placement you force), at an empty and a filled context, and shows
    each next to the prediction. The measurements are recorded in this machine's calibration
    (moelocal's app dir, per machine, backend and llama.cpp version): from then on `fit` and the
    run commands predict from them ("calibrated on this machine, N runs"). chat, generate, batch
    and serve add what they measure too, unless MOELOCAL_NO_CALIBRATE=1.

    Examples:

      moelocal bench Qwen3-30B-A3B-Q4_K_M.gguf

      moelocal bench model.gguf -p 512 -n 128 -d 0 -d 8192 -r 5 --sweep --json

      moelocal bench --reset
    """
    from moelocal import calibration, hardware

    hw = hardware.detect()
    if reset:
        gone = calibration.reset(hw)
        if json:
            _output.print_json({"reset": True, "records": gone, "machine": calibration.key(hw)})
        else:
            note(f"Forgot {gone} run(s) of this machine's calibration ({calibration.key(hw)}).")
        return
    for name, value in (("--n-prompt", n_prompt), ("--n-gen", n_gen), ("--repetitions", repetitions)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    depths = tuple(dict.fromkeys(depth)) if depth else None
    if depths and min(depths) < 0:
        raise UsageError(f"--depth must be 0 or more, got {min(depths)}")
    path, summary = resolve_model(model)
    if depths is None:  # the default filled depth, as much of it as the model's context holds
        room = (summary.context_length or 4096) - max(n_prompt, n_gen) - 1
        depths = tuple(dict.fromkeys((0, max(0, min(DEFAULT_DEPTHS[1], room)))))
    need = max(depths) + max(n_prompt, n_gen + 1) + 1
    n_ctx = ctx if ctx is not None else -(-need // 256) * 256
    if n_ctx < need:
        raise UsageError(f"--ctx {n_ctx} cannot hold a depth of {max(depths)} and {max(n_prompt, n_gen)} more tokens",
                         f"use --ctx {need} or more, or a smaller --depth")
    flags = PlacementFlags(cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, ngl=ngl, overrides=tuple(override_tensor or ()))
    detected, hw = hw, runnable_hardware(hw)  # the plan: what this llama.cpp can run; the record: this machine
    plan = build_plan(summary, flags, ctx=n_ctx, threads=threads, hw=hw)
    plans = [plan] + (_neighbours(summary, plan, hw) if sweep else [])
    if sweep and len(plans) == 1:
        note("Nothing to sweep: with no GPU, every tensor is in RAM whatever the flags say.")
    before = plan.predicted.basis
    results: list[Result] = []
    measured = []
    for p in plans:
        rs, ms = _run_plan(path, summary, p, hw, n_prompt, n_gen, depths, repetitions)
        results += rs
        measured += ms
    recorded = False
    default_threads = threads is None or threads == hardware.default_threads()
    noisy = [r for r in results if repetitions >= 3 and r.tps > 0 and r.stdev / r.tps > NOISY]
    if not no_record and default_threads and calibration.applies(hw) and not noisy:
        found = calibration.factors(measured, hw)
        calibration.add(detected, calibration.Record("bench", summary.name, plan.placement.describe(summary.n_layer),
                                               found, tests=tuple(r.to_dict() for r in results)))
        recorded = bool(found)
    after_hw = replace(hw, calibration=calibration.attach(detected).calibration)
    from moelocal import speed

    after = speed.predict(summary, plan.placement, plan.options, after_hw)
    if json:
        _output.print_json({
            "model": summary.name, "file": str(path), "machine": calibration.key(detected),
            "threads": plan.options.n_threads or hardware.default_threads(), "options": asdict(plan.options),
            "results": [r.to_dict() for r in results],
            "predicted_from": before, "recorded": recorded, "noisy": [r.test for r in noisy],
            "calibration": _cal_dict(after_hw.calibration),
            "plan_now": {"decode_tps": after.decode_tps, "prefill_tps": after.prefill_tps, "basis": after.basis},
        })
        return
    _render(summary, results, hw)
    if recorded:
        cal = after_hw.calibration
        note(f"Recorded in this machine's calibration ({cal.runs} run{'s' if cal.runs != 1 else ''}): fit now "
             f"predicts {after.decode_tps:.1f} tok/s decode, {after.prefill_tps:.0f} prompt for this plan "
             f"({after.basis}; before: {before}).")
    elif not no_record and not default_threads:
        note("Not recorded: the calibration assumes llama.cpp's default threads (one per core); drop -t.")
    elif not no_record and noisy:
        worst = max(noisy, key=lambda r: r.stdev / r.tps)
        note(f"Not recorded: {worst.test} varied by {worst.stdev / worst.tps:.0%} between repetitions (another "
             "program was busy?); run bench again when the machine is idle.")


def _neighbours(summary, plan, hw) -> list:
    """The placements `fit` shows beside the plan that fit too (at most MAX_SWEEP - 1)."""
    from moelocal import planner

    result = planner.fit(summary, hw, plan.options)
    out = [p for p in result.plans if p.fits and not p.placement.from_disk and p.placement != plan.placement]
    return out[: MAX_SWEEP - 1]


def _tokens(rng: random.Random, n_vocab: int, n: int, avoid: int | None = None) -> list[int]:
    """Random token ids, as llama-bench feeds them; the first differs from ``avoid`` so that a prompt
    never reuses the cache past the part it is meant to."""
    out = [rng.randrange(n_vocab) for _ in range(n)]
    while avoid is not None and out and out[0] == avoid:
        out[0] = rng.randrange(n_vocab)
    return out


def _run_plan(path, summary, plan, hw, n_prompt: int, n_gen: int, depths, reps: int):
    """Load ``plan`` once and run every test on it; returns (results, speed.Measured for calibration)."""
    from moelocal import calibration, speed
    from moelocal.commands._run import _load_with_bar
    from moelocal.engine import Engine, SamplingParams

    label = plan.placement.describe(summary.n_layer)
    rng = random.Random(0)
    n_vocab = summary.n_vocab or 256
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    gen = SamplingParams(temperature=0, max_tokens=n_gen + 1, ignore_eos=True)  # the first comes with the prompt

    def last(chunks):
        out = None
        for chunk in chunks:
            out = chunk
        return out

    results, measured = [], []
    engine = _load_with_bar(Engine, path, plan, f"Loading {summary.name} ({label})")
    try:
        last(engine.generate(_tokens(rng, n_vocab, 16), replace(gen, max_tokens=4)))  # warm-up, as llama-bench
        for d in depths:
            engine.reset()
            fill = _tokens(rng, n_vocab, d)
            if fill:
                last(engine.generate(fill, one))
            suffix = f" @ d{d}" if d else ""
            pp, tg = [], []
            prev = None
            for _ in range(reps):
                prompt = _tokens(rng, n_vocab, n_prompt, avoid=prev)
                prev = prompt[0]
                c = last(engine.generate(fill + prompt, one))
                pp.append(c.prompt_tps)
            for _ in range(reps):
                start = _tokens(rng, n_vocab, 1, avoid=prev)
                prev = start[0]
                c = last(engine.generate(fill + start, gen))
                tg.append(c.generation_tps)
            o_pp = calibration.at_depth(plan.options, d + n_prompt // 2, n_prompt)
            o_tg = calibration.at_depth(plan.options, d + n_gen // 2)
            for kind, name, n, o, values in (("prompt", f"pp{n_prompt}", n_prompt, o_pp, pp),
                                             ("decode", f"tg{n_gen}", n_gen, o_tg, tg)):
                pred = speed.predict(summary, plan.placement, o, hw)
                predicted = pred.prefill_tps if kind == "prompt" else pred.decode_tps
                mid = statistics.median(values)
                results.append(Result(label, name + suffix, kind, n, d, mid,
                                      statistics.stdev(values) if len(values) > 1 else 0.0, predicted))
                measured.append(speed.Measured(summary, plan.placement, o, decode_tps=mid if kind == "decode" else None,
                                               prefill_tps=mid if kind == "prompt" else None))
    finally:
        engine.close()
    return results, measured


def _cal_dict(cal) -> dict[str, Any] | None:
    return None if cal is None else asdict(cal)


def _render(summary, results: list[Result], hw) -> None:
    out = _output.out
    out.print(f"[bold]{summary.name}[/bold] ({summary.architecture}, {summary.quantization}, "
              f"{_output.human_bytes(summary.file_size)}) on {hw.cpu_name}")
    table = Table(box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("placement", "test", "t/s", "predicted", "ratio"):
        table.add_column(col, justify="left" if col in ("placement", "test") else "right", no_wrap=col != "placement")
    shown = None
    for r in results:
        table.add_row(r.placement if r.placement != shown else "", r.test, f"{r.tps:.2f} ± {r.stdev:.2f}",
                      f"{r.predicted:.2f}", f"{r.ratio:.2f}")
        shown = r.placement
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
