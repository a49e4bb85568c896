"""`moelocal fit`: does the model fit here, where should each tensor live, how fast will it run."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from moelocal import _output
from moelocal.commands._common import JsonOpt, hardware_options, load_summaries
from moelocal.commands._run import (
    CpuMoeOpt,
    NCpuMoeOpt,
    NetBwOpt,
    NglOpt,
    OverrideTensorOpt,
    WorkerMemOpt,
    WorkerOpt,
)
from moelocal.errors import UsageError
from moelocal.plan import CPU, RunOptions

EXIT_NO_FIT = 3


def fit(
    model: Annotated[
        list[str] | None,
        typer.Argument(
            help="A .gguf file, a folder of .gguf files, several files (one model in several quantizations), "
            "or a Hugging Face repo org/name[:QUANT]. Omitted: the bundled demo model.",
            show_default=False,
        ),
    ] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", "-c", help="Context length. Default: the model's, up to "
                                            "32768, reduced (and said so) only if nothing fits.")] = None,
    ubatch: Annotated[int, typer.Option("--ubatch", "-ub", help="Physical batch size (llama.cpp -ub).")] = 512,
    kv_type: Annotated[str, typer.Option("--kv-type", help="KV cache type: f16, q8_0 or q4_0.")] = "f16",
    flash_attn: Annotated[bool, typer.Option("--flash-attn/--no-flash-attn",
                                             help="Plan for flash attention (on by default).")] = True,
    gpu: Annotated[list[str] | None, typer.Option("--gpu", help="Plan for these cards, by name: memory and rated "
                                                  "bandwidth from moelocal's table; repeat or comma-separate "
                                                  "(\"RTX 3090\", \"RTX 4090,RTX 3090\").")] = None,
    vram: Annotated[list[str] | None, typer.Option("--vram", help="Plan for GPUs with this much memory: "
                                                   "repeat or comma-separate for several (24GiB,12GiB).")] = None,
    ram: Annotated[str | None, typer.Option("--ram", help="Plan for this much free RAM (64GiB).")] = None,
    no_gpu: Annotated[bool, typer.Option("--no-gpu", help="Plan for the CPU alone.")] = False,
    gpu_bw: Annotated[str | None, typer.Option("--gpu-bw", help="GPU memory bandwidth as rated on its spec sheet "
                                               "(936GB/s); moelocal works out what decoding achieves of it.")] = None,
    cpu_bw: Annotated[str | None, typer.Option("--cpu-bw", help="RAM bandwidth as rated: a spec, DDR5-6000x2 "
                                               "(MT/s x 8 bytes x channels), or a figure, 96GB/s; moelocal "
                                               "works out what llama.cpp achieves of it (about 40-85%).")] = None,
    worker: WorkerOpt = None,
    worker_mem: WorkerMemOpt = None,
    net_bw: NetBwOpt = None,
    cpu_moe: CpuMoeOpt = False,
    n_cpu_moe: NCpuMoeOpt = None,
    ngl: NglOpt = None,
    override_tensor: OverrideTensorOpt = None,
    json: JsonOpt = False,
) -> None:
    """Plan a model for this machine (or one you describe) before you download or run it.

    Prices every placement llama.cpp can do (all on the GPU, the experts of the first N layers in
    RAM, fewer GPU layers, CPU only, from disk) against the memory of each device, predicts
    tokens/s for each, and recommends the fastest that fits. Prints the llama.cpp flags for it.

    With the run commands' placement flags (--n-cpu-moe N, --cpu-moe, --ngl N, -ot PATTERN=DEVICE)
    it also prices exactly that placement, as llama.cpp would make it, and shows it beside the
    recommendation (marked "asked"; in --json, "asked": true).

    With --worker HOST:PORT, the devices of a `moelocal worker` on another machine join the plan
    (as rpc0, rpc1 ...) with the memory they report; layers handed over to them cost a network
    round trip each, at --net-bw.

    Exit codes: 0 a plan fits, 3 nothing fits, 2 bad input, 4 Hub errors, 6 a worker cannot be reached.

    With several quantizations (a folder, several files or a repo), it recommends the one with the
    most bits per weight whose best plan fits and decodes at least 8 tokens/s; if none is that fast,
    the fastest that fits.

    Examples:

      moelocal fit Qwen3-30B-A3B-Q4_K_M.gguf

      moelocal fit model.gguf --vram 24GiB --ram 64GiB --ctx 32768

      moelocal fit model.gguf --gpu "RTX 3090" --ram 64GiB --cpu-bw DDR5-6000x2

      moelocal fit ./quants/ --vram 12GiB,12GiB --json

      moelocal fit model.gguf --worker 192.168.1.20:50052 --net-bw 10Gbit

      moelocal fit model.gguf --vram 24GiB -ot 'blk\\.(4[0-7])\\.ffn_.*_exps=CPU'
    """
    from dataclasses import replace

    from moelocal import layout, oracle, planner

    if kv_type not in ("f16", "q8_0", "q4_0", "f32", "bf16"):
        raise UsageError(f"unknown --kv-type {kv_type!r}", "use f16, q8_0 or q4_0")
    if ubatch <= 0:
        raise UsageError(f"--ubatch must be positive, got {ubatch}")
    hw = hardware_options(gpu=gpu, vram=vram, ram=ram, no_gpu=no_gpu, gpu_bw=gpu_bw, cpu_bw=cpu_bw, workers=worker,
                          worker_mem=worker_mem, net_bw=net_bw)
    summaries = load_summaries(model)
    if ngl is not None and ngl < 0:
        raise UsageError(f"--ngl must be 0 or more, got {ngl}")
    overrides = layout.parse_tensor_overrides(override_tensor or (), hw)
    asking = cpu_moe or n_cpu_moe is not None or ngl is not None or bool(overrides)
    jobs = [(s, RunOptions(n_ctx=ctx if ctx is not None else planner.default_ctx(s), n_ubatch=ubatch,
                           n_batch=max(ubatch, 2048), kv_type=kv_type, flash_attn=flash_attn)) for s in summaries]
    # llama.cpp's dry run of every model first (one child process, cached): what it cannot load is
    # an error before anything is planned or downloaded
    oracle.prefetch(jobs)
    results = []
    for s, options in jobs:
        ask = oracle.for_summary(s)
        ref = ask(options)
        asked = planner.forced_placement(s, hw, n_gpu_layers=ngl, n_cpu_moe=n_cpu_moe, cpu_moe=cpu_moe,
                                         overrides=overrides) if asking else None
        result = planner.fit(s, hw, options, ctx_requested=ctx is not None, oracle=ask, asked=asked)
        used = result.best.options if result.best is not None else options
        results.append(replace(result, memory_source=oracle.describe(s, used, ask(used) if used != options else ref)))
    chosen = planner.rank_quants(summaries, results) if len(results) > 1 else (0 if results[0].best else None)
    if json:
        if len(results) == 1:
            _output.print_json(_with_explanation(results[0]))
        else:
            _output.print_json({"models": [_with_explanation(r) for r in results], "recommended_model": chosen})
    else:
        if len(results) > 1:
            render_ranking(results, chosen)
        for r in results if len(results) == 1 else ([results[chosen]] if chosen is not None else []):
            render(r)
    if chosen is None:
        raise typer.Exit(EXIT_NO_FIT)


def render_ranking(results, chosen) -> None:
    table = Table(title="quantizations", title_justify="left")
    for col in ("", "file", "type", "bits/w", "size", "verdict", "tok/s"):
        table.add_column(col, justify="right" if col in ("bits/w", "size", "tok/s") else "left")
    for i, r in enumerate(results):
        s = r.summary
        tps = f"{r.best.predicted.decode_tps:.1f}" if r.best else "-"
        table.add_row("→" if i == chosen else "", Path(s.files[0]).name, s.quantization, f"{s.bits_per_weight:.2f}",
                      _output.human_bytes(s.file_size), r.verdict(), tps)
    _output.out.print(table)


def render(result) -> None:
    hb = _output.human_bytes
    s, hw = result.summary, result.hardware
    out = _output.out
    gpus = ", ".join(f"{n.upper()} {g.name} {hb(g.free)} free" if g.remote else f"{g.name} {hb(g.free)} free"
                     for n, g in zip(hw.gpu_names, hw.gpus, strict=True)) or "no GPU"
    out.print(f"[bold]{s.name}[/bold] ({s.architecture}, {s.quantization}, {hb(s.file_size)})")
    out.print(f"machine: {hw.cpu_name}, {hb(hw.ram_available)} RAM available; {gpus}"
              + (f"  [dim](overridden: {', '.join(hw.overridden)})[/dim]" if hw.overridden else ""))
    devices = [CPU, *hw.gpu_names]
    # numbers never shrink into "…": in a narrow terminal the placement wraps instead
    table = Table(title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("")
    table.add_column("placement", min_width=10)
    for d in devices:
        table.add_column("RAM" if d == CPU else d.upper(), justify="right", no_wrap=True)
    table.add_column("decode\ntok/s", justify="right", no_wrap=True)
    table.add_column("prompt\ntok/s", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for i, p in enumerate(result.plans):
        cells = []
        for d in devices:
            m = p.memory.get(d)
            if m is None or m.total == 0:
                cells.append("-")
            else:
                over = m.total > p.budget.get(d, 0)
                cells.append(f"[red]{hb(m.total)}[/red]" if over else hb(m.total))
        verdict = "fits" if p.fits else ("from disk" if p.placement.from_disk else "too big")
        mark = ("→" if i == result.recommended else "") + ("asked" if i == result.asked else "")
        table.add_row(mark, p.placement.describe(s.n_layer), *cells,
                      f"{p.predicted.decode_tps:.1f}", f"{p.predicted.prefill_tps:.0f}", verdict)
    out.print(table)
    budget = result.plans[0].budget if result.plans else {}
    out.print("budget (after margin): " + ", ".join(f"{'RAM' if d == CPU else d.upper()} {hb(b)}"
                                                     for d, b in budget.items()))
    for note in result.notes:
        _output.warn(note)
    out.print(f"[bold]verdict:[/bold] {s.name} {result.verdict()}")
    if result.best is not None:
        from moelocal.planner import llama_cpp_flags

        best = result.best
        mem = "; ".join(
            f"{'RAM' if d == CPU else d.upper()}: weights {hb(m.weights)}, KV {hb(m.kv)}, compute {hb(m.compute)}"
            + (f", overhead {hb(m.overhead)}" if m.overhead else "")
            for d, m in best.memory.items() if m.total
        )
        out.print(f"memory: {mem}")
        if result.memory_source:
            out.print(f"memory source: {result.memory_source['text']}")
        out.print(f"llama.cpp: llama-server {_model_flag(s)} "
                  + " ".join(shlex.quote(f) for f in llama_cpp_flags(best, hw)))
        render_explanation(result)
    if result.asked is not None:
        render_asked(result)


def render_asked(result) -> None:
    """The placement the flags asked for: its memory, its speed against the recommendation, its flags."""
    from moelocal.planner import llama_cpp_flags

    hb = _output.human_bytes
    s, hw, out = result.summary, result.hardware, _output.out
    p = result.plans[result.asked]
    mem = ", ".join(f"{'RAM' if d == CPU else d.upper()} {hb(m.total)}" for d, m in p.memory.items() if m.total)
    line = (f"[bold]asked for:[/bold] {p.placement.describe(s.n_layer)}: {mem}; "
            f"{p.predicted.decode_tps:.1f} tok/s decode, {p.predicted.prefill_tps:.0f} prompt")
    best = result.best
    if best is not None and best is not p and best.predicted.decode_tps > 0:
        line += f" ({p.predicted.decode_tps / best.predicted.decode_tps:.2f}x the recommendation)"
    out.print(line)
    if not p.fits:
        short = ", ".join(f"{hb(n)} more {'RAM' if d == CPU else 'memory on ' + d.upper()}"
                          for d, n in p.shortfall().items())
        out.print(f"  does not fit: needs {short or 'more memory'}")
    out.print(f"  llama.cpp: llama-server {_model_flag(s)} " + " ".join(shlex.quote(f) for f in llama_cpp_flags(p, hw)))


def _with_explanation(result) -> dict:
    from moelocal.explain import explain

    data = result.to_dict()
    why = explain(result)
    data["explain"] = why.to_dict() if why is not None else None
    return data


def render_explanation(result) -> None:
    """What bounds the speed, what would make it faster, how much context fits: short lines, 80 columns."""
    from moelocal.explain import explain

    why = explain(result)
    if why is None:
        return
    hb, out = _output.human_bytes, _output.out
    out.print(f"[bold]speed:[/bold] {_tps(why.decode_tps)} tok/s, likely {_tps(why.decode_low)}-"
              f"{_tps(why.decode_high)} ({why.basis})")
    for b in why.bounds[:2]:
        out.print(f"  {b.text()}")
    for f in why.faster:
        out.print(f"[bold]faster:[/bold] {f.needs}: ~{_tps(f.decode_tps)} tok/s ({f.label})")
    fits = [_ctx(c) for c, ok in why.context_fits if ok]
    short = [_ctx(c) for c, ok in why.context_fits if not ok]
    line = "[bold]context:[/bold] " + (" ".join(fits) + (" fit" if len(fits) > 1 else " fits") if fits else "")
    if short:
        line += ("; " if fits else "") + f"{short[0]} does not" + (f" (largest {_ctx(why.max_ctx)})" if fits else "")
    out.print(line + " with this placement")
    for kv in why.kv_options if short else ():  # only worth a line when the model's own context does not fit
        out.print(f"  KV cache {kv.kv_type}: saves {hb(kv.saves)}, fits {_ctx(kv.max_ctx)}: {' '.join(kv.flags)}")
    if why.batch_tps:
        out.print("[bold]batch:[/bold] " + ", ".join(f"{n} at once ~{_tps(t)} tok/s in all" for n, t in why.batch_tps))


def _tps(x: float) -> str:
    """Tokens/s for people: 3 significant digits, never an exponent."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _model_flag(s) -> str:
    """-m PATH for a local file; -hf org/repo:QUANT for a model planned from the Hub's headers."""
    first = s.files[0]
    if Path(first).exists() or first.count("/") < 2:
        return "-m " + shlex.quote(first)
    from moelocal.hub import quant_name

    repo = "/".join(first.split("/", 2)[:2])
    quant = quant_name(first.split("/", 2)[2])
    return "-hf " + shlex.quote(f"{repo}:{quant}" if quant else repo)


def register(app: typer.Typer) -> None:
    app.command("fit")(fit)
